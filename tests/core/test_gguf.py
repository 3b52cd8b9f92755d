"""GGUF checkpoints (ComfyUI-GGUF's quantised Wan files): every block type unpacks exactly as llama.cpp's
own Python package does, a quantised DiT loads through load_model / inspect, and bad files are named."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.checkpoint import CheckpointError, describe, load_model, read_state_dict
from causvid_core.cli import main
from causvid_core.config import DiTConfig
from causvid_core.gguf import _DEQUANT, TYPES, QuantizedTensor, read_gguf
from causvid_core.model import CausalWanModel
from tests.helpers import write_gguf

gguf = pytest.importorskip("gguf")  # llama.cpp's reference implementation, from the registry (test extra)
T = gguf.GGMLQuantizationType
SMALL = DiTConfig(dim=256, ffn_dim=192, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
# where each block type keeps its float16 scales (bytes), to fill them with sane values in random blocks
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_DEQUANT))
def test_every_block_type_unpacks_like_llama_cpp(name: str) -> None:
    """Random blocks (every bit pattern of the packed fields, finite scales) decode bit for bit as gguf-py
    decodes them, on the CPU, so a GPU gets the same weights from the same code."""
    type_id = next(i for i, t in TYPES.items() if t[0] == name)
    _, per_block, block_bytes = TYPES[type_id]
    assert gguf.GGML_QUANT_SIZES[T[name]] == (per_block, block_bytes)
    rng = np.random.default_rng(type_id)
    blocks = rng.integers(0, 256, size=(48, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        blocks[:, at : at + 2] = rng.uniform(-2, 2, size=(48, 1)).astype(np.float16).view(np.uint8)
    expected = gguf.quants.dequantize(blocks.reshape(-1), T[name]).reshape(-1)
    ours = QuantizedTensor("w", type_id, torch.Size([48 * per_block]), blocks.reshape(-1)).dequantize()
    assert ours.dtype == torch.float32 and ours.shape == (48 * per_block,)
    np.testing.assert_array_equal(ours.numpy(), expected)


def _source() -> CausalWanModel:
    gen = torch.Generator().manual_seed(5)
    model = CausalWanModel(SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p[0].numel() ** -0.5 if p.ndim >= 2 and not name.endswith("modulation") else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
    return model.eval()


@pytest.mark.parametrize(("qtype", "prefix", "flatten_5d"), [(T.Q8_0, "", True),
                                                             (T.Q4_0, "model.diffusion_model.", False),
                                                             (T.F16, "", True)])  # fmt: skip
def test_a_quantised_wan_gguf_loads(tmp_path: Path, qtype: int, prefix: str, flatten_5d: bool) -> None:
    source = _source()
    sd = {k: v.detach().clone() for k, v in source.state_dict().items()}
    path = tmp_path / "wan2.1-t2v-small.gguf"
    types = write_gguf(path, sd, qtype, prefix=prefix, flatten_5d=flatten_5d)
    model, report = load_model(path, dtype=torch.float32)
    assert report.layout == "gguf" and model.config == SMALL and report.config_source == "inferred from shapes"
    name = T(qtype).name
    counts = report.source_dtypes
    quantised = [k for k, t in types.items() if t == qtype]
    if qtype != T.F16:
        assert counts[name] == sum(sd[k].numel() for k in quantised)
        assert load_model(path)[1].dtype == torch.bfloat16  # quantised files default to bfloat16, as fp8 ones
    loaded = model.state_dict()
    for key, value in sd.items():
        # every weight is exactly what llama.cpp's reference dequantisation gives for the stored blocks
        kind = T(types[key])
        reference = gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), kind), kind)
        np.testing.assert_array_equal(loaded[key].numpy(), reference.reshape(value.shape), err_msg=key)
    with torch.no_grad():
        x = torch.randn(1, SMALL.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(1))
        ctx = torch.randn(1, 8, SMALL.text_dim, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([600.0])
        err = (model(x, t, ctx) - source(x, t, ctx)).norm() / source(x, t, ctx).norm()
    assert err < {T.Q8_0: 0.02, T.Q4_0: 0.2, T.F16: 0.002}[qtype]
    # shapes only: nothing is unpacked, and read_state_dict gives float32 with Wan's key names
    info = describe(path)
    assert info.layout == "gguf" and info.num_params == sum(v.numel() for v in sd.values())
    full, layout, metadata = read_state_dict(path)
    assert layout == "gguf" and set(full) == set(sd) and all(v.dtype == torch.float32 for v in full.values())
    assert metadata["gguf.general.architecture"] == "wan"


def test_inspect_names_the_quant_types(tmp_path: Path, capsys) -> None:
    sd = {k: v.detach().clone() for k, v in _source().state_dict().items()}
    write_gguf(tmp_path / "m.gguf", sd, T.Q8_0)
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "layout:     gguf" in out and "Q8_0 (" in out and "float32 (" in out
    assert "load dtype: bfloat16" in out and "dim=256 ffn_dim=192 heads=2 layers=2" in out


def test_bad_gguf_files_are_named_with_the_fix(tmp_path: Path) -> None:
    sd = {k: v.detach().clone() for k, v in _source().state_dict().items()}
    good = tmp_path / "good.gguf"
    write_gguf(good, sd, T.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut.gguf is damaged or incomplete: tensor .* download or copy it again"):
        load_model(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="header.gguf ends inside its header: the file is incomplete"):
        describe(header)
    llm = tmp_path / "llama.gguf"
    write_gguf(llm, {"token_embd.weight": torch.randn(64, 64)}, T.Q8_0, arch="llama")
    with pytest.raises(CheckpointError, match="llama.gguf is a GGUF of a 'llama' model, not a Wan2.1 DiT"):
        load_model(llm)
    # a type with no unpacker here (an i-quant) is refused when loaded, naming the types that are read
    odd = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(odd), arch="wan")
    for key, value in sd.items():
        if key == "blocks.0.ffn.0.weight":  # [192, 256]: 192 rows of one 256-value IQ2_XXS block (66 bytes)
            writer.add_tensor(key, np.zeros((192, 66), np.uint8), raw_dtype=T.IQ2_XXS)
        else:
            writer.add_tensor(key, value.float().numpy().reshape(-1, 64) if value.ndim > 4 else value.float().numpy())
    if any(v.ndim > 4 for v in sd.values()):
        writer.add_array("comfy.gguf.orig_shape.patch_embedding.weight", list(sd["patch_embedding.weight"].shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, _ = read_gguf(odd)
    assert tensors["blocks.0.ffn.0.weight"].shape == (192, 256)
    with pytest.raises(CheckpointError, match=r"blocks.0.ffn.0.weight is stored as IQ2_XXS, which this loader cannot "
                                              r"dequantise \(it reads F32, F16, BF16, Q8_0"):  # fmt: skip
        load_model(odd)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(CheckpointError, match="text.gguf is not a GGUF file"):
        load_model(tmp_path / "text.gguf")


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")


def test_packed_layers_give_the_unpacked_models_output_in_the_files_size(tmp_path: Path) -> None:
    """For inference (load_bundle, the nodes) a GGUF's quantised attention / FFN weights stay in their
    blocks: the same output as the unpacked model, bit for bit, in about a quarter of float32's memory
    (Q8_0: 34 bytes per 32 weights); a LoRA unpacks only the layers it changes; fused QKV is left off
    for them (the same output again)."""
    from causvid_core.gguf import PackedLinear
    from causvid_core.lora import read_lora

    source = _source()
    sd = {k: v.detach().clone() for k, v in source.state_dict().items()}
    path = tmp_path / "m.gguf"
    types = write_gguf(path, sd, T.Q8_0)
    plain, plain_report = load_model(path, dtype=torch.float32)
    model, report = load_model(path, dtype=torch.float32, packed=True)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 20 and report.packed == {"Q8_0": 20}  # 2 blocks x (4 + 4 attention + 2 FFN)
    assert not plain_report.packed and not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert report.num_params == plain_report.num_params
    assert "packed:     20 Q8_0 linear layers" in report.summary()
    quantised = sum(sd[k].numel() for k, t in types.items() if t == T.Q8_0 and k.startswith("blocks."))
    assert sum(m.packed.numel() for m in layers) == quantised // 32 * 34  # the file's bytes, nothing more
    assert _weight_bytes(plain) - _weight_bytes(model) == quantised * 4 - quantised // 32 * 34

    x = torch.randn(1, SMALL.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 8, SMALL.text_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([600.0])
    with torch.no_grad():
        expected = plain(x, t, ctx)
        torch.testing.assert_close(model(x, t, ctx), expected, rtol=0, atol=0)
        model.set_speed("ring,fused_qkv")
        torch.testing.assert_close(model(x, t, ctx), expected, rtol=0, atol=0)

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(9)
    lora_file = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_down.weight": torch.randn(4, 256, generator=gen),
               "diffusion_model.blocks.1.self_attn.q.lora_up.weight": torch.randn(256, 4, generator=gen) * 0.01},
              str(lora_file))  # fmt: skip
    assert len(read_lora(lora_file)) == 2
    with_lora, lora_report = load_model(path, dtype=torch.float32, packed=True, lora=[(lora_file, 0.8)])
    plain_lora, _ = load_model(path, dtype=torch.float32, lora=[(lora_file, 0.8)])
    assert type(with_lora.blocks[1].self_attn.q) is torch.nn.Linear and lora_report.packed == {"Q8_0": 19}
    with torch.no_grad():
        torch.testing.assert_close(with_lora(x, t, ctx), plain_lora(x, t, ctx), rtol=0, atol=0)
        assert not torch.equal(plain_lora(x, t, ctx), expected)


def test_load_bundle_packs_on_a_gpu_and_unpacks_on_a_cpu_unless_told(tmp_path: Path) -> None:
    from causvid_core.bundle import load_bundle

    path = tmp_path / "m.gguf"
    write_gguf(path, {k: v.detach().clone() for k, v in _source().state_dict().items()}, T.Q4_0)
    assert load_bundle(path, dtype="float32").report.packed == {}  # CPU: speed over memory
    assert load_bundle(path, dtype="float32", packed=True).report.packed == {"Q4_0": 20}
    if torch.cuda.is_available():
        assert load_bundle(path, dtype="bfloat16", device="cuda").report.packed == {"Q4_0": 20}


def test_the_gguf_benchmark_reports_size_speed_and_equality(tmp_path: Path) -> None:
    """``python -m bench.gguf --quick``: the figures bench/RESULTS.md quotes are in its JSON, the packed
    model is smaller than the unpacked one and gives the same output."""
    import json

    from bench.gguf import main as bench_main

    assert bench_main(["--quick", "--types", "Q8_0", "--repeats", "1", "--json", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    (row,) = result["rows"]
    assert row["type"] == "Q8_0" and row["max_abs_diff"] == 0.0
    assert row["packed_weights_mb"] < row["unpacked_weights_mb"] and row["forward_ratio"] > 0
    assert set(result["unpack_gbps"]) == set(_DEQUANT) and "cores" in result["machine"]


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16"])
def test_our_quantisers_write_the_bytes_llama_cpp_writes(kind: str) -> None:
    from causvid_core.gguf import quantize

    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(4)) * 0.3
    x[0, :32] = 0  # an all-zero block (scale 0) and exact halves, where rounding conventions differ
    x[1, :32] = torch.arange(32) / 2
    assert quantize(x, kind).numpy().tobytes() == gguf.quants.quantize(x.numpy(), T[kind]).tobytes()


def test_quantize_writes_a_gguf_that_loads_as_the_same_streaming_model(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m causvid_core quantize embedded:NAME --type Q8_0`: a GGUF llama.cpp's reader opens (Wan names,
    architecture 'wan', the 5-D patch embedding flattened with its shape), that loads with the embedded model's
    config, chunking, steps, fps and natural size, and streams close to the original."""
    from causvid_core.bundle import load_bundle
    from causvid_core.cli import _natural_size
    from tests.helpers import make_embedded

    make_embedded(tmp_path / "embedded", name="shapes")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path / "embedded"))
    out = tmp_path / "shapes-Q8_0.gguf"
    assert main(["quantize", "embedded:shapes", "--type", "Q8_0", "--out", str(out)]) == 0
    assert re.search(r"wrote .*shapes-Q8_0.gguf: \d+ tensors", capsys.readouterr().out)
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blocks.0.self_attn.q.weight"] == "Q8_0" and kinds["blocks.0.norm3.weight"] == "F32"
    assert reader.get_field("comfy.gguf.orig_shape.patch_embedding.weight") is not None
    original, packed = load_bundle("embedded:shapes", dtype="float32"), load_bundle(out, dtype="float32")
    assert packed.report.layout == "gguf" and vars(packed.model.config) == vars(original.model.config)
    assert (packed.sampling, packed.causal, packed.fps) == (original.sampling, original.causal, original.fps)
    assert _natural_size(packed) == (64, 64)
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 8, original.model.config.text_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = original.model(x, torch.tensor([600.0]), ctx)
        got = packed.model(x, torch.tensor([600.0]), ctx)
    assert (got - want).norm() / want.norm() < 0.02
    assert main(["quantize", "embedded:shapes", "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", "embedded:shapes", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "should end in .gguf" in capsys.readouterr().err


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_packed_layers_compile(tmp_path: Path) -> None:
    """The `compile` speed option traces through the per-matmul unpacking (about 15 s on 2 cores)."""
    sd = {k: v.detach().clone() for k, v in _source().state_dict().items()}
    write_gguf(tmp_path / "m.gguf", sd, T.Q4_0)
    model, report = load_model(tmp_path / "m.gguf", dtype=torch.float32, packed=True)
    assert report.packed == {"Q4_0": 20}
    x = torch.randn(1, SMALL.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 8, SMALL.text_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([600.0])
    with torch.no_grad():
        eager = model(x, t, ctx)
        model.set_speed("compile")
        torch.testing.assert_close(model(x, t, ctx), eager, rtol=1e-4, atol=1e-4)
