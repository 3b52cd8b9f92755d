"""DMD gradient, score roles and the stage losses, checked on small hand-made cases."""

from __future__ import annotations

import pytest
import torch

from causvid_core.config import PRESETS
from causvid_core.model import CausalWanModel
from causvid_core.sampling import FlowSchedule
from training.distill import critic_loss, dmd_generator_loss
from training.losses import (
    cfg_combine,
    chunk_step_indices,
    dmd_gradient,
    dmd_loss,
    dmd_timesteps,
    flow_matching_loss,
    ode_regression_loss,
    temporal_difference_loss,
)

TINY = PRESETS["tiny"].dit


def test_dmd_gradient_matches_hand_computation() -> None:
    # sample 0: |x - real| = [1, 2, 3] -> mean 2, fake - real = [1, 1, -2]; sample 1: |x - real| = 4 each
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]).view(2, 1, 3, 1, 1).requires_grad_(True)
    real = torch.zeros(2, 1, 3, 1, 1)
    fake = torch.tensor([[1.0, 1.0, -2.0], [2.0, 0.0, -8.0]]).view(2, 1, 3, 1, 1)
    grad = dmd_gradient(x, real, fake)
    expected = torch.tensor([[0.5, 0.5, -1.0], [0.5, 0.0, -2.0]], dtype=torch.float64).view(2, 1, 3, 1, 1)
    assert torch.allclose(grad, expected)
    loss = dmd_loss(x, grad)
    loss.backward()
    assert loss.dtype == torch.float64
    # d/dx of 0.5 * mean((x - (x - g))^2) = g / numel: the step moves x along -(fake - real)
    assert torch.allclose(x.grad.double(), expected / 6)
    assert torch.isclose(loss, 0.5 * (expected**2).mean())


def test_dmd_gradient_is_finite_when_x_equals_the_real_prediction() -> None:
    x = torch.ones(1, 2, 3, 2, 2)
    grad = dmd_gradient(x, x.clone(), x + 1)  # normaliser 0: 1/0 -> inf -> nan_to_num
    assert torch.isfinite(grad).all()


def test_cfg_combine_is_cond_plus_guidance_times_difference() -> None:
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_combine(cond, uncond, 3.5).item() == pytest.approx(2.0 + 3.5 * 1.0)


def test_dmd_timesteps_are_shifted_and_clamped() -> None:
    t = dmd_timesteps(4000, torch.Generator().manual_seed(0), shift=8.0, min_t=20.0, max_t=980.0)
    assert t.min() >= 20.0 and t.max() <= 980.0
    # shift 8 pushes mass to high noise: the median of 8u / (1 + 7u) for uniform u is 8/9 * 1000
    assert abs(t.median().item() - 1000 * 8 * 0.5 / (1 + 7 * 0.5)) < 25


def test_chunk_step_indices_are_constant_inside_each_chunk() -> None:
    idx = chunk_step_indices(64, [3, 3, 2], 3, torch.Generator().manual_seed(0))
    assert idx.shape == (64, 8)
    assert (idx[:, 0:3] == idx[:, :1]).all() and (idx[:, 3:6] == idx[:, 3:4]).all()
    assert (idx[:, 6:8] == idx[:, 6:7]).all()
    assert set(idx.unique().tolist()) == {0, 1, 2}
    assert (idx[:, 0] != idx[:, 3]).any()  # chunks draw independently


def test_clean_chunks_take_the_trajectory_end_at_their_share_and_leave_every_sample_a_noisy_chunk() -> None:
    """--clean-chunks: that share of chunks get index num_steps (x0 at t = 0, the cache's clean context), the rest
    a noisy step; a sample drawn all clean keeps one noisy chunk, so the ODE loss always has frames."""
    idx = chunk_step_indices(4000, [3, 3, 3], 3, torch.Generator().manual_seed(0), clean=0.25)
    per_chunk = idx[:, ::3]
    assert set(idx.unique().tolist()) == {0, 1, 2, 3}
    assert abs((per_chunk == 3).float().mean().item() - 0.25) < 0.02
    assert (per_chunk < 3).any(1).all()
    mostly = chunk_step_indices(500, [3, 3], 3, torch.Generator().manual_seed(1), clean=0.95)
    assert (mostly[:, ::3] < 3).sum(1).min() == 1  # all-clean draws (90% of them) got one chunk back
    # the default draws exactly as before the option (version 17's ODE init is reproduced step for step)
    before = torch.randint(0, 3, (8, 2), generator=torch.Generator().manual_seed(2)).repeat_interleave(3, dim=1)
    assert torch.equal(chunk_step_indices(8, [3, 3], 3, torch.Generator().manual_seed(2)), before)


