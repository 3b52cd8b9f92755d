"""Checkpoint loading: every layout loads to the same model, configs are inferred, errors are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from causvid_core.checkpoint import (
    CheckpointError,
    describe,
    detect_layout,
    infer_config,
    load_model,
    read_state_dict,
    save_model,
    wan_to_diffusers_key,
)
from causvid_core.cli import SUBCOMMANDS, main
from causvid_core.config import PRESETS, DiTConfig
from causvid_core.hub import HubDownloadError
from causvid_core.model import CausalWanModel

REPO = Path(__file__).resolve().parents[2]
# head_dim 128 and text_len 512, so shapes alone determine the whole config
SMALL = DiTConfig(dim=256, ffn_dim=192, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for every parameter (norms and modulation included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = p[0].numel() ** -0.5 if p.ndim >= 2 and not name.endswith("modulation") else 0.3
            p.copy_(noise * scale + (1.0 if "norm" in name else 0.0))
    return model.eval()


def run(model: CausalWanModel) -> torch.Tensor:
    """The model's prediction on fixed inputs."""
    cfg = model.config
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=gen)  # [B, C, F, H, W]
    context = torch.randn(1, 8, cfg.text_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([600.0]), context)


@pytest.fixture(scope="module")
def source() -> CausalWanModel:
    return randomize_(CausalWanModel(SMALL), seed=3)


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _assert_same_model(loaded: CausalWanModel, expected: CausalWanModel) -> None:
    assert loaded.config == expected.config
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(run(loaded), run(expected), rtol=0, atol=0)


# -- one test per layout ---------------------------------------------------------------------
def test_causvid_release_pickle(tmp_path: Path, source: CausalWanModel) -> None:
    path = tmp_path / "model.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in _sd(source).items()}}, path)
    model, report = load_model(path)
    assert report.layout == "causvid" and report.config_source == "inferred from shapes"
    _assert_same_model(model, source)


def test_self_forcing_prefers_ema_and_strips_wrappers(tmp_path: Path, source: CausalWanModel) -> None:
    other = randomize_(CausalWanModel(SMALL), seed=99)
    wrap = {k: "model._fsdp_wrapped_module." + k.replace("blocks.", "_orig_mod.blocks.") for k in _sd(source)}
    path = tmp_path / "self_forcing.pt"
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in _sd(other).items()},
            "generator_ema": {wrap[k]: v for k, v in _sd(source).items()},
            "critic": {"x": torch.zeros(1)},
        },
        path,
    )
    model, report = load_model(path)
    assert report.layout == "self-forcing"
    _assert_same_model(model, source)  # the EMA weights, not the raw generator's


def test_wan_single_file_and_plain_pickle(tmp_path: Path, source: CausalWanModel) -> None:
    save_file(_sd(source), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model, report = load_model(tmp_path / "diffusion_pytorch_model.safetensors")
    assert report.layout == "wan"
    _assert_same_model(model, source)
    torch.save(_sd(source), tmp_path / "wan.pth")
    model, report = load_model(tmp_path / "wan.pth")
    assert report.layout == "pickle"
    _assert_same_model(model, source)


def test_wan_sharded_with_index(tmp_path: Path, source: CausalWanModel) -> None:
    sd = _sd(source)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    wan_config = {"_class_name": "WanModel", "model_type": "t2v", "dim": 256, "ffn_dim": 192, "num_heads": 2,
                  "num_layers": 2, "freq_dim": 32, "text_dim": 32, "text_len": 512, "in_dim": 16,
                  "out_dim": 16, "eps": 1e-6, "window_size": [-1, -1]}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(wan_config))  # as in Wan-AI/Wan2.1-T2V-14B
    for target, how in ((tmp_path / "diffusion_pytorch_model.safetensors.index.json", "inferred from shapes"),
                        (tmp_path, "config.json")):  # fmt: skip
        model, report = load_model(target)
        assert report.layout == "wan-sharded" and report.config_source == how
        _assert_same_model(model, source)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard diffusion_pytorch_model-00002-of-00002.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_comfyui_repackaged_half(tmp_path: Path, source: CausalWanModel, dtype: torch.dtype) -> None:
    path = tmp_path / "wan2.1_t2v_fp16.safetensors"
    save_file({f"model.diffusion_model.{k}": v.to(dtype) for k, v in _sd(source).items()}, str(path))
    model, report = load_model(path)
    assert report.layout == "comfyui" and report.dtype == dtype
    assert {p.dtype for p in model.parameters()} == {dtype}
    rounded = CausalWanModel(SMALL).eval()
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in _sd(source).items()})
    model32, _ = load_model(path, dtype="float32")
    _assert_same_model(model32, rounded)


