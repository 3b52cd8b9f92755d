"""scripts/latent_probe.py: the figures docs/reproduction.md gives for what a VAE's latent holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causvid_core.bundle import embedded_file
from causvid_core.vae import load_wan_vae
from tests.helpers import load_script

lp = load_script("latent_probe")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is faster beside a busy process


def test_variance_split_adds_up_to_the_total_and_finds_the_label() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (3000,), generator=g)
    x = torch.randn(3000, 4, generator=g)
    x[:, 0] += labels.float() * 2  # the label moves channel 0 by 0, 2 or 4
    between, within = lp.variance_split(x, labels)
    assert between + within == pytest.approx(float(x.var(0, unbiased=False).sum()), rel=1e-4)
    assert between == pytest.approx(8 / 3, rel=0.1)  # the variance of {0, 2, 4}
    assert within == pytest.approx(4.0, rel=0.1)


def test_probe_names_a_linear_label_and_not_a_random_one() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (900,), generator=g)
    x = torch.randn(900, 6, generator=g)
    x[:, 1] += 3 * (labels == 1).float()
    x[:, 2] += 3 * (labels == 2).float()
    train = torch.arange(900) % 2 == 0
    assert lp.probe_accuracy(x, labels, train) > 0.85
    noise = torch.randint(0, 3, (900,), generator=g)
    assert lp.probe_accuracy(x, noise, train) < 0.45  # chance is 1/3


def test_the_shipped_vae_codes_colour_shape_and_direction_where_the_object_is() -> None:
    """What the DiT writes (version 6's code VAE): the object's cells name its colour and shape in every
    latent frame, and its direction in every frame after the first (a still has none)."""
    vae = load_wan_vae(embedded_file("shapes", "vae")).eval()
    encoded = lp.encode_clips(vae, 24, 9)
    codes = lp.code_accuracy(vae, encoded=encoded)
    out = lp.probe(vae, encoded=encoded)
    assert len(codes["colour"]) == 3  # latent frames of a 9-frame clip
    assert min(codes["colour"]) >= 95 and min(codes["shape"]) >= 95 and min(codes["direction"][1:]) >= 95
    assert out["cells"] > 24  # every clip has object cells after its first latent frame
    for name in lp.ATTRIBUTES:
        assert out[name]["between"] + out[name]["within"] == pytest.approx(out["total_variance"], rel=1e-4)
    assert out["shape"]["probe"] >= 90 and out["background"]["between"] < out["shape"]["between"]


def test_read_codes_names_what_the_object_cells_say_and_ignores_the_rest() -> None:
    from causvid_core.text import COLOURS, DIRECTIONS, SHAPE_NAMES

    mu = torch.zeros(1, 16, 2, 8, 8)
    cover = torch.zeros(1, 1, 2, 8, 8)
    cover[..., 2:4, 5:7] = 1.0  # the object's cells
    mu[:, 3:6] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None, None]  # triangle...
    mu[:, 6:8] = torch.tensor([0.0, -1.0])[:, None, None, None]  # ...moving up...
    rgb = torch.tensor(COLOURS["magenta"], dtype=torch.float32) / 127.5 - 1
    mu[:, 8:11] = rgb[:, None, None, None]  # ...in magenta
    mu[:, 3:11, :, 0, 0] = 50.0  # a loud cell the object does not cover changes nothing
    read = lp.read_codes(mu, cover)
    assert read["shape"].tolist() == [[SHAPE_NAMES.index("triangle")] * 2]
    assert read["direction"].tolist() == [[DIRECTIONS.index("up")] * 2]
    assert read["colour"].tolist() == [[list(COLOURS).index("magenta")] * 2]


def test_motion_error_is_zero_for_the_domains_speed_across_the_wrap_and_grows_with_jitter() -> None:
    f = np.arange(9)[None, :, None]
    path = np.mod(np.array([60.0, 3.0]) + 1.5 * f * np.array([1.0, 0.0]), 64)  # crosses the right edge
    assert lp.motion_error(path) == pytest.approx((0.0, 100.0), abs=1e-9)
    jitter = path + np.array([0.2, 0.0]) * (-1.0) ** f  # every other frame 0.2 px back, the others ahead
    err, temporal = lp.motion_error(jitter)
    assert err == pytest.approx(0.4) and temporal == pytest.approx(100 * np.exp(-0.4))


def _synthetic_latents(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Clips of 9 frames moving 1.5 px a frame; their 3 latent frames hold a bump where the object is at
    the frame each latent frame ends on, its sub-cell offset, and the direction."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 64, (n, 1, 2))
    v = np.array([(1, 0), (-1, 0), (0, 1), (0, -1)])[rng.integers(0, 4, n)][:, None]
    c = np.mod(start + 1.5 * np.arange(9)[None, :, None] * v, 64)  # [n, 9, 2]
    centres = (np.arange(8) + 0.5) * 8
    z = np.zeros((n, 4, 3, 8, 8), np.float32)
    for k, f in enumerate((0, 4, 8)):
        dx = lp.wrapped(centres[None, :] - c[:, f, 0, None], 64)[:, None, :] / 8
        dy = lp.wrapped(centres[None, :] - c[:, f, 1, None], 64)[:, :, None] / 8
        z[:, 0, k] = np.exp(-(dx**2 + dy**2) / 2)
        z[:, 1, k], z[:, 2, k] = np.exp(-(dx**2) / 2) * dx, np.exp(-(dy**2) / 2) * dy
        z[:, 3, k] = v[:, 0, 0, None, None] + 2 * v[:, 0, 1, None, None]
    return torch.from_numpy(z), c


def test_position_probe_reads_where_the_latent_puts_the_object_and_not_a_shuffled_one() -> None:
    """--position's probe: fitted on latents that hold the position it finds held-out objects to within a
    pixel (a guess on the 64 px canvas is off by about 23) and their motion to a fraction of one; fitted to
    the same latents with the clips' centroids shuffled it cannot."""
    z, c = _synthetic_latents(600, 0)
    zt, ct = _synthetic_latents(100, 1)
    probe = lp.fit_position_probe(z, c, steps=300, width=32)
    blind = lp.fit_position_probe(z, c[np.random.default_rng(2).permutation(len(c))], steps=300, width=32)
    off = lp.wrapped(probe.centroids(zt) - ct, 64)
    off_blind = lp.wrapped(blind.centroids(zt) - ct, 64)
    assert np.hypot(off[..., 0], off[..., 1]).mean() < 1.5
    assert np.hypot(off_blind[..., 0], off_blind[..., 1]).mean() > 8
    assert lp.motion_error(probe.centroids(zt))[0] < 0.5


def test_position_figures_on_the_shipped_model() -> None:
    """The --position run end to end on the embedded model (few clips, a short probe): the ground truth
    moves at the domain's speed, and the shipped decoder's round trips and the student's latents through
    it move within half a pixel of it per frame (version 6's decoder, at full size: 0.29 and 0.35 px)."""
    vae_path = str(embedded_file("shapes", "vae"))
    out = lp.position(load_wan_vae(vae_path).eval(), clips=16, steps=20, decoders=[vae_path],
                      student="embedded:shapes", held_out=16, student_prompts=8)  # fmt: skip
    assert out["truth"][0] < 0.01 and out["truth"][1] > 99
    assert out[f"round trip {vae_path}"][0] < 0.5
    assert out[f"student through {vae_path}"][0] < 0.6
    assert np.isfinite(out["probe on the student"][0])