def test_ode_regression_loss_ignores_frames_at_t_zero() -> None:
    pred, target = torch.zeros(1, 2, 3, 1, 1), torch.zeros(1, 2, 3, 1, 1)
    pred[:, :, 2] = 100.0  # a wrong frame whose t is 0 must not count
    target[:, :, 0] = 1.0
    loss = ode_regression_loss(pred, target, torch.tensor([[757.0, 522.0, 0.0]]))
    assert loss.item() == pytest.approx(0.5)


def _models() -> tuple[CausalWanModel, CausalWanModel, CausalWanModel]:
    torch.manual_seed(0)
    return CausalWanModel(TINY), CausalWanModel(TINY), CausalWanModel(TINY)


def test_generator_loss_sends_gradient_to_the_generator_only() -> None:
    gen, critic, real = _models()
    real.requires_grad_(False)  # as the dmd stage loads it
    x_in = torch.randn(2, 16, 6, 4, 4)
    text = torch.randn(2, 16, TINY.text_dim)
    x = gen(x_in, torch.full((2, 6), 757.0), text, chunk_sizes=[3, 3])
    t = torch.tensor([500.0, 900.0])
    sigma = FlowSchedule().sigma(t).float()
    loss, grad = dmd_generator_loss(x, t, sigma, torch.randn_like(x), text, torch.zeros(1, 16, TINY.text_dim),
                                    real, critic, 3.5)  # fmt: skip
    loss.backward()
    assert all(p.grad is None for p in real.parameters())
    assert not any(p.requires_grad for p in real.parameters())
    assert all(p.grad is None for p in critic.parameters())  # the critic is a score here, not trained
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert torch.isfinite(grad).all() and grad.shape == x.shape


def test_with_a_causal_teacher_and_critic_a_chunks_dmd_gradient_ignores_later_chunks() -> None:
    _, critic, real = _models()
    t = torch.tensor([500.0])
    sigma = FlowSchedule().sigma(t).float()
    text, uncond = torch.randn(1, 16, TINY.text_dim), torch.zeros(1, 16, TINY.text_dim)
    x, eps = torch.randn(1, 16, 6, 4, 4), torch.randn(1, 16, 6, 4, 4)
    later = x.clone()
    later[:, :, 3:] += 1.0  # only the second chunk differs

    causal = {"chunk_sizes": [3, 3]}

    def grad(x: torch.Tensor, critic_mask: dict | None) -> torch.Tensor:
        """The first chunk's gradient direction (DMD normalises by the mean over the whole sample)."""
        g = dmd_generator_loss(x, t, sigma, eps, text, uncond, real, critic, 3.5, causal, critic_mask)[1]
        return g[:, :, :3] / g[:, :, :3].abs().mean()

    assert torch.allclose(grad(x, causal), grad(later, causal), atol=1e-5)
    # a bidirectional critic beside a causal teacher lets the later chunk leak into the first one's gradient
    assert not torch.allclose(grad(x, None), grad(later, None), atol=1e-3)
    # and the causal critic trains under the same block-causal mask, one timestep per frame
    seen: list[tuple] = []
    critic.register_forward_pre_hook(lambda m, a, kw: seen.append((a[1].shape, kw["chunk_sizes"])), with_kwargs=True)
    critic_loss(critic, x, t, sigma, eps, text, causal)
    assert seen == [((1, 6), [3, 3])]


def test_critic_loss_sees_only_student_samples() -> None:
    _, critic, _ = _models()
    seen: list[torch.Tensor] = []
    critic.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x_fake = torch.randn(1, 16, 3, 4, 4, requires_grad=True)
    eps = torch.randn_like(x_fake)
    t = torch.tensor([600.0])
    sigma = FlowSchedule().sigma(t).float()
    loss = critic_loss(critic, x_fake, t, sigma, eps, torch.randn(1, 16, TINY.text_dim))
    loss.backward()
    assert len(seen) == 1
    s = sigma.item()
    assert torch.allclose(seen[0], (1 - s) * x_fake.detach() + s * eps, atol=1e-6)  # noised student sample
    assert x_fake.grad is None  # no gradient flows back into the generator's samples


def test_temporal_difference_loss_sees_motion_errors_only() -> None:
    g = torch.Generator().manual_seed(0)
    eps, x0 = torch.randn(2, 4, 5, 3, 3, generator=g), torch.randn(2, 4, 5, 3, 3, generator=g)
    target = eps - x0
    # the same error in every frame (an object drawn in the wrong place all along): no motion error
    same = torch.randn(2, 4, 1, 3, 3, generator=g).expand(-1, -1, 5, -1, -1)
    assert temporal_difference_loss(target + same, eps, x0).item() == pytest.approx(0.0, abs=1e-6)
    assert flow_matching_loss(target + same, eps, x0).item() > 0.5
    # an error in one frame only (that frame's object out of step with its neighbours): two differences
    one = torch.zeros_like(target)
    one[:, :, 2] = 1.0
    assert temporal_difference_loss(target + one, eps, x0).item() == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        temporal_difference_loss(target[:, :, :1], eps[:, :, :1], x0[:, :, :1])
