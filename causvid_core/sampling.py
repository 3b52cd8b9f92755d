"""Flow-matching schedule and samplers: the few-step causal chunk loop and the multi-step teacher.

Flow matching (REFERENCE.md): x_t = (1 - sigma) x_0 + sigma * eps, the network predicts v = eps - x_0,
so x_0 = x_t - sigma * v. Timesteps are t = 1000 * sigma; the shift maps s to
sigma = shift * s / (1 + (shift - 1) * s).

Samplers are plain functions with a callback and no ``no_grad`` baked in (DMD backpropagates through
the generator); ``StreamingGenerator`` in ``stream.py`` wraps them for inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import SamplingConfig

StepCallback = Callable[[int, int, Tensor], None]  # (step index, timestep, x0 prediction)


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """sigma = shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


class FlowSchedule:
    """The shifted 1000-point training grid: s = linspace(1, 0, 1001)[:-1], t = 1000 * sigma(s)."""

    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000, exact: bool = False) -> None:
        self.shift = shift
        self.num_train_timesteps = n = num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigma(s, shift)  # [1000], descending from 1
        self.timesteps = self.sigmas * n
        self.exact = exact

    @classmethod
    def from_config(cls, cfg: SamplingConfig) -> FlowSchedule:
        return cls(cfg.shift, cfg.num_train_timesteps, cfg.exact_sigma)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Sigma of timestep(s) t: the nearest grid point (as the released weights expect) or t / 1000."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.exact:
            return t / self.num_train_timesteps
        idx = (self.timesteps[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1)
        return self.sigmas[idx].reshape(t.shape)

    def warp(self, steps: Sequence[int]) -> list[float]:
        """Map a linear step list through the shifted grid: t -> timesteps[1000 - t] (Self-Forcing)."""
        grid = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float64)])
        return [float(grid[self.num_train_timesteps - int(t)]) for t in steps]


def denoising_timesteps(cfg: SamplingConfig, schedule: FlowSchedule | None = None) -> list[float]:
    """The few-step list, warped through the shifted schedule when ``cfg.warp``."""
    if not cfg.warp:
        return [float(t) for t in cfg.denoising_steps]
    return (schedule or FlowSchedule.from_config(cfg)).warp(cfg.denoising_steps)


def teacher_sigmas(num_steps: int, shift: float) -> Tensor:
    """Euler sigmas of the multi-step sampler: shifted linspace(1, 0, N+1)[:-1], then a final 0 (float64)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])


def x0_from_v(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x_0 = x_t - sigma * v, computed in float64, returned in x_t's dtype."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device)
    return (x_t.double() - _bcast(sigma, x_t) * v.double()).to(x_t.dtype)


def v_from_x0(x_t: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """v = (x_t - x_0) / sigma, the inverse of ``x0_from_v``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device)
    return ((x_t.double() - x0.double()) / _bcast(sigma, x_t)).to(x_t.dtype)


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """x_t = (1 - sigma) x_0 + sigma * eps (sigma in float32, as the reference)."""
    sigma = _bcast(torch.as_tensor(sigma, dtype=torch.float32, device=x0.device), x0)
    return ((1 - sigma) * x0.float() + sigma * eps.float()).to(x0.dtype)


def _bcast(sigma: Tensor, like: Tensor) -> Tensor:
    """Shape a scalar, [B] or [B, F] sigma to broadcast over [B, C, F, H, W]."""
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)


def chunk_timesteps(t: float, batch: int, frames: int, device: torch.device) -> Tensor:
    """A per-frame timestep tensor [B, F] filled with t."""
    return torch.full((batch, frames), float(t), device=device)


def sample_chunk(
    model: Any,
    noise: Tensor,
    cross: Any,
    cache: Any,
    timesteps: Sequence[float],
    schedule: FlowSchedule,
    *,
    start_frame: int | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    write_cache: bool = True,
) -> Tensor:
    """Few-step denoising of one chunk with a KV cache (CausVid inference).

    At each step predict x_0 = x_t - sigma * v; before the next step re-noise x_0 with fresh
    noise to the next timestep. The result is the last step's x_0; a final pass at t = 0 writes
    the clean chunk's keys and values into the cache (its output is discarded).
    """
    b, _, f = noise.shape[:3]
    x = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        v = model(x, chunk_timesteps(t, b, f, x.device), cross, cache=cache, start_frame=start_frame)
        x0 = x0_from_v(x, v, schedule.sigma(t).to(x.device))
        if callback is not None:
            callback(i, int(t), x0)
        if i + 1 < len(timesteps):
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            x = add_noise(x0, eps, schedule.sigma(timesteps[i + 1]).float())
    if write_cache and cache is not None:
        model(
            x0,
            chunk_timesteps(0, b, f, x0.device),
            cross,
            cache=cache,
            start_frame=start_frame,
            write_cache=True,
        )
    return x0


def sample_teacher(
    model: Any,
    noise: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    num_steps: int = 50,
    shift: float = 8.0,
    guidance: float = 6.0,
    chunk_sizes: list[int] | None = None,
    sink_chunks: int | None = None,
    window_chunks: int | None = None,
    keep_steps: Sequence[int] = (),
    callback: StepCallback | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Multi-step Euler sampler with classifier-free guidance (the bidirectional teacher).

    v = v_uncond + guidance * (v_cond - v_uncond); x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v.
    Returns the final x_0 and the inputs x_t at the step indices in ``keep_steps`` (ODE pairs).
    ``chunk_sizes`` runs the model block-causally (a causal many-step teacher), within the rolling window of
    ``sink_chunks`` and ``window_chunks`` where they are given (what a stream's cache keeps).
    """
    sigmas = teacher_sigmas(num_steps, shift)
    x = noise.float()
    kept: list[Tensor] = []
    b, _, f = noise.shape[:3]
    use_cfg = uncond is not None and guidance != 1.0
    mask = {"chunk_sizes": chunk_sizes, "sink_chunks": sink_chunks, "window_chunks": window_chunks}
    for i in range(num_steps):
        if i in keep_steps:
            kept.append(x.clone())
        t = chunk_timesteps(float(sigmas[i]) * 1000.0, b, f, x.device)
        v = model(x, t, cond, **mask)
        if use_cfg:
            v_u = model(x, t, uncond, **mask)
            v = v_u + guidance * (v - v_u)
        if callback is not None:
            callback(i, int(t[0, 0]), x0_from_v(x, v, float(sigmas[i])))
        x = (x.double() + (sigmas[i + 1] - sigmas[i]) * v.double()).float()
    return x, kept
