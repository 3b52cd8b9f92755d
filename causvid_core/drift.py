"""Colour drift of a long render: a figure per chunk, and an anchor that holds the colours to the start.

Autoregressive video fades: colour and contrast wander over a minute as each chunk builds on the last.
``ColourTracker`` measures every chunk's per-channel mean and spread against the first frames of the render
(or of the current prompt, after a prompt change has finished blending), which is the drift figure a user
can read; with ``strength > 0`` it also pulls each chunk's per-channel mean and spread back towards that
reference before the chunk is written (``strength`` 1: matched exactly). The correction touches the
written frames only: the latents, and so the KV cache and what the model sees, are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ChunkDrift:
    """One chunk against the reference, in the frames' 0-255 units."""

    index: int
    mean_shift: float  # largest per-channel change of the mean colour
    contrast: float  # mean per-channel ratio of spreads (1: the reference's contrast; below: faded)


def colour_stats(frames: Tensor) -> Tensor:
    """Per-channel mean and standard deviation of frames [B, 3, T, H, W] (-1..1) as [2, 3] in 0-255 units."""
    x = frames.detach().float().transpose(0, 1).reshape(3, -1)
    return torch.stack([(x.mean(dim=1) + 1) * 127.5, x.std(dim=1, correction=0) * 127.5]).cpu()


@dataclass
class ColourTracker:
    """The drift figure of each chunk and, with ``strength`` > 0, its correction towards the reference.

    ``restart`` holds the chunk indices where the reference is taken again (the first chunk fully on a new
    prompt, so that a schedule's colour change is not undone); ``reference`` ([2, 3]) is what a resumed
    render restores. Call it with (chunk index, frames) for every chunk in order; the context frames of an
    image seed or a continued video come first, as chunk -1.
    """

    strength: float = 0.0
    restart: frozenset[int] = frozenset()
    free: frozenset[int] = frozenset()  # chunks of a prompt blend: measured, never pulled back
    reference: Tensor | None = None
    history: list[ChunkDrift] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"colour anchor strength must be between 0 and 1, got {self.strength}")

    @classmethod
    def for_timeline(cls, changes: Iterable[int], blend_chunks: int, strength: float = 0.0, **kw) -> ColourTracker:
        """Restart at each prompt change of a timeline once its blend is over; leave the blend's chunks as they
        come (their colours are meant to change)."""
        changes = [k for k in changes if k > 0]
        free = frozenset(k + i for k in changes for i in range(blend_chunks))
        return cls(strength, frozenset(k + blend_chunks for k in changes), free, **kw)

    def __call__(self, index: int, frames: Tensor) -> Tensor:
        stats = colour_stats(frames)
        if self.reference is None or index in self.restart:
            self.reference = stats
        ref = self.reference
        spread = (stats[1] / ref[1].clamp_min(1e-3)).mean().item()
        self.history.append(ChunkDrift(index, (stats[0] - ref[0]).abs().max().item(), spread))
        if self.strength == 0 or index in self.free or torch.equal(stats, ref):
            return frames
        s = self.strength
        mean, std = stats[0], stats[1].clamp_min(1e-3)
        target_mean, target_std = mean + s * (ref[0] - mean), std + s * (ref[1] - std)
        scale = (target_std / std).view(1, 3, 1, 1, 1).to(frames)
        shift = ((target_mean - mean * target_std / std) / 127.5 - 1 + scale.view(3).cpu()).view(1, 3, 1, 1, 1)
        # in -1..1 units: y = (x + 1) * 127.5 -> y' = y * scale + b  ->  x' = x * scale + (scale - 1) + b / 127.5
        return (frames * scale + shift.to(frames)).clamp(-1, 1)

    def worst(self) -> ChunkDrift | None:
        """The chunk that drifted most (largest colour shift)."""
        return max(self.history, key=lambda d: d.mean_shift, default=None)

    def report(self) -> str:
        """One line: the largest drift of the chunks rendered (before any anchoring), and the anchor."""
        worst = self.worst()
        if worst is None:
            return "colour drift: no chunk rendered"
        faded = min(self.history, key=lambda d: d.contrast)
        anchor = f"; anchored at strength {self.strength:g}" if self.strength else ""
        return (
            f"colour drift against the start (0-255): largest shift {worst.mean_shift:.1f} (chunk {worst.index}), "
            f"lowest contrast x{faded.contrast:.2f} (chunk {faded.index}){anchor}"
        )
