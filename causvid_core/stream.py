"""StreamingGenerator: the one stateful orchestrator of autoregressive generation.

It yields latent chunks one at a time at constant cost per chunk (a rolling KV cache), takes a new
prompt at any chunk boundary (optionally blended over N chunks, and optionally re-computing the
cached window under the new prompt, LongLive's "KV re-cache"), takes clean context latents
(image-to-video, continuation), and is reproducible: the noise of chunk i depends only on
(seed, i), so the same seed gives the same video however the stream is consumed, and a stream can
be resumed from its window latents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import CausalConfig, SamplingConfig, chunk_layout
from .kv_cache import KVCache
from .model import CausalWanModel, CrossKV
from .sampling import FlowSchedule, add_noise, denoising_timesteps, sample_chunk

ChunkCallback = Callable[[int, int, Tensor], None]  # (chunk index, step index, x0 prediction)

_MASK64 = (1 << 64) - 1


def chunk_seed(seed: int, chunk_index: int) -> int:
    """A well-mixed 63-bit seed for chunk ``chunk_index`` of a stream seeded with ``seed`` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (chunk_index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class Conditioning:
    """A prompt as the model consumes it: raw text features (for blending) and its cross-attention K/V."""

    cross: CrossKV
    raw: Tensor | None = None


@dataclass
class _Remembered:
    start_frame: int
    latents: Tensor  # clean latents [B, C, f, H, W] on the CPU


@dataclass
class _PromptSwitch:
    source: Conditioning
    target: Conditioning
    first_chunk: int  # chunk index at which the blend starts
    blend_chunks: int


@dataclass
class StreamingGenerator:
    """Generate latent chunks one after another with a rolling KV cache."""

    model: CausalWanModel
    prompt: Tensor | CrossKV
    latent_size: tuple[int, int]  # (H/8, W/8)
    seed: int = 0
    batch: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    recache_on_switch: bool = False
    callback: ChunkCallback | None = None

    def __post_init__(self) -> None:
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        h, w = self.latent_size
        self.cache = KVCache.allocate(
            self.model.config, self.causal, self.batch, h, w, self.device, self.dtype,
            layout=getattr(self.model, "cache_layout", "compact"),
        )  # fmt: skip
        self.schedule = FlowSchedule.from_config(self.sampling)
        self.timesteps = denoising_timesteps(self.sampling, self.schedule)
        self.chunk_index = 0  # generated chunks so far
        self.next_frame = 0  # absolute latent index of the next frame
        self._window: list[_Remembered] = []
        self._current = self._conditioning(self.prompt)
        self._last_used: Conditioning | None = None
        self._switch: _PromptSwitch | None = None

    # -- prompts ---------------------------------------------------------------------------
    def _conditioning(self, prompt: Tensor | CrossKV | Conditioning) -> Conditioning:
        if isinstance(prompt, Conditioning):
            return prompt
        if isinstance(prompt, CrossKV):
            cond = Conditioning(prompt)
        else:
            with torch.no_grad():
                raw = prompt.to(self.device)
                cond = Conditioning(self.model.encode_context(raw), raw)
        if cond.cross.batch != self.batch:
            raise ValueError(f"prompt batch {cond.cross.batch} does not match the stream batch {self.batch}")
        return cond

    def set_prompt(
        self, prompt: Tensor | CrossKV, *, blend_chunks: int = 0, recache: bool | None = None
    ) -> None:
        """Switch to a new prompt from the next chunk on, blended linearly over ``blend_chunks`` chunks."""
        if blend_chunks < 0:
            raise ValueError(f"blend_chunks must be >= 0, got {blend_chunks}")
        target = self._conditioning(prompt)
        source = self._last_used or self._current
        self._switch = _PromptSwitch(source, target, self.chunk_index, blend_chunks) if blend_chunks else None
        self._current = target
        if recache is not None:
            self.recache_on_switch = recache

    def _conditioning_for_chunk(self) -> Conditioning:
        sw = self._switch
        if sw is None:
            return self._current
        weight = (self.chunk_index - sw.first_chunk + 1) / (sw.blend_chunks + 1)
        if weight >= 1.0:
            self._switch = None
            return self._current
        if sw.source.raw is not None and sw.target.raw is not None:
            raw = torch.lerp(sw.source.raw, sw.target.raw, weight)
            return Conditioning(self.model.encode_context(raw), raw)
        return Conditioning(sw.source.cross.lerp(sw.target.cross, weight))

    # -- context ---------------------------------------------------------------------------
    def prefill(self, latents: Tensor, chunk_sizes: list[int] | None = None) -> None:
        """Write clean context latents [B, C, F, H, W] into the cache (image-to-video, continuation)."""
        self._check_latents(latents)
        sizes = chunk_sizes or chunk_layout(latents.shape[2], self.causal.chunk_frames)
        if sum(sizes) != latents.shape[2]:
            raise ValueError(f"chunk_sizes {sizes} do not add up to {latents.shape[2]} frames")
        cond = self._current
        start = 0
        with torch.no_grad():
            for n in sizes:
                lat = latents[:, :, start : start + n].to(self.device, torch.float32)
                self._write_clean(lat, cond)
                start += n
        self._last_used = cond

    def _check_latents(self, latents: Tensor) -> None:
        cfg = self.model.config
        h, w = self.latent_size
        if latents.ndim != 5 or latents.shape[1] != cfg.in_dim or tuple(latents.shape[3:]) != (h, w):
            raise ValueError(
                f"context latents must be [B, {cfg.in_dim}, F, {h}, {w}], got {list(latents.shape)}; "
                "encode the image or video with the model's VAE at the stream's size"
            )
        if latents.shape[0] != self.batch:
            raise ValueError(f"context batch {latents.shape[0]} does not match the stream batch {self.batch}")

    def _write_clean(self, latents: Tensor, cond: Conditioning) -> None:
        """Run a clean chunk at t = 0 to write its keys/values; remember it for re-caching."""
        b, _, f = latents.shape[:3]
        t = torch.zeros(b, f, device=self.device)
        self.model(latents, t, cond.cross, cache=self.cache, start_frame=self.next_frame, write_cache=True)
        self._remember(self.next_frame, latents)
        self.next_frame += f

    def _remember(self, start_frame: int, latents: Tensor) -> None:
        """Keep the clean latents of exactly the chunks the cache holds (sink + window)."""
        if len(self._window) >= self.causal.sink_chunks + self.causal.window_chunks:
            del self._window[self.causal.sink_chunks]
        self._window.append(_Remembered(start_frame, latents.detach().to("cpu", copy=True)))

    def recache(self, cond: Conditioning | None = None) -> None:
        """Recompute the cached window's keys/values under ``cond`` (default: the current prompt)."""
        cond = cond or self._current
        self.cache.reset()
        with torch.no_grad():
            for item in self._window:
                lat = item.latents.to(self.device)
                t = torch.zeros(lat.shape[0], lat.shape[2], device=self.device)
                self.model(
                    lat, t, cond.cross, cache=self.cache, start_frame=item.start_frame, write_cache=True
                )

    @property
    def window_latents(self) -> list[tuple[int, Tensor]]:
        """(start frame, clean latents) of every chunk the cache holds, oldest first."""
        return [(r.start_frame, r.latents) for r in self._window]

    # -- generation ------------------------------------------------------------------------
    def default_chunk_frames(self) -> int:
        first = self.causal.first_chunk_frames
        if self.next_frame == 0 and first is not None:
            return first
        return self.causal.chunk_frames

    def steps_for_strength(self, strength: float) -> list[float]:
        """The steps of a video-to-video chunk: the first at ``strength * 1000`` itself, then the steps of
        the few-step list below it (a strength on the list starts there; 1 is the whole list).

        Starting only at list steps would give the 3-step list two settings (every strength up to 0.75
        starting at 522, one step): a slider that does nothing over most of its range. On the Shapes
        model (docs/reproduction.md, Zero-shot) 0.6 takes the new colour in every case and keeps the
        source's path within 4.1 px (version 5 at 0.3: within 1.6 px).
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        t = strength * self.sampling.num_train_timesteps
        below = [s for s in self.timesteps if s < t - 1e-6]
        at = [s for s in self.timesteps if abs(s - t) <= 1e-6]
        return (at or [round(t, 6)]) + below

    def next_chunk(
        self, num_frames: int | None = None, *, init: Tensor | None = None, strength: float = 1.0
    ) -> Tensor:
        """Generate the next chunk of clean latents [B, C, f, H, W] (float32, on the model's device).

        With ``init`` (clean source latents of this chunk, video-to-video) the chunk starts from
        ``init`` noised to timestep ``strength * 1000`` (``steps_for_strength``); 1 ignores the source.
        """
        if init is not None:
            self._check_latents(init)
            num_frames = init.shape[2]
        f = num_frames or self.default_chunk_frames()
        cond = self._conditioning_for_chunk()
        if self.recache_on_switch and self._last_used is not None and cond is not self._last_used:
            self.recache(cond)
        gen = torch.Generator().manual_seed(chunk_seed(self.seed, self.chunk_index))
        cfg = self.model.config
        h, w = self.latent_size
        noise = torch.randn((self.batch, cfg.in_dim, f, h, w), generator=gen).to(self.device)
        steps = self.timesteps
        if init is not None:
            steps = self.steps_for_strength(strength)
            noise = add_noise(
                init.to(self.device, torch.float32), noise, self.schedule.sigma(steps[0]).float()
            )
        index = self.chunk_index
        callback = None if self.callback is None else (lambda s, t, x0: self.callback(index, s, x0))
        with torch.no_grad():
            x0 = sample_chunk(
                self.model, noise, cond.cross, self.cache, steps, self.schedule,
                start_frame=self.next_frame, generator=gen, callback=callback, write_cache=True,
            )  # fmt: skip
        self._remember(self.next_frame, x0)
        self.next_frame += f
        self.chunk_index += 1
        self._last_used = cond
        return x0

    # -- resume ----------------------------------------------------------------------------
    def replay_chunk(self, latents: Tensor) -> None:
        """Advance over a chunk finished in an earlier run: the cache write ``next_chunk`` made for it
        (re-cache on a prompt switch, then the clean pass), so later chunks come out byte-identical."""
        self._check_latents(latents)
        cond = self._conditioning_for_chunk()
        if self.recache_on_switch and self._last_used is not None and cond is not self._last_used:
            self.recache(cond)
        with torch.no_grad():
            self._write_clean(latents.to(self.device, torch.float32), cond)
        self.chunk_index += 1
        self._last_used = cond

    def skip_chunk(self, num_frames: int) -> None:
        """Advance the chunk counter and prompt state over a chunk without touching the cache."""
        self._last_used = self._conditioning_for_chunk()
        self.next_frame += num_frames
        self.chunk_index += 1

    def restore_window(self, items: list[tuple[int, Tensor]]) -> None:
        """Rebuild the cache from (start frame, clean latents) of the sink + window chunks (after
        ``skip_chunk``): exact only while no chunk has left the window, see ``replay_chunk``."""
        self._window = [_Remembered(start, lat.detach().to("cpu", copy=True)) for start, lat in items]
        self.recache(self._last_used)

    def stream(self, num_chunks: int | None = None) -> Iterator[Tensor]:
        """Yield chunks forever, or ``num_chunks`` of them."""
        produced = 0
        while num_chunks is None or produced < num_chunks:
            yield self.next_chunk()
            produced += 1
