"""scripts/latent_probe.py: the figures docs/reproduction.md gives for what a VAE's latent holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from causvid_core.bundle import embedded_file
from causvid_core.vae import load_wan_vae

_spec = importlib.util.spec_from_file_location(
    "latent_probe", Path(__file__).resolve().parents[2] / "scripts" / "latent_probe.py"
)
lp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lp)


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster beside another busy process
    try:
        vae = load_wan_vae(embedded_file("shapes", "vae")).eval()
        encoded = lp.encode_clips(vae, 24, 9)
        codes = lp.code_accuracy(vae, encoded=encoded)
        out = lp.probe(vae, encoded=encoded)
    finally:
        torch.set_num_threads(threads)
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
