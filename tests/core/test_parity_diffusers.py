"""CausalWanModel in bidirectional mode equals diffusers' WanTransformer3DModel on the same weights.

The weights go through ``wan_to_diffusers_key`` and load strictly into diffusers, so this also proves
the diffusers <-> Wan key mapping used by the checkpoint loader.
"""

from __future__ import annotations

import pytest
import torch

from causvid_core.checkpoint import diffusers_to_wan_key, wan_to_diffusers_key
from causvid_core.config import PRESETS, DiTConfig
from causvid_core.model import CausalWanModel

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "tiny": PRESETS["tiny"].dit,
    # head_dim 24: rope parts 8/8/8; non-square latents catch a row/column swap
    "heads3": DiTConfig(dim=72, ffn_dim=96, num_heads=3, num_layers=2, freq_dim=16, text_dim=24, text_len=7),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norms and modulation included) a random non-default value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("modulation"):
                p.copy_(0.3 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)


def diffusers_model(cfg: DiTConfig) -> torch.nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=1024,
    ).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bidirectional_forward_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ours = CausalWanModel(cfg).eval()
    randomize_(ours, seed=1)
    theirs = diffusers_model(cfg)
    converted = {wan_to_diffusers_key(k): v for k, v in ours.state_dict().items()}
    assert None not in converted, "every Wan key has a diffusers name"
    theirs.load_state_dict(converted, strict=True)

    x = torch.randn(2, cfg.in_dim, 3, 4, 6)  # [B, C, F, H, W]
    t = torch.tensor([937.0, 250.0])  # [B] raw timesteps
    context = torch.randn(2, cfg.text_len, cfg.text_dim)  # full text_len: no padding on our side
    with torch.no_grad():
        v_ours = ours(x, t, context)
        v_theirs = theirs(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    assert v_ours.shape == v_theirs.shape == x.shape
    rel = ((v_ours - v_theirs).norm() / v_theirs.norm()).item()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    # the outputs depend on the randomised norms and modulation, so the match is not vacuous
    assert v_theirs.std() > 0.1


def test_diffusers_names_round_trip() -> None:
    """Every diffusers parameter name maps to a Wan name and back."""
    cfg = CONFIGS["tiny"]
    with torch.device("meta"):
        wan_keys = set(CausalWanModel(cfg).state_dict())
        diff_keys = set(diffusers_model(cfg).state_dict())
    mapped = {diffusers_to_wan_key(k) for k in diff_keys}
    assert mapped == wan_keys
    assert {wan_to_diffusers_key(k) for k in mapped} == diff_keys
    assert diffusers_to_wan_key("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert diffusers_to_wan_key("scale_shift_table") == "head.modulation"
    assert diffusers_to_wan_key("blocks.0.scale_shift_table") == "blocks.0.modulation"
