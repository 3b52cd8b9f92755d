"""Test helpers: small random models laid out like the shipped ones."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from causvid_core.bundle import settings_metadata
from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS, CausalConfig, SamplingConfig
from causvid_core.model import CausalWanModel
from causvid_core.text import ShapesTextEncoder
from causvid_core.vae import VAE_PRESETS, WanVAE


def make_embedded(root: Path, name: str = "testshapes", seed: int = 0) -> Path:
    """Write a tiny random DiT + Shapes text encoder as ``root/name`` (use with CAUSVID_EMBEDDED_PATH)."""
    torch.manual_seed(seed)
    tiny = PRESETS["tiny"]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model = CausalWanModel(tiny.dit)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = settings_metadata(SamplingConfig(), CausalConfig(chunk_frames=3, window_chunks=2), 16)
    save_model(model, folder / "dit.safetensors", extra_metadata=meta)
    text = ShapesTextEncoder(text_dim=tiny.dit.text_dim, text_len=tiny.dit.text_len, seed=seed)
    save_file(text.state_dict(), str(folder / "text.safetensors"))
    vae = WanVAE(VAE_PRESETS["tiny"])
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    return folder
