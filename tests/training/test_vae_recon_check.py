"""scripts/vae_recon_check.py: the round trips docs/reproduction.md scores decoders by."""

from __future__ import annotations

import pytest
import torch

from causvid_core.bundle import embedded_file
from causvid_core.vae import load_wan_vae
from tests.helpers import load_script
from training.shapes import render_video, to_model_range

rc = load_script("vae_recon_check")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_noisy_round_trips_are_seeded_and_move_further_with_more_noise() -> None:
    """--latent-noise: the same seed decodes the same noisy latents (figures in the docs can be rerun), and
    the more noise, the further the decode from the exact round trip."""
    vae = load_wan_vae(embedded_file("shapes", "vae")).eval()
    x = to_model_range(render_video("a green square moving up", seed=3, num_frames=5))[None]
    exact = rc.round_trip(vae, x)
    with torch.no_grad():
        assert torch.equal(exact, vae.decode(vae.encode(x)))
    a = rc.round_trip(vae, x, 0.5, torch.Generator().manual_seed(0))
    b = rc.round_trip(vae, x, 0.5, torch.Generator().manual_seed(0))
    c = rc.round_trip(vae, x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gap = lambda s: float((rc.round_trip(vae, x, s, torch.Generator().manual_seed(0)) - exact).abs().mean())  # noqa: E731
    assert 0 < gap(0.1) < gap(0.5) < gap(2.0)
