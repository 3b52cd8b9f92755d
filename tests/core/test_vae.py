"""The Wan2.1 VAE: parity with ComfyUI's and diffusers' implementations, exact streaming, loading, errors."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from causvid_core.config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig
from causvid_core.vae import (
    VAE_PRESETS,
    Tiling,
    VAEStreamState,
    WanVAE,
    infer_vae_config,
    load_wan_vae,
    to_wan_keys,
)
from causvid_core.vae_stream import tiled_apply

PARITY = VAEConfig(base_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=2)  # Wan's layout at 1/12 width
TINY = VAE_PRESETS["tiny"]
TOL = 1e-4  # relative max error against the other implementations, fp32


def random_state(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Random weights for every tensor: gains around 1 (not 1), biases non-zero, outputs of O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=gen)
        if name.endswith("gamma"):
            out[name] = 1.0 + 0.3 * noise
        elif name.endswith("bias"):
            out[name] = 0.1 * noise
        else:
            fan_in = ref[0].numel()
            out[name] = noise / fan_in**0.5
    out["decoder.head.2.weight"] *= 0.3  # keep most decoded values inside -1..1, where clamping is a no-op
    return out


def make_vae(cfg: VAEConfig, seed: int = 0) -> WanVAE:
    vae = WanVAE(cfg)
    vae.load_state_dict(random_state(vae, seed))
    return vae.eval().requires_grad_(False)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def comfy_vae(cfg: VAEConfig) -> nn.Module:
    """ComfyUI's WanVAE built as comfy/sd.py builds the Wan2.1 VAE (its layers use comfy.ops)."""
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(
        dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def parity_vae() -> WanVAE:
    return make_vae(PARITY, seed=1)


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return make_vae(TINY, seed=2)


def test_wan21_preset_has_comfyui_key_names_and_shapes(comfy_root: Path) -> None:
    with torch.device("meta"):
        ours = WanVAE(VAE_PRESETS["wan2.1"]).state_dict()
        theirs = comfy_vae(VAE_PRESETS["wan2.1"]).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert infer_vae_config(ours) == VAE_PRESETS["wan2.1"]


def test_encode_and_decode_match_comfyui(comfy_root: Path, parity_vae: WanVAE) -> None:
    ref = comfy_vae(PARITY)
    ref.load_state_dict(parity_vae.state_dict())
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, 16, 3, 4, 6)
    with torch.no_grad():
        assert rel_err(parity_vae.encode_raw(video), ref.encode(video)) < TOL  # mu, [1, 16, 3, 4, 6]
        assert rel_err(parity_vae.decode_raw(z, clamp=False), ref.decode(z)) < TOL  # [1, 3, 9, 32, 48]


def test_encode_and_decode_match_diffusers(parity_vae: WanVAE) -> None:
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = AutoencoderKLWan(base_dim=PARITY.base_dim, z_dim=16, dim_mult=list(PARITY.dim_mult),
                           num_res_blocks=PARITY.num_res_blocks, temperal_downsample=list(PARITY.temporal_downsample))  # fmt: skip
    diffusers_sd = convert_wan_vae_to_diffusers(dict(parity_vae.state_dict()))
    ref.load_state_dict(diffusers_sd)
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    z = torch.randn(1, 16, 2, 2, 3)
    with torch.no_grad():
        assert rel_err(parity_vae.encode_raw(video), ref.encode(video).latent_dist.mean) < TOL
        assert rel_err(parity_vae.decode_raw(z), ref.decode(z).sample) < TOL  # both clamp to -1..1
    # our loader reads diffusers' names back to Wan's
    ours = parity_vae.state_dict()
    back = to_wan_keys(diffusers_sd)
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_latent_constants_are_wans(comfy_root: Path) -> None:
    import comfy.latent_formats
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(WAN21_LATENTS_MEAN) == params["latents_mean"].default
    assert list(WAN21_LATENTS_STD) == params["latents_std"].default
    wan21 = comfy.latent_formats.Wan21()
    assert torch.allclose(wan21.latents_mean.flatten(), torch.tensor(WAN21_LATENTS_MEAN))
    assert torch.allclose(wan21.latents_std.flatten(), torch.tensor(WAN21_LATENTS_STD))


