"""The training data path through the real core VAE (not the weight-free stand-in)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from causvid_core.vae import VAE_PRESETS, WanVAE
from training.config import ConfigError
from training.distill import main


def _first_latents(runs: Path) -> torch.Tensor:
    shards = sorted(runs.rglob("shard_*.safetensors"))
    assert shards, "precompute wrote no shard"
    with safe_open(str(shards[0]), "pt") as f:
        return f.get_tensor("latents")


def test_precompute_encodes_shapes_with_the_core_vae(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weight VAE preset warning
        main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path / "core"), "--vae", "tiny"])
    main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path / "pool"), "--vae", "pool"])
    latents = _first_latents(tmp_path / "core")
    # 21 frames at 32x32 -> 1 + 20/4 = 6 latent frames of 4x4 with the VAE's 16 channels
    assert tuple(latents.shape[1:]) == (16, 6, 4, 4)
    assert torch.isfinite(latents).all() and latents.std() > 0
    pooled = _first_latents(tmp_path / "pool")  # the weight-free stand-in has the same shape: not it
    assert pooled.shape == latents.shape and not torch.allclose(latents, pooled, atol=1e-3)


def test_a_vae_checkpoint_file_is_used(tmp_path: Path) -> None:
    """--vae FILE encodes with that file's weights: another file gives other latents, the same file the same."""
    from safetensors.torch import save_file

    for seed in (0, 1):
        torch.manual_seed(seed)
        vae = WanVAE(VAE_PRESETS["tiny"])
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / f"vae{seed}.safetensors"))
    got = {}
    for name, file in (("a", "vae0"), ("b", "vae1"), ("again", "vae0")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path / name), "--vae",
                  str(tmp_path / f"{file}.safetensors")])  # fmt: skip
        assert not [w for w in caught if "random weights" in str(w.message)], "fell back to a random VAE"
        got[name] = _first_latents(tmp_path / name)
    assert torch.equal(got["a"], got["again"]) and not torch.allclose(got["a"], got["b"], atol=1e-3)


def test_missing_embedded_vae_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="embedded model 'embedded:nothing' has no vae weights.*docs/training.md"
    ):
        main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "embedded:nothing"])


def test_shards_made_with_other_settings_are_not_mixed_in(tmp_path: Path) -> None:
    """precompute (and ode-pairs) skip the shards a folder already holds, so a run with another --vae
    (or teacher, guidance, seed) into the same folder must stop rather than mix two datasets."""
    main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "pool"])
    main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "pool"])  # same: skipped
    with pytest.raises(ConfigError, match=r"holds shards made with other settings \(vae pool here, tiny now\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "tiny"])
