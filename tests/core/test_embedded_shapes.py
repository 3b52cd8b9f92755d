"""The shipped embedded:shapes model (trained by training/, docs/reproduction.md): it is installed with
the package, fits the 25 MB budget, carries its model card, and renders at its natural size."""

from __future__ import annotations

import pytest
import torch

from causvid_core.bundle import EMBEDDED_ROOT, load_bundle
from causvid_core.vae import latent_stats_of, load_wan_vae

FOLDER = EMBEDDED_ROOT / "shapes"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _shipped_only(monkeypatch):
    """No test override: the package's own files."""
    monkeypatch.delenv("CAUSVID_EMBEDDED_PATH", raising=False)


def test_shipped_weights_fit_the_budget_and_say_how_they_were_made() -> None:
    files = sorted(p.name for p in FOLDER.glob("*.safetensors"))
    assert files == ["dit.safetensors", "teacher.safetensors", "text.safetensors", "vae.safetensors"]
    assert sum(p.stat().st_size for p in FOLDER.glob("*.safetensors")) <= 25_000_000
    card = (FOLDER / "MODEL_CARD.md").read_text()
    # the recipe down to the shipped student's stage (versions 6 to 10: ODE init from the causal teacher)
    for needed in ("-m training.distill vae", "-m training.distill teacher --kind causal",
                   "-m training.distill ode-init", "wall time", "seed", "text_alignment"):  # fmt: skip
        assert needed in card, needed


def test_student_and_vae_agree_and_stream_a_video() -> None:
    bundle = load_bundle("embedded:shapes")
    stats = latent_stats_of(FOLDER / "vae.safetensors")
    assert stats is not None and tuple(bundle.latents_mean) == stats[0] and tuple(bundle.latents_std) == stats[1]
    from causvid_core.stream import StreamingGenerator

    vae = load_wan_vae(FOLDER / "vae.safetensors")
    prompt = bundle.text_encoder.encode(["a red circle moving right"])
    gen = StreamingGenerator(bundle.model, prompt, latent_size=(8, 8), sampling=bundle.sampling,
                             causal=bundle.causal)  # fmt: skip
    decoder = vae.stream_decoder()
    with torch.no_grad():
        frames = torch.cat([decoder.decode(gen.next_chunk()) for _ in range(3)], dim=2)
    assert frames.shape == (1, 3, 33, 64, 64) and torch.isfinite(frames).all()
    assert frames.std() > 0.1  # a picture, not a flat frame