def test_comfyui_all_in_one_keeps_only_the_dit(tmp_path: Path, source: CausalWanModel) -> None:
    file = {f"model.diffusion_model.{k}": v for k, v in _sd(source).items()}
    file["first_stage_model.decoder.conv1.weight"] = torch.zeros(4, 4)  # a bundled VAE
    file["text_encoders.umt5xxl.shared.weight"] = torch.zeros(4, 4)
    save_file(file, str(tmp_path / "aio.safetensors"))
    model, report = load_model(tmp_path / "aio.safetensors")
    assert report.layout == "comfyui" and "first_stage_model.decoder.conv1.weight" in report.ignored_keys
    _assert_same_model(model, source)


def test_comfyui_scaled_fp8(tmp_path: Path, source: CausalWanModel) -> None:
    sd, file = _sd(source), {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    quantised = [k for k in sd if k.startswith("blocks.") and k.endswith(".weight") and sd[k].ndim == 2]
    for key, value in sd.items():
        if key in quantised:
            scale = value.abs().max() / 448.0  # e4m3fn max
            file[key] = (value / scale).to(torch.float8_e4m3fn)
            file[key.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            file[key] = value
    path = tmp_path / "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"
    save_file(file, str(path))
    model, report = load_model(path, dtype=torch.float32)
    assert report.layout == "comfyui-fp8"
    assert "scaled_fp8" in report.ignored_keys and len(report.ignored_keys) == len(quantised) + 1
    loaded = model.state_dict()
    for key in quantised:
        scale = file[key.removesuffix("weight") + "scale_weight"]
        torch.testing.assert_close(loaded[key], file[key].float() * scale, rtol=0, atol=0)
        # e4m3: 3 mantissa bits -> relative error <= 2^-4, plus subnormal steps of scale * 2^-9
        assert ((loaded[key] - sd[key]).abs() <= sd[key].abs() / 16 + scale * 2**-9).all()
    for key in set(sd) - set(quantised):
        assert torch.equal(loaded[key], sd[key])
    assert load_model(path)[1].dtype == torch.bfloat16  # fp8 files default to bfloat16


def test_diffusers_folder_uses_its_config(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = DiTConfig(dim=256, ffn_dim=192, num_heads=4, num_layers=2, freq_dim=32, text_dim=32)  # 4 heads
    src = randomize_(CausalWanModel(cfg), seed=5)
    theirs = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
    )  # fmt: skip
    theirs.load_state_dict({wan_to_diffusers_key(k): v for k, v in _sd(src).items()}, strict=True)
    theirs.save_pretrained(tmp_path / "transformer")
    for target in (tmp_path / "transformer", tmp_path):  # the model folder or the pipeline root
        model, report = load_model(target)
        assert report.layout == "diffusers" and report.config_source == "config.json"
        _assert_same_model(model, src)


def test_diffusers_single_file(tmp_path: Path, source: CausalWanModel) -> None:
    path = tmp_path / "wan_diffusers.safetensors"
    save_file({wan_to_diffusers_key(k): v for k, v in _sd(source).items()}, str(path))
    assert detect_layout(path) == "diffusers"
    model, _ = load_model(path)
    _assert_same_model(model, source)


def test_own_file_round_trips_config_and_metadata(tmp_path: Path) -> None:
    tiny = randomize_(CausalWanModel(PRESETS["tiny"].dit), seed=2)  # 4 heads, text_len 16: not inferable
    path = save_model(tiny, tmp_path / "tiny.safetensors", extra_metadata={"step": 12, "note": "ode"})
    model, report = load_model(path)
    assert report.layout == "causvid-safetensors" and report.config_source == "file metadata"
    _assert_same_model(model, tiny)
    _, _, metadata = read_state_dict(path)
    assert json.loads(metadata["step"]) == 12 and metadata["note"] == "ode"


# -- config inference ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_infer_config_of_wan_presets_on_meta(name: str) -> None:
    with torch.device("meta"):
        state = CausalWanModel(PRESETS[name].dit).state_dict()
    assert infer_config(state) == PRESETS[name].dit


def test_infer_config_custom_shapes() -> None:
    cfg = DiTConfig(dim=384, ffn_dim=1000, num_heads=3, num_layers=5, freq_dim=64, text_dim=48,
                    in_dim=20, out_dim=12, patch_size=(1, 4, 2))  # fmt: skip
    with torch.device("meta"):
        state = CausalWanModel(cfg).state_dict()
    assert infer_config(state) == cfg
    with pytest.raises(CheckpointError, match="VAE, text encoder or LoRA"):
        infer_config({"encoder.conv1.weight": torch.zeros(1)})
    i2v = dict(state, **{"img_emb.proj.0.weight": torch.zeros(1280, device="meta")})
    assert infer_config(i2v).model_type == "i2v"


def test_describe_reads_shapes_only(tmp_path: Path, source: CausalWanModel) -> None:
    save_file(
        {f"model.diffusion_model.{k}": v.half() for k, v in _sd(source).items()},
        str(tmp_path / "a.safetensors"),
    )
    report = describe(tmp_path / "a.safetensors")
    assert report.num_params == sum(p.numel() for p in source.parameters())
    assert report.config == SMALL and report.dtype == torch.float16
    state, layout, _ = read_state_dict(tmp_path / "a.safetensors", meta=True)
    assert layout == "comfyui" and all(v.device.type == "meta" for v in state.values())


# -- safety and errors -----------------------------------------------------------------------
def _touch(path: str) -> None:
    Path(path).write_text("payload ran")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path: Path, source: CausalWanModel) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"generator": _sd(source), "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "needs to run code" in message and "safetensors" in message and str(path) in message
    assert "_touch" in message  # names the callable the pickle wanted to run
    assert not marker.exists()


def test_missing_unexpected_and_shape_mismatch_are_named(tmp_path: Path, source: CausalWanModel) -> None:
    sd = _sd(source)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.adapter.weight"] = torch.zeros(3)
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(256, 128)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.safetensors", config=SMALL)
    message = str(err.value)
    assert "1 missing keys: blocks.1.ffn.2.bias" in message
    assert "1 unexpected keys: blocks.0.adapter.weight" in message
    assert "blocks.0.self_attn.q.weight (file [256, 128], model [256, 256])" in message

    del sd["blocks.0.adapter.weight"]
    sd["blocks.0.self_attn.q.weight"] = _sd(source)["blocks.0.self_attn.q.weight"]
    sd["blocks.1.ffn.2.bias"] = _sd(source)["blocks.1.ffn.2.bias"]
    sd["blocks.0.adapter.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    model, report = load_model(tmp_path / "extra.safetensors", config=SMALL, strict=False)
    assert report.unexpected_keys == ["blocks.0.adapter.weight"]
    _assert_same_model(model, source)


def test_wrong_explicit_config_lists_a_bounded_number_of_keys(tmp_path: Path, source: CausalWanModel) -> None:
    save_file(_sd(source), str(tmp_path / "m.safetensors"))
    bigger = DiTConfig(**{**SMALL.__dict__, "num_layers": 6})
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\..*\(\d+ in all\)"):
        load_model(tmp_path / "m.safetensors", config=bigger)
    wider = DiTConfig(**{**SMALL.__dict__, "ffn_dim": 256})
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.0\.weight \(file \[192, 256\], model \[256, 256\]\)"
    ):
        load_model(tmp_path / "m.safetensors", config=wider)


def test_load_dtype_and_no_meta_left(tmp_path: Path, source: CausalWanModel) -> None:
    save_file(_sd(source), str(tmp_path / "m.safetensors"))
    model, report = load_model(tmp_path / "m.safetensors", dtype="bfloat16", device="cpu")
    assert report.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        load_model(tmp_path / "m.safetensors", dtype="int4")


# -- Hugging Face references -----------------------------------------------------------------
REF = "hf://tianweiy/CausVid/autoregressive_checkpoint/model.pt"


def test_hf_reference_downloads_through_the_hub(tmp_path, monkeypatch, source: CausalWanModel) -> None:
    import huggingface_hub

    monkeypatch.setenv("CAUSVID_MODELS_DIR", str(tmp_path / "models"))
    cached = tmp_path / "hub" / "model.pt"
    cached.parent.mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in _sd(source).items()}}, cached)
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, report = load_model(REF)
    assert calls == [dict(repo_id="tianweiy/CausVid", filename="model.pt",
                          subfolder="autoregressive_checkpoint", revision=None)]  # fmt: skip
    assert report.layout == "causvid"
    _assert_same_model(model, source)


