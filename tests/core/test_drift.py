"""Colour drift: the per-chunk figure a long render reports, and the anchor that holds colours to the start."""

from __future__ import annotations

import pytest
import torch

from causvid_core.drift import ColourTracker, colour_stats


def _chunk(seed: int, gain: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Frames [1, 3, 4, 16, 16] in -1..1 with per-channel colours, faded by ``gain`` and shifted by ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1, 1)
    x = base + 0.3 * torch.randn(1, 3, 4, 16, 16, generator=gen)
    return (x * gain + offset).clamp(-1, 1)


def test_the_drift_figure_reads_a_fade_and_a_shift() -> None:
    tracker = ColourTracker()
    first = _chunk(0)
    assert torch.equal(tracker(0, first), first)  # strength 0: frames pass unchanged
    tracker(1, _chunk(1, gain=0.5))
    tracker(2, _chunk(2, offset=0.2))
    same, faded, shifted = tracker.history
    assert same.mean_shift == 0 and same.contrast == 1
    assert faded.contrast == pytest.approx(0.5, abs=0.03)
    assert shifted.mean_shift == pytest.approx(0.2 * 127.5, abs=2.0) and shifted.contrast == pytest.approx(1, abs=0.03)
    assert tracker.worst() is shifted
    line = f"largest shift {shifted.mean_shift:.1f} (chunk 2), lowest contrast x{faded.contrast:.2f} (chunk 1)"
    assert line in tracker.report()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_anchor_pulls_colours_back_by_its_strength(strength: float) -> None:
    tracker = ColourTracker(strength)
    ref = colour_stats(tracker(0, _chunk(0)))
    drifted = _chunk(1, gain=0.6, offset=0.15)
    before = colour_stats(drifted)
    after = colour_stats(tracker(1, drifted))
    # the figure is the model's drift (before anchoring); the written frames move towards the reference
    assert tracker.history[-1].mean_shift == pytest.approx((before[0] - ref[0]).abs().max().item())
    want = before + strength * (ref - before)
    torch.testing.assert_close(after, want, atol=0.6, rtol=0.01)  # 0-255 units; the clamp to -1..1 aside
    assert (after[0] - ref[0]).abs().max() < (1 - strength) * (before[0] - ref[0]).abs().max() + 0.6


def test_a_prompt_change_takes_a_new_reference_after_its_blend() -> None:
    tracker = ColourTracker.for_timeline([0, 3], blend_chunks=1, strength=1.0)
    assert tracker.restart == {4} and tracker.free == {3}
    tracker(0, _chunk(0))
    red = _chunk(5, offset=0.4)  # the new prompt's colours
    assert torch.equal(tracker(3, red), red)  # during the blend: measured against the old start, not pulled
    for index in (4, 5):
        out = tracker(index, red)
    assert tracker.history[1].mean_shift > 40
    torch.testing.assert_close(out, red)  # from chunk 4 on, the new prompt's own colours are the reference
    assert tracker.history[-1].mean_shift == 0


def test_strength_outside_0_to_1_is_refused() -> None:
    with pytest.raises(ValueError, match="colour anchor strength must be between 0 and 1, got 1.5"):
        ColourTracker(1.5)
