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


def test_precompute_encodes_shapes_with_the_core_vae(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weight VAE preset warning
        main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "tiny"])
    shards = sorted(tmp_path.rglob("*.safetensors"))
    assert shards, "precompute wrote no shard"
    with safe_open(str(shards[0]), "pt") as f:
        latents = f.get_tensor(next(k for k in f.keys() if "lat" in k))
    # 21 frames at 32x32 -> 1 + 20/4 = 6 latent frames of 4x4 with the VAE's 16 channels
    assert tuple(latents.shape[1:]) == (16, 6, 4, 4)
    assert torch.isfinite(latents).all() and latents.std() > 0


def test_a_vae_checkpoint_file_is_used(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vae = WanVAE(VAE_PRESETS["tiny"])
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), "--vae", str(path)])
    assert sorted((tmp_path / "runs").rglob("*.safetensors"))


def test_missing_embedded_vae_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="embedded model 'embedded:nothing' has no vae weights.*docs/training.md"
    ):
        main(["precompute", "--preset", "tiny", "--runs-dir", str(tmp_path), "--vae", "embedded:nothing"])
