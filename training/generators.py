"""Video generators for evaluation: (prompt, seed, num_frames) -> uint8 [F, H, W, 3].

``student`` streams with the causal few-step model through the same core path the nodes and the CLI
use (``causvid_core.pipeline.render``); ``teacher`` samples a whole clip with many CFG Euler steps
(bidirectional, or block-causal for a causal teacher), and continues past its training length with
sliding windows: each new window is sampled with its first latent frames pinned to the end of the
previous one (replacement guidance), the baseline the paper's Figure 8 compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from causvid_core.config import chunk_layout
from causvid_core.model import CausalWanModel
from causvid_core.sampling import add_noise, teacher_sigmas
from causvid_core.text import ShapesTextEncoder
from causvid_core.vae import WanVAE

GenerateFn = Callable[[str, int, int], np.ndarray]


class FrameCollector:
    """The pipeline's writer for evaluation: keeps every chunk of uint8 frames it is given."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, chunk: Tensor | np.ndarray) -> None:
        self.frames.append(np.asarray(chunk))

    def video(self, n: int) -> np.ndarray:
        """The first ``n`` frames written, uint8 [n, H, W, 3]."""
        return np.concatenate(self.frames)[:n]


def student(model: str, vae: WanVAE, size: int = 64, text: ShapesTextEncoder | None = None) -> GenerateFn:
    """The streaming causal student (a bundle source: embedded:NAME or a checkpoint)."""
    from causvid_core.bundle import load_bundle
    from causvid_core.pipeline import PromptTimeline, RenderRequest, render

    bundle = load_bundle(model, dtype=torch.float32)
    encoder = bundle.text_encoder or text
    if encoder is None:
        raise ValueError(f"{model} has no text encoder: pass one")

    def generate(prompt: str, seed: int, num_frames: int) -> np.ndarray:
        out = FrameCollector()
        request = RenderRequest(size, size, num_frames, seed=seed, fps=bundle.fps)
        with torch.no_grad():
            render(bundle.model, PromptTimeline.single(encoder.encode([prompt])), request,
                   decoder=vae.stream_decoder(), writer=out, sampling=bundle.sampling,
                   causal=bundle.causal, keep_latents=False)  # fmt: skip
        return out.video(num_frames)

    return generate


def _euler(
    model: CausalWanModel, x: Tensor, text: Tensor, uncond: Tensor, sigmas: Tensor, guidance: float,
    chunks: list[int] | None, pinned: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """CFG Euler from sigmas[0] to 0; ``pinned`` (clean latents of the first frames) is re-noised to the
    current sigma before every step (sliding-window continuation)."""
    gen = torch.Generator().manual_seed(1234)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        if pinned is not None:
            p = pinned.shape[2]
            x[:, :, :p] = add_noise(pinned, torch.randn(pinned.shape, generator=gen), s)
        t = torch.full((x.shape[0],), float(s) * 1000.0)
        v_c = model(x, t, text, chunk_sizes=chunks)
        v_u = model(x, t, uncond, chunk_sizes=chunks)
        v = v_u + guidance * (v_c - v_u)
        x = x + (s_next - s) * v  # x_t = (1 - s) x0 + s eps, dx/ds = eps - x0 = v
    if pinned is not None:
        x[:, :, : pinned.shape[2]] = pinned
    return x


def teacher(
    path: str | Path, vae: WanVAE, text: ShapesTextEncoder, *, steps: int = 50, guidance: float = 6.0,
    shift: float = 8.0, window: int = 9, overlap: int = 3, causal_chunk: int | None = None, size: int = 64,
) -> GenerateFn:  # fmt: skip
    """A many-step teacher: one window of ``window`` latent frames, then sliding windows pinned on the
    last ``overlap`` frames of the previous one. ``causal_chunk``: a block-causal (causal) teacher."""
    from causvid_core.checkpoint import load_model
    from causvid_core.pipeline import to_uint8_frames

    model, _ = load_model(path, dtype=torch.float32)
    model.eval().requires_grad_(False)
    sigmas = teacher_sigmas(steps, shift)
    uncond = torch.zeros(1, model.config.text_len, model.config.text_dim)

    def generate(prompt: str, seed: int, num_frames: int) -> np.ndarray:
        latent_frames = 1 + (num_frames - 1 + 3) // 4
        ctx = text.encode([prompt])
        gen = torch.Generator().manual_seed(seed)
        h = size // 8
        parts: list[Tensor] = []
        done, pinned = 0, None
        with torch.no_grad():
            while done < latent_frames:
                new = window - (0 if pinned is None else pinned.shape[2])
                total = window
                noise = torch.randn((1, model.config.in_dim, total, h, h), generator=gen)
                chunks = chunk_layout(total, causal_chunk) if causal_chunk else None
                x = _euler(model, noise * sigmas[0], ctx, uncond, sigmas, guidance, chunks, pinned)
                fresh = x[:, :, total - new :]
                parts.append(fresh)
                done += new
                pinned = x[:, :, -overlap:]
        latents = torch.cat(parts, dim=2)[:, :, :latent_frames]
        with torch.no_grad():
            video = vae.stream_decoder().decode(latents)
        return to_uint8_frames(video)[:num_frames].numpy()

    return generate