def test_hf_reference_offline_says_where_to_put_the_file(tmp_path, monkeypatch, source) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("CAUSVID_MODELS_DIR", str(tmp_path / "models"))

    def offline(**kwargs):
        raise LocalEntryNotFoundError("connection error and no cached copy")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    expected = tmp_path / "models" / "tianweiy" / "CausVid" / "autoregressive_checkpoint" / "model.pt"
    with pytest.raises(HubDownloadError) as err:
        load_model(REF)
    message = str(err.value)
    assert "autoregressive_checkpoint/model.pt" in message and "tianweiy/CausVid" in message
    assert "https://huggingface.co/tianweiy/CausVid/blob/main/autoregressive_checkpoint/model.pt" in message
    assert str(expected) in message and "LocalEntryNotFoundError" in message
    expected.parent.mkdir(parents=True)  # following the advice makes it load, still offline
    torch.save({"generator": {f"model.{k}": v for k, v in _sd(source).items()}}, expected)
    _assert_same_model(load_model(REF)[0], source)


def test_bad_hf_reference() -> None:
    with pytest.raises(ValueError, match="hf://owner/repo/path/to/file"):
        load_model("hf://tianweiy/CausVid")


# -- command line ----------------------------------------------------------------------------
def test_cli_inspect(tmp_path: Path, source: CausalWanModel, capsys) -> None:
    assert "inspect" in SUBCOMMANDS
    save_file(
        {f"model.diffusion_model.{k}": v for k, v in _sd(source).items()}, str(tmp_path / "m.safetensors")
    )
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in source.parameters())
    assert "layout:     comfyui" in out and "dim=256 ffn_dim=192 heads=2 layers=2" in out
    assert f"{n:,}" in out and "float32" in out
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "tiny.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "causvid_core", "inspect", str(tmp_path / "tiny.safetensors")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "preset:     tiny" in result.stdout and "causvid-safetensors" in result.stdout