def test_normalised_encode_and_decode(tiny_vae: WanVAE) -> None:
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mu = tiny_vae.encode_raw(video)
    mean = torch.tensor(TINY.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.latents_std).view(1, -1, 1, 1, 1)
    z = tiny_vae.encode(video)
    torch.testing.assert_close(z, (mu - mean) / std)
    torch.testing.assert_close(tiny_vae.decode(z), tiny_vae.decode_raw(mu), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunks", [[1] * 7, [2, 2, 2, 1], [3, 3, 1], [3, 3, 3]], ids=str)
def test_streaming_decode_equals_full_decode(tiny_vae: WanVAE, chunks: list[int]) -> None:
    z = torch.randn(1, 16, sum(chunks), 4, 6)
    full = tiny_vae.decode(z)
    assert full.shape == (1, 3, 1 + 4 * (sum(chunks) - 1), 32, 48)
    decoder = tiny_vae.stream_decoder()
    parts, start = [], 0
    for n in chunks:
        parts.append(decoder.decode(z[:, :, start : start + n]))
        start += n
    assert [p.shape[2] for p in parts] == [1 + 4 * (chunks[0] - 1)] + [4 * n for n in chunks[1:]]
    assert (torch.cat(parts, dim=2) - full).abs().max() <= 1e-5


def test_decode_in_small_passes_equals_one_pass(tiny_vae: WanVAE) -> None:
    z = torch.randn(1, 16, 5, 4, 4)
    assert (tiny_vae.decode(z, frames_per_pass=1) - tiny_vae.decode(z)).abs().max() <= 1e-5


@pytest.mark.parametrize("chunks", [[1, 4, 4, 4, 4], [5, 8, 4], [9, 8], [17]], ids=str)
def test_streaming_encode_equals_full_encode(tiny_vae: WanVAE, chunks: list[int]) -> None:
    video = torch.rand(1, 3, sum(chunks), 16, 24) * 2 - 1
    full = tiny_vae.encode(video)
    assert full.shape == (1, 16, 5, 2, 3)
    encoder = tiny_vae.stream_encoder()
    parts, start = [], 0
    for n in chunks:
        parts.append(encoder.encode(video[:, :, start : start + n]))
        start += n
    assert rel_err(torch.cat(parts, dim=2), full) <= 1e-5
    assert rel_err(tiny_vae.encode(video, frames_per_pass=1), full) <= 1e-5


def test_streams_share_no_hidden_state(tiny_vae: WanVAE) -> None:
    """Two interleaved streams on one module give what each gives alone; the state stays a fixed size."""
    a, b = torch.randn(1, 16, 6, 4, 4), torch.randn(1, 16, 6, 4, 4)
    sa, sb = VAEStreamState("decode"), VAEStreamState("decode")
    out_a, out_b, sizes = [], [], []
    for i in range(0, 6, 2):
        out_a.append(tiny_vae.decode(a[:, :, i : i + 2], sa))
        out_b.append(tiny_vae.decode(b[:, :, i : i + 2], sb))
        sizes.append(sa.nbytes())
    assert (torch.cat(out_a, 2) - tiny_vae.decode(a)).abs().max() <= 1e-5
    assert (torch.cat(out_b, 2) - tiny_vae.decode(b)).abs().max() <= 1e-5
    assert sizes[1] == sizes[2] > 0  # the cache does not grow with the video's length
    assert sa.frames_in == 6 and sa.frames_out == 1 + 4 * 5


def test_tiled_blend_is_seamless_for_a_local_map() -> None:
    """With a per-pixel map (no context), blended overlapping tiles reproduce the untiled result exactly."""
    x = torch.randn(1, 2, 3, 10, 13)

    def upsample(t: Tensor, _: VAEStreamState) -> Tensor:
        return t.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2) * 2.0

    out = tiled_apply(upsample, x, VAEStreamState("decode"), Tiling(tile=4, overlap=2), 1, 8)
    torch.testing.assert_close(out, upsample(x, None))


