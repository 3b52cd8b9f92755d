"""How far a student's latents drift off its encoder's, channel by channel, over long videos.

For each of N prompts (Figure 8's set by default) the student streams a video of ``--seconds``; every block of
4 latent frames (one second at 16 fps) is averaged per channel and compared with the channel means of the
encoder's latents of the true video of the same prompt and seed (65 frames). The latents are normalised, so the
offsets are in latent stds: the unit of a decoder fine-tune's ``--latent-shift`` and ``--latent-shift-channels``
(docs/training.md). Prints per prompt the mean absolute offset per channel, then over all blocks the RMS, mean
and 95th percentile per channel, and writes the offsets [channels, blocks] to ``--out`` (.npy) when given.

    python scripts/latent_drift.py --model embedded:shapes --prompts 12 --seconds 120

Object-local codes (the shape, direction and colour channels of the Shapes VAE) move with where the object is,
so part of their offset is the student's path, not drift; the background channels' offsets are drift alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causvid_core.bundle import load_bundle, vae_file  # noqa: E402
from causvid_core.pipeline import PromptTimeline, RenderRequest, render  # noqa: E402
from causvid_core.vae import load_wan_vae  # noqa: E402
from training.data import checkpoint_text_encoder  # noqa: E402
from training.shapes import prompt_set, render_video, to_model_range  # noqa: E402

BLOCK = 4  # latent frames per block: one second at 16 fps


def offsets(
    model: str, vae_path: str | None, prompts: list[str], seconds: float, size: int = 64
) -> np.ndarray:
    """Per-channel offsets [channels, blocks] of every prompt's blocks, prompt after prompt (video seed = index)."""
    path = vae_file(vae_path, model)
    if path is None:
        raise SystemExit("--vae PATH is needed with a checkpoint (the VAE whose latents the student makes)")
    vae = load_wan_vae(path)
    bundle = load_bundle(model, dtype=torch.float32)
    # a student checkpoint has no text encoder: the Shapes one its run used
    text = bundle.text_encoder or checkpoint_text_encoder(model, bundle.model.config)
    frames = int(round(seconds * bundle.fps))
    out = []
    for i, prompt in enumerate(prompts):
        request = RenderRequest(size, size, frames, seed=i, fps=bundle.fps)
        state = render(bundle.model, PromptTimeline.single(text.encode([prompt])), request,
                       sampling=bundle.sampling, causal=bundle.causal, keep_latents=True)  # fmt: skip
        z = torch.cat(state.latents, dim=2)[0]  # [C, T, h, w]
        usable = (z.shape[1] // BLOCK) * BLOCK
        if usable == 0:
            raise SystemExit(f"--seconds {seconds}: too short for one block of {BLOCK} latent frames")
        blocks = z[:, :usable].reshape(z.shape[0], -1, BLOCK, *z.shape[2:]).mean(dim=(2, 3, 4))
        truth = vae.encode(to_model_range(render_video(prompt, i, 65, size))[None])[0].mean(dim=(1, 2, 3))
        d = (blocks - truth[:, None]).numpy()
        out.append(d)
        print(
            f"{i:3d} {prompt}: mean |offset| " + " ".join(f"{x:.2f}" for x in np.abs(d).mean(axis=1)),
            flush=True,
        )
    return np.concatenate(out, axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:shapes", help="embedded:NAME or a student checkpoint")
    ap.add_argument("--vae", help="VAE weights (default: the embedded model's own)")
    ap.add_argument(
        "--prompts", type=int, default=12, help="prompts of the covering set (default 12, Figure 8's)"
    )
    ap.add_argument("--seconds", type=float, default=120.0, help="video length (default 120)")
    ap.add_argument("--out", type=Path, help="write the offsets [channels, blocks] here (.npy)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    d = offsets(args.model, args.vae, prompt_set(args.prompts, 0), args.seconds)
    rows = {
        "rms": np.sqrt((d**2).mean(axis=1)),
        "mean": d.mean(axis=1),
        "p95 |offset|": np.percentile(np.abs(d), 95, axis=1),
    }
    print("channel       " + " ".join(f"{c:5d}" for c in range(d.shape[0])))
    for name, row in rows.items():
        print(f"{name:13s} " + " ".join(f"{x:5.2f}" for x in row))
    if args.out:
        np.save(args.out, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
