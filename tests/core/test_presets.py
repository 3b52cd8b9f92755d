"""The model presets have exactly the key names and shapes of Wan2.1 as ComfyUI builds it.

Built on the ``meta`` device, so the 1.3B and 14B models cost no memory: a real Wan checkpoint
(official or ComfyUI-repackaged) therefore loads into the preset with no key or shape surprise,
and a checkpoint saved from the preset is detected by ComfyUI as the same Wan2.1 T2V model.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from causvid_core.config import PRESETS, DiTConfig
from causvid_core.model import CausalWanModel
from tests.helpers import comfy_wan

WAN_PRESETS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"]


def comfy_wan_meta(cfg: DiTConfig) -> nn.Module:
    """ComfyUI's WanModel (model_type 't2v') at ``cfg``'s sizes, on the meta device."""
    with torch.device("meta"):
        return comfy_wan(cfg, "meta")


def ours_meta(cfg: DiTConfig) -> CausalWanModel:
    with torch.device("meta"):
        return CausalWanModel(cfg)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def wan_param_count(cfg: DiTConfig) -> int:
    """Parameters of a Wan2.1 T2V DiT counted from its layer list (REFERENCE.md key names)."""
    d, f = cfg.dim, cfg.ffn_dim
    patch = math.prod(cfg.patch_size)

    def linear(i: int, o: int) -> int:
        return i * o + o

    attention = 4 * linear(d, d) + 2 * d  # q, k, v, o + norm_q, norm_k
    block = 2 * attention + 2 * d + linear(d, f) + linear(f, d) + 6 * d  # + norm3, ffn, modulation
    top = cfg.in_dim * patch * d + d  # patch_embedding
    top += linear(cfg.text_dim, d) + linear(d, d) + linear(cfg.freq_dim, d) + linear(d, d) + linear(d, 6 * d)
    top += linear(d, cfg.out_dim * patch) + 2 * d  # head.head, head.modulation
    return cfg.num_layers * block + top


@pytest.mark.parametrize("name", [*WAN_PRESETS, "tiny"])
def test_preset_matches_comfyui_keys_and_shapes(comfy_root, name: str) -> None:
    """Every key and shape of the preset equals ComfyUI's WanModel at the same sizes."""
    cfg = PRESETS[name].dit
    ours, theirs = shapes(ours_meta(cfg)), shapes(comfy_wan_meta(cfg))
    missing, unexpected = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    wrong = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not wrong, f"shape mismatches (ours, ComfyUI): {wrong}"


@pytest.mark.parametrize("name", WAN_PRESETS)
def test_comfyui_detects_preset_state_dict_as_same_model(comfy_root, name: str) -> None:
    """ComfyUI's checkpoint detection reads a preset's state dict back as Wan2.1 T2V at its sizes."""
    import comfy.model_detection

    cfg = PRESETS[name].dit
    detected = comfy.model_detection.detect_unet_config(ours_meta(cfg).state_dict(), "")
    expected = {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "freq_dim": cfg.freq_dim,
        "patch_size": cfg.patch_size,
        "eps": cfg.eps,
        "qk_norm": cfg.qk_norm,
        "cross_attn_norm": cfg.cross_attn_norm,
    }
    assert {k: detected.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("name", "low", "high"), [(WAN_PRESETS[0], 1.3e9, 1.5e9), (WAN_PRESETS[1], 13.5e9, 15e9)]
)
def test_preset_parameter_count(name: str, low: float, high: float) -> None:
    """The 1.3B preset has about 1.3e9 parameters and the 14B about 14e9, as Wan's layer list gives."""
    cfg = PRESETS[name].dit
    count = sum(p.numel() for p in ours_meta(cfg).parameters())
    assert count == wan_param_count(cfg)
    assert low < count < high


@pytest.mark.parametrize("name", WAN_PRESETS)
def test_preset_settings_no_shape_shows_are_wans(name: str) -> None:
    """Settings invisible in the shapes are Wan2.1's: head_dim 128, eps 1e-6, 512 text tokens, T2V."""
    cfg = PRESETS[name].dit
    assert (cfg.head_dim, cfg.eps, cfg.text_len, cfg.rope_theta) == (128, 1e-6, 512, 10000.0)
    assert cfg.qk_norm and cfg.cross_attn_norm and cfg.model_type == "t2v"