def test_tiled_streaming_decode(tiny_vae: WanVAE) -> None:
    z = torch.randn(1, 16, 4, 6, 8)
    tiling = Tiling(tile=4, overlap=2)
    full = tiny_vae.decode(z, tiling=tiling)
    assert full.shape == (1, 3, 13, 48, 64) and full.isfinite().all()
    decoder = tiny_vae.stream_decoder(tiling)
    chunked = torch.cat([decoder.decode(z[:, :, i : i + 2]) for i in (0, 2)], dim=2)
    assert (chunked - full).abs().max() <= 1e-5
    assert len(decoder.state.tiles) == 6  # 2 rows x 3 columns, each with its own causal state
    one_tile = tiny_vae.decode(z, tiling=Tiling(tile=8, overlap=2))
    assert (one_tile - tiny_vae.decode(z)).abs().max() <= 1e-5


def test_tiled_streaming_encode(tiny_vae: WanVAE) -> None:
    video = torch.rand(1, 3, 9, 48, 32) * 2 - 1
    tiling = Tiling(tile=4, overlap=2)
    full = tiny_vae.encode(video, tiling=tiling)
    assert full.shape == (1, 16, 3, 6, 4) and full.isfinite().all()
    encoder = tiny_vae.stream_encoder(tiling)
    chunked = torch.cat([encoder.encode(video[:, :, :5]), encoder.encode(video[:, :, 5:])], dim=2)
    assert rel_err(chunked, full) <= 1e-5


def test_bad_inputs_have_clear_errors(tiny_vae: WanVAE) -> None:
    with pytest.raises(
        ValueError, match=r"expected a latent \[B, 16.*48-channel latent comes from the Wan2.2"
    ):
        tiny_vae.decode(torch.randn(1, 48, 2, 4, 4))
    with pytest.raises(ValueError, match=r"expected video \[B, 3, frames, H, W\].*image_to_vae"):
        tiny_vae.encode(torch.rand(5, 16, 16, 3))
    with pytest.raises(ValueError, match=r"values must lie in -1..1, got 0.*2.*image_to_vae"):
        tiny_vae.encode(torch.rand(1, 3, 5, 16, 16) * 2 + 0.1)
    with pytest.raises(ValueError, match=r"not a multiple of 8: crop or pad to 16x16"):
        tiny_vae.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(ValueError, match=r"first chunk of a video needs 1 \+ 4k frames .* got 4: use 1 or 5"):
        tiny_vae.encode(torch.zeros(1, 3, 4, 16, 16))
    encoder = tiny_vae.stream_encoder()
    encoder.encode(torch.zeros(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"chunks after the first need a multiple of 4 frames, got 3"):
        encoder.encode(torch.zeros(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match=r"started with frames of 16x16 but got 24x16.*reset"):
        encoder.encode(torch.zeros(1, 3, 4, 24, 16))


def _tiny_with_weights() -> tuple[WanVAE, dict[str, Tensor]]:
    vae = make_vae(TINY, seed=4)
    return vae, {k: v.clone() for k, v in vae.state_dict().items()}


def test_loads_wan_pth_and_comfyui_safetensors(tmp_path: Path) -> None:
    vae, sd = _tiny_with_weights()
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file(sd, str(tmp_path / "wan_2.1_vae.safetensors"))
    z = torch.randn(1, 16, 2, 2, 2)
    for name in ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"):
        loaded = load_wan_vae(tmp_path / name)  # config read from the shapes
        assert loaded.config == TINY
        assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
        assert torch.equal(loaded.decode(z), vae.decode(z))
    prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()}
    assert load_wan_vae(prefixed, TINY).config == TINY


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, (f"touch {self.marker}",))


def test_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"encoder.conv1.weight": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(
        ValueError, match=r"evil.pth is a pickle that needs to run code.*refused.*safetensors"
    ):
        load_wan_vae(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError, match=r"cannot read cut.pth as a torch checkpoint .*is the file complete"):
        load_wan_vae(tmp_path / "cut.pth")


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path: Path) -> None:
    _, sd = _tiny_with_weights()
    del sd["decoder.head.2.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["conv1.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as err:
        load_wan_vae(sd, TINY)
    msg = str(err.value)
    assert "1 missing: decoder.head.2.bias" in msg
    assert "1 unexpected: decoder.extra.weight" in msg
    assert "conv1.bias: file [5] vs model [32]" in msg
    with pytest.raises(FileNotFoundError, match="VAE file not found"):
        load_wan_vae(tmp_path / "absent.safetensors")
