"""Streaming state of the Wan2.1 VAE, spatial tiling, and chunk-by-chunk encoder/decoder objects.

A causal 3D convolution with temporal kernel k needs the last k - 1 frames of its input from the
previous call; those frames, per convolution, are the whole state of a stream. They live in a
``VAEStreamState`` that the caller owns and passes in, never on the module, so one loaded VAE can
serve any number of streams at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .vae import WanVAE

Mode = Literal["encode", "decode"]


@dataclass
class VAEStreamState:
    """Per-convolution cached frames of one encode or decode stream (empty = the stream's start)."""

    mode: Mode
    caches: dict[str, Tensor] = field(default_factory=dict)  # module name -> last input frames
    started: set[str] = field(default_factory=set)  # temporal resamples that have seen frame 0
    frames_in: int = 0  # frames consumed so far (pixel frames for encode, latent for decode)
    frames_out: int = 0
    spatial_size: tuple[int, int] | None = None  # input H, W; fixed for the stream
    tiles: dict[tuple[int, int], VAEStreamState] = field(default_factory=dict)  # per tile when tiled

    def reset(self) -> None:
        """Forget everything: the next call starts a new video."""
        self.caches.clear()
        self.started.clear()
        self.tiles.clear()
        self.frames_in = self.frames_out = 0
        self.spatial_size = None

    def nbytes(self) -> int:
        """Bytes held by cached frames (all tiles included)."""
        own = sum(t.numel() * t.element_size() for t in self.caches.values())
        return own + sum(s.nbytes() for s in self.tiles.values())

    def check_size(self, size: tuple[int, int]) -> None:
        """Fix the frame size at the first call; later calls must match it."""
        if self.spatial_size is None:
            self.spatial_size = size
        elif self.spatial_size != size:
            raise ValueError(
                f"this {self.mode} stream started with frames of {self.spatial_size[0]}x{self.spatial_size[1]} "
                f"but got {size[0]}x{size[1]}: a stream keeps one size; call state.reset() for a new video"
            )

    def sub(self, key: tuple[int, int]) -> VAEStreamState:
        """The state of one spatial tile."""
        if key not in self.tiles:
            self.tiles[key] = VAEStreamState(self.mode)
        return self.tiles[key]


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in latent pixels (x8 for video pixels); neighbours overlap and are blended linearly."""

    tile: int = 32
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.tile < 2 or not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"need tile >= 2 and 0 <= overlap < tile (latent pixels), got {self.tile}, {self.overlap}"
            )

    def starts(self, size: int) -> list[int]:
        """Tile origins covering ``size``: stride tile - overlap, the last tile flush with the end."""
        if size <= self.tile:
            return [0]
        starts = list(range(0, size - self.tile, self.tile - self.overlap))
        return [*starts, size - self.tile]


def _ramp(length: int, ramp_in: int, ramp_out: int, device: torch.device) -> Tensor:
    """1D blend weight of a tile: linear ramps over the overlaps, 1 inside; never 0."""
    w = torch.ones(length, device=device)
    pos = torch.arange(length, device=device, dtype=torch.float32)
    if ramp_in:
        w = torch.minimum(w, (pos + 0.5) / ramp_in)
    if ramp_out:
        w = torch.minimum(w, (length - pos - 0.5) / ramp_out)
    return w


def tiled_apply(
    fn: Callable[[Tensor, VAEStreamState], Tensor],
    x: Tensor,
    state: VAEStreamState,
    tiling: Tiling,
    in_scale: int,
    out_scale: int,
) -> Tensor:
    """Run ``fn`` per spatial tile (each tile with its own stream state) and blend the overlaps.

    Tile positions are in latent pixels; the input has ``in_scale`` and the output ``out_scale``
    pixels per latent pixel (8 and 1 for encode, 1 and 8 for decode).
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    ys, xs = tiling.starts(grid_h), tiling.starts(grid_w)
    out = weight = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            th, tw = min(tiling.tile, grid_h), min(tiling.tile, grid_w)
            patch = x[..., y0 * in_scale : (y0 + th) * in_scale, x0 * in_scale : (x0 + tw) * in_scale]
            y = fn(patch, state.sub((i, j)))  # [B, C, T, th * out_scale, tw * out_scale]
            if out is None:
                shape = (*y.shape[:3], grid_h * out_scale, grid_w * out_scale)
                out = torch.zeros(shape, dtype=torch.float32, device=y.device)
                weight = torch.zeros(shape[-2:], dtype=torch.float32, device=y.device)
            o = tiling.overlap * out_scale
            wy = _ramp(th * out_scale, o if i > 0 else 0, o if i < len(ys) - 1 else 0, y.device)
            wx = _ramp(tw * out_scale, o if j > 0 else 0, o if j < len(xs) - 1 else 0, y.device)
            w = wy[:, None] * wx[None, :]
            rows = slice(y0 * out_scale, (y0 + th) * out_scale)
            cols = slice(x0 * out_scale, (x0 + tw) * out_scale)
            out[..., rows, cols] += y.float() * w
            weight[rows, cols] += w
    return (out / weight).to(y.dtype)


class StreamDecoder:
    """Decodes normalised latent chunks in order, carrying the causal state between chunks.

    Chunk 0 of n latent frames gives 1 + 4 (n - 1) frames, later chunks 4 n; the frames equal those of
    one full decode. Has the ``decode(latents)`` method the render pipeline expects.
    """

    def __init__(self, vae: WanVAE, tiling: Tiling | None = None) -> None:
        self.vae = vae
        self.tiling = tiling
        self.state = VAEStreamState("decode")

    def decode(self, latents: Tensor) -> Tensor:
        """[B, z_dim, f, h, w] normalised latents -> [B, 3, T, 8h, 8w] video in -1..1."""
        return self.vae.decode(latents, self.state, tiling=self.tiling)

    def reset(self) -> None:
        self.state.reset()


class StreamEncoder:
    """Encodes video chunks in order (first 1 + 4k frames, then multiples of 4) into normalised latents."""

    def __init__(self, vae: WanVAE, tiling: Tiling | None = None) -> None:
        self.vae = vae
        self.tiling = tiling
        self.state = VAEStreamState("encode")

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in -1..1 -> [B, z_dim, T', H/8, W/8] normalised latents (T' = T/4, or 1 + (T-1)/4 first)."""
        return self.vae.encode(video, self.state, tiling=self.tiling)

    def reset(self) -> None:
        self.state.reset()
