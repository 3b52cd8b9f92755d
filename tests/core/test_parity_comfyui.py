"""CausalWanModel in bidirectional mode equals the host's own Wan2.1 DiT (comfy.ldm.wan.model.WanModel).

Both models get the same random weights (every tensor randomised, norm weights and modulation
included) through a strict state-dict load, so equal outputs prove the key names, the RoPE split
and pair layout, the (frame, row, column) token order, the time embedding, the modulation order,
the head and the unpatchify order all agree with what ComfyUI runs for Wan checkpoints.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from causvid_core.config import PRESETS, DiTConfig
from causvid_core.model import CausalWanModel
from tests.helpers import comfy_wan

CFG: DiTConfig = PRESETS["tiny"].dit  # head_dim 16 -> RoPE parts 8 (frame) / 4 (row) / 4 (column)
TOL = 1e-4  # relative L2 error, fp32 on CPU
BATCH, FRAMES, LAT_H, LAT_W = 2, 5, 4, 6  # several frames, non-square latent (grid 5 x 2 x 3)


def random_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A random value for every tensor of ``model``'s state dict, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=gen)
        if "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.3 * noise  # RMSNorm / LayerNorm gains
        elif name.endswith("modulation"):
            value = 0.3 * noise
        elif name.endswith(".bias") or ref.ndim < 2:
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(math.prod(ref.shape[1:]))  # linear / conv weights: 1/sqrt(fan_in)
        out[name] = value
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pair(comfy_root) -> tuple[CausalWanModel, nn.Module]:
    """Our model with random weights, and ComfyUI's WanModel loaded strictly from our state dict."""
    ours = CausalWanModel(CFG).eval()
    ours.load_state_dict(random_state(ours, seed=1), strict=True)
    theirs = comfy_wan(CFG).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.fixture
def inputs() -> tuple[Tensor, Tensor, Tensor]:
    """Latents [B, C, F, H, W], one timestep per sample [B], text of the full text_len."""
    x = torch.randn(BATCH, CFG.in_dim, FRAMES, LAT_H, LAT_W)
    t = torch.tensor([999.0, 318.0])
    context = torch.randn(BATCH, CFG.text_len, CFG.text_dim)
    return x, t, context


def test_state_dict_loads_strictly_both_ways(comfy_root) -> None:
    """A ComfyUI Wan state dict loads into ours with strict=True and back, every tensor unchanged."""
    theirs = comfy_wan(CFG)
    src = random_state(theirs, seed=2)
    theirs.load_state_dict(src, strict=True)
    ours = CausalWanModel(CFG)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = comfy_wan(CFG)
    back.load_state_dict(ours.state_dict(), strict=True)
    ours_sd, back_sd = ours.state_dict(), back.state_dict()
    assert list(ours_sd) == list(src), "parameter order/names differ from ComfyUI's WanModel"
    for name, value in src.items():
        assert ours_sd[name].shape == value.shape, name
        assert torch.equal(ours_sd[name], value), name
        assert torch.equal(back_sd[name], value), name


@torch.no_grad()
def test_bidirectional_forward_matches_comfyui(pair, inputs) -> None:
    """Same weights, latents, timesteps [B] and full-length text -> the same velocity prediction."""
    ours, theirs = pair
    x, t, context = inputs
    expected = theirs(x, t, context)
    got = ours(x, t, context)
    assert got.shape == expected.shape == x.shape
    assert rel_err(got, expected) < TOL


@torch.no_grad()
def test_precomputed_text_and_single_chunk_mask_match_comfyui(pair, inputs) -> None:
    """The cached-prompt path (CrossKV) and a one-chunk block-causal mask are still the teacher."""
    ours, theirs = pair
    x, t, context = inputs
    expected = theirs(x, t, context)
    assert rel_err(ours(x, t, ours.encode_context(context)), expected) < TOL
    assert rel_err(ours(x, t, context, chunk_sizes=[FRAMES]), expected) < TOL


@torch.no_grad()
def test_short_text_is_zero_padded_like_comfyui(pair, inputs) -> None:
    """Ours pads a short prompt with zeros to text_len, as ComfyUI's UMT5 encoder output already is."""
    ours, theirs = pair
    x, t, _ = inputs
    short = torch.randn(BATCH, 5, CFG.text_dim)
    padded = F.pad(short, (0, 0, 0, CFG.text_len - short.shape[1]))
    expected = theirs(x, t, padded)
    assert rel_err(ours(x, t, short), expected) < TOL
    # padding is not a no-op: the pad rows become non-zero after text_embedding and are attended to
    assert rel_err(theirs(x, t, short), expected) > 100 * TOL


@torch.no_grad()
def test_per_frame_timesteps_match_comfyui(pair, inputs) -> None:
    """Timesteps [B, F] give per-frame modulation in every block and the head, as in ComfyUI."""
    ours, theirs = pair
    x, _, context = inputs
    t = torch.tensor([[1000.0, 757.0, 522.0, 250.0, 0.0], [0.0, 40.0, 400.0, 800.0, 960.0]])
    expected = theirs(x, t, context)
    assert rel_err(ours(x, t, context), expected) < TOL
    # the per-frame path is really exercised: a single timestep per sample gives another output
    assert rel_err(theirs(x, t[:, 0], context), expected) > 100 * TOL


@pytest.mark.parametrize("axis", ["t", "y", "x"])
@torch.no_grad()
def test_each_rope_axis_is_visible_at_this_size(pair, inputs, axis: str) -> None:
    """Guard for the tests above: moving one RoPE axis changes ComfyUI's output far beyond TOL."""
    _, theirs = pair
    x, t, context = inputs
    baseline = theirs(x, t, context)
    stretched = theirs(x, t, context, transformer_options={"rope_options": {f"scale_{axis}": 2.0}})
    assert rel_err(stretched, baseline) > 100 * TOL