def test_a_cut_short_or_wrong_file_names_itself_and_the_fix(tmp_path: Path, capsys) -> None:
    """An interrupted download (a truncated .safetensors) and a file that is no checkpoint at all (a text
    file or a video named .pt) get one clear line each, never safetensors' bare error or a traceback;
    the same for the VAE and the resume sidecar reading safetensors."""
    from causvid_core.resume import load_sidecar
    from causvid_core.vae import VAE_PRESETS, WanVAE, load_wan_vae

    model_file = save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"cut.safetensors is damaged or incomplete .*download or copy it again"):
        load_model(cut)
    assert main(["inspect", str(cut)]) == 2
    assert "cut.safetensors is damaged or incomplete" in capsys.readouterr().err
    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in WanVAE(VAE_PRESETS["tiny"]).state_dict().items()}, str(vae))
    vae.write_bytes(vae.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="vae.safetensors is damaged or incomplete"):
        load_wan_vae(vae)
    with pytest.raises(ValueError, match="not a resume file of this package, or it is damaged"):
        load_sidecar(cut)
    for name, data in (("notes.pt", b"hello\n"), ("clip.pt", b"\x00\x00\x00\x18ftypisom" + bytes(64))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name} is not a readable checkpoint: neither safetensors"):
            load_model(tmp_path / name)
