"""Loading a model with its streaming settings: from the file, overridden by the user, clear errors."""

from __future__ import annotations

import pytest
import torch

from causvid_core.bundle import (
    embedded_file,
    load_bundle,
    parse_steps,
    part_file,
    settings_metadata,
    vae_file,
)
from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS, CausalConfig, SamplingConfig
from causvid_core.model import CausalWanModel


@pytest.fixture()
def saved(tmp_path):
    model = CausalWanModel(PRESETS["tiny"].dit)
    stats = tuple(float(i) for i in range(16)), tuple(1.0 + i for i in range(16))
    meta = settings_metadata(
        SamplingConfig(denoising_steps=(1000, 500)), CausalConfig(chunk_frames=1), 24, *stats
    )
    return model, save_model(model, tmp_path / "m.safetensors", extra_metadata=meta)


def test_settings_travel_with_the_file(saved) -> None:
    model, path = saved
    bundle = load_bundle(path, attention="math")
    assert bundle.sampling.denoising_steps == (1000, 500)
    assert bundle.causal.chunk_frames == 1 and bundle.fps == 24
    assert bundle.model.attn_backend == "math"
    assert bundle.latents_mean[3] == 3.0 and bundle.latents_std[3] == 4.0
    z = torch.randn(1, 16, 2, 4, 4)
    raw = bundle.to_raw(z)
    assert torch.allclose(raw[0, 3], z[0, 3] * 4.0 + 3.0) and torch.allclose(
        bundle.to_model(raw), z, atol=1e-6
    )
    with pytest.raises(ValueError, match="latent has 4 channels but the model works on 16"):
        bundle.to_model(torch.randn(1, 4, 1, 2, 2))
    for key, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value)


def test_user_settings_override_the_file(saved) -> None:
    _, path = saved
    bundle = load_bundle(path, chunk_frames=3, denoising_steps="1000, 757, 522")
    assert bundle.causal.chunk_frames == 3 and bundle.sampling.denoising_steps == (1000, 757, 522)


def test_plain_files_get_the_released_defaults(tmp_path) -> None:
    path = save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "plain.safetensors")
    bundle = load_bundle(path)
    assert bundle.sampling.denoising_steps == (1000, 757, 522) and bundle.causal.chunk_frames == 3


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="comma-separated integers like '1000, 757, 522'"):
        parse_steps("1000, fast")
    with pytest.raises(FileNotFoundError, match=r"embedded model 'embedded:nope' has no dit weights"):
        load_bundle("embedded:nope")


def test_a_vae_is_named_by_file_or_embedded_name_everywhere(tmp_path) -> None:
    shipped = embedded_file("shapes", "vae")
    assert vae_file("embedded:shapes") == shipped  # --vae embedded:shapes (eval, zero_shot, generate)
    assert vae_file(None, "embedded:shapes") == shipped  # no --vae: the embedded model's own
    assert vae_file(None, str(tmp_path / "dit.safetensors")) is None  # a checkpoint: the caller asks for one
    own = tmp_path / "vae.safetensors"
    own.write_bytes(b"x")
    assert vae_file(str(own), "embedded:shapes") == own  # the user's VAE wins over the embedded one
    with pytest.raises(
        FileNotFoundError, match=r"VAE file .*missing.safetensors not found: give a Wan2.1 VAE"
    ):
        vae_file(str(tmp_path / "missing.safetensors"))


def test_any_part_of_an_embedded_model_is_named_the_same_way(tmp_path, monkeypatch) -> None:
    """``embedded:NAME`` names one part's file wherever a part is asked for (--student's DiT, eval's
    --teacher, a run's VAE); a file path passes through; a part the model lacks is a clear error."""
    for part in ("dit", "vae", "text", "teacher"):
        assert part_file("embedded:shapes", part) == embedded_file("shapes", part)
    own = tmp_path / "student.safetensors"
    assert part_file(own, "dit") == own and part_file(str(own), "dit") == own
    local = tmp_path / "mine"
    local.mkdir()
    (local / "dit.safetensors").write_bytes(b"x")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    assert part_file("embedded:mine", "dit") == local / "dit.safetensors"
    with pytest.raises(FileNotFoundError, match=r"embedded model 'embedded:mine' has no teacher weights"):
        part_file("embedded:mine", "teacher")
