"""The losses and timestep draws of the three training stages, as pure functions.

Flow matching (REFERENCE.md): x_t = (1 - sigma) x0 + sigma eps, v = eps - x0. The DMD generator
gradient follows the public CausVid code: grad = (fake_x0 - real_x0) / mean|x - real_x0|,
loss = 0.5 * MSE(x, (x - grad).detach()) in float64, so d loss / d x = grad / numel(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from causvid_core.sampling import FlowSchedule, shift_sigma


def flow_matching_loss(v_pred: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    """MSE(v_pred, eps - x0): the teacher's and the critic's denoising loss."""
    return F.mse_loss(v_pred.float(), (eps - x0).float())


def temporal_difference_loss(v_pred: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    """MSE of the frame-to-frame differences of the velocity error (frames on dim 2).

    The plain loss weighs an object drawn in the wrong place the same whether every frame is off by
    the same amount or each frame by a different one; this term only sees the second kind: the errors
    in where each frame has the object relative to its neighbours, i.e. in the motion. With one sigma
    for the whole clip (the bidirectional teacher) it is the MSE of the frame-to-frame differences of
    the x0 prediction's error divided by sigma^2 (x0 = x_t - sigma v).
    """
    if v_pred.shape[2] < 2:
        raise ValueError(f"temporal_difference_loss needs at least 2 latent frames, got {v_pred.shape[2]}")
    err = v_pred.float() - (eps - x0).float()
    return err.diff(dim=2).square().mean()


def grid_timesteps(
    schedule: FlowSchedule, shape: tuple[int, ...], gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Timesteps drawn uniformly from the shifted 1000-point grid: (t, sigma), both float32 of ``shape``."""
    idx = torch.randint(0, schedule.num_train_timesteps, shape, generator=gen)
    return schedule.timesteps[idx].float(), schedule.sigmas[idx].float()


def dmd_timesteps(
    batch: int,
    gen: torch.Generator,
    *,
    shift: float = 8.0,
    min_t: float = 20.0,
    max_t: float = 980.0,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """One t per sample: uniform integer in [0, 1000), shifted t' = 1000 * 8u / (1 + 7u), clamped (float32 [B])."""  # noqa: E501
    u = torch.randint(0, num_train_timesteps, (batch,), generator=gen).double() / num_train_timesteps
    t = shift_sigma(u, shift) * num_train_timesteps
    return t.clamp(min_t, max_t).float()


def chunk_step_indices(
    batch: int, chunk_sizes: list[int], num_steps: int, gen: torch.Generator, clean: float = 0.0
) -> Tensor:
    """A random index into the few-step list for each chunk, repeated over its frames: long [B, F].

    ``clean``: the share of chunks given index ``num_steps`` instead, the clean end of the trajectory (t = 0),
    which trains the student on the clean context its cache holds at inference. A sample whose chunks all
    came out clean gets one chunk, drawn at random, back at a noisy step: a sample must have a frame to learn.
    """
    n = len(chunk_sizes)
    per_chunk = torch.randint(0, num_steps, (batch, n), generator=gen)
    if clean > 0:
        is_clean = torch.rand((batch, n), generator=gen) < clean
        keep = torch.randint(0, n, (batch,), generator=gen)
        is_clean[torch.arange(batch), keep] &= ~is_clean.all(1)
        per_chunk = torch.where(is_clean, torch.full_like(per_chunk, num_steps), per_chunk)
    return per_chunk.repeat_interleave(torch.tensor(chunk_sizes), dim=1)


def ode_regression_loss(x0_pred: Tensor, x0_target: Tensor, t: Tensor) -> Tensor:
    """MSE of the predicted x0 against the ODE pair's x0 on the frames whose t is not 0 (t: [B, F])."""
    mask = (t != 0).to(x0_pred.dtype)[:, None, :, None, None].expand_as(x0_pred)  # [B, C, F, H, W]
    if mask.sum() == 0:
        raise ValueError("every frame has t = 0; the ODE regression needs noisy frames")
    err = (x0_pred.float() - x0_target.float()).pow(2) * mask
    return err.sum() / mask.sum()


def cfg_combine(cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
    """cond + guidance * (cond - uncond): the real score's guided x0 (CausVid's convention)."""
    return cond + guidance * (cond - uncond)


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """grad = (fake_x0 - real_x0) / mean|x - real_x0| (mean per sample), NaN/Inf replaced (float64)."""
    x, real_x0, fake_x0 = x.detach().double(), real_x0.detach().double(), fake_x0.detach().double()
    dims = list(range(1, x.ndim))
    normaliser = (x - real_x0).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 * MSE(x, (x - grad).detach()) in float64: its gradient w.r.t. x is grad / numel(x)."""
    xd = x.double()
    return 0.5 * F.mse_loss(xd, (xd - grad.double()).detach(), reduction="mean")
