"""Flow-matching schedule facts of the released CausVid weights, and the samplers' arithmetic."""

from __future__ import annotations

import pytest
import torch

from causvid_core.config import SamplingConfig
from causvid_core.sampling import (
    FlowSchedule,
    add_noise,
    denoising_timesteps,
    sample_chunk,
    sample_teacher,
    teacher_sigmas,
    v_from_x0,
    x0_from_v,
)


def test_nearest_grid_sigma_as_the_released_weights_expect() -> None:
    sched = FlowSchedule(shift=8.0)
    assert sched.sigma(1000.0).item() == pytest.approx(1.0)
    assert sched.sigma(757.0).item() == pytest.approx(0.7568, abs=1e-4)
    assert sched.sigma(0.0).item() == pytest.approx(0.0079, abs=1e-4)  # not 0: nearest grid point
    assert FlowSchedule(exact=True).sigma(0.0).item() == 0.0


def test_few_step_list_is_the_50_step_schedule_at_0_36_44() -> None:
    sigmas = teacher_sigmas(50, 8.0)
    assert [round(float(sigmas[i]) * 1000) for i in (0, 36, 44)] == [1000, 757, 522]
    assert sigmas[-1].item() == 0.0 and len(sigmas) == 51


def test_warped_list_goes_through_the_shifted_schedule() -> None:
    cfg = SamplingConfig(denoising_steps=(1000, 750, 500, 250), warp=True)
    warped = denoising_timesteps(cfg)
    sched = FlowSchedule(8.0)
    expected = [float(sched.timesteps[1000 - t]) for t in (1000, 750, 500, 250)]
    assert warped == expected
    assert warped[0] == pytest.approx(1000.0)
    assert warped[2] == pytest.approx(1000 * 8 * 0.5 / (1 + 7 * 0.5))  # s = 0.5 shifted
    assert denoising_timesteps(SamplingConfig()) == [1000.0, 757.0, 522.0]


def test_x0_v_round_trip_and_noising() -> None:
    x0, eps = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    sigma = torch.tensor([0.3, 0.8])
    xt = add_noise(x0, eps, sigma)
    v = eps - x0
    assert torch.allclose(x0_from_v(xt, v, sigma), x0, atol=1e-5)
    assert torch.allclose(v_from_x0(xt, x0, sigma), v, atol=1e-4)


class _ExactVelocity(torch.nn.Module):
    """A 'model' whose velocity field carries every x_t exactly to a fixed x0 (per prompt scale)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target
        self.sched = FlowSchedule(8.0, exact=True)

    def forward(self, x, t, cond, **kwargs):
        sigma = (t / 1000.0).clamp_min(1e-6)
        return (x - self.target * cond) / sigma[:, None, :, None, None]


def test_teacher_euler_lands_on_the_data_and_applies_cfg() -> None:
    target = torch.randn(1, 4, 3, 2, 2)
    model = _ExactVelocity(target)
    noise = torch.randn_like(target)
    x0, kept = sample_teacher(model, noise, 1.0, None, num_steps=50, shift=8.0, keep_steps=(0, 36, 44))
    assert torch.allclose(x0, target, atol=1e-4)
    assert len(kept) == 3 and torch.equal(kept[0], noise)
    # x_t on the straight path at the kept steps: (1 - sigma) x0 + sigma * noise
    sig = teacher_sigmas(50, 8.0)
    assert torch.allclose(kept[1], (1 - sig[36]) * target + sig[36] * noise, atol=1e-4)
    # guidance g on cond 1.0 vs uncond 0.0 extrapolates the target to g * target
    x0_cfg, _ = sample_teacher(model, noise, 1.0, 0.0, num_steps=50, guidance=3.0)
    assert torch.allclose(x0_cfg, 3.0 * target, atol=1e-3)


def test_few_step_chunk_predicts_x0_and_renoises_with_fresh_noise() -> None:
    target = torch.randn(1, 4, 3, 2, 2)
    model = _ExactVelocity(target)
    steps = []
    gen = torch.Generator().manual_seed(0)
    x0 = sample_chunk(
        model, torch.randn_like(target), 1.0, None, [1000.0, 757.0, 522.0], model.sched,
        generator=gen, callback=lambda i, t, x: steps.append((i, t, x.clone())),
    )  # fmt: skip
    assert torch.allclose(x0, target, atol=1e-5)
    assert [(i, t) for i, t, _ in steps] == [(0, 1000), (1, 757), (2, 522)]
    # the generator was used for two fresh re-noising draws
    replay = torch.Generator().manual_seed(0)
    torch.randn(target.shape, generator=replay)
    torch.randn(target.shape, generator=replay)
    assert torch.equal(torch.randn(1, generator=gen), torch.randn(1, generator=replay))


def test_sampler_keeps_gradients_for_dmd() -> None:
    """No no_grad inside: the generator's loss backpropagates through the sampler."""
    lin = torch.nn.Parameter(torch.tensor(0.5))

    def model(x, t, cond, **kwargs):
        return x * lin

    out = sample_chunk(model, torch.randn(1, 2, 1, 2, 2), None, None, [1000.0, 500.0], FlowSchedule(8.0))
    out.sum().backward()
    assert lin.grad is not None and lin.grad.abs().item() > 0
