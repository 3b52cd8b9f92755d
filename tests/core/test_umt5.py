"""umT5 text encoder: parity with transformers' UMT5EncoderModel, both checkpoint layouts, tokenizer, safety."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from causvid_core import umt5
from causvid_core.checkpoint import CheckpointError
from causvid_core.hub import HubDownloadError
from causvid_core.text import TextEncoder
from causvid_core.umt5 import (
    UMT5_PRESETS,
    WAN_NEGATIVE_PROMPT,
    UMT5Encoder,
    UMT5TextEncoder,
    UMT5Tokenizer,
    clean_prompt,
    find_tokenizer,
    hf_to_wan_key,
    load_umt5,
    wan_to_hf_key,
)

TINY = UMT5_PRESETS["tiny"]
WORDS = ["a", "red", "cat", "runs", "on", "the", "grass", "slowly", "under", "blue", "sky", ",", "!"]


def _hf_config(cfg: umt5.UMT5Config):
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps, tie_word_embeddings=False,
    )  # fmt: skip


def _random_wan_state(cfg: umt5.UMT5Config = TINY) -> dict[str, torch.Tensor]:
    """Random weights in Wan's names; norms away from 1 and biases large enough to matter."""
    model = UMT5Encoder(cfg)
    state = {}
    for key, value in model.state_dict().items():
        if "norm" in key:
            state[key] = 1.0 + 0.3 * torch.randn_like(value)
        elif "pos_embedding" in key:
            state[key] = 2.0 * torch.randn_like(value)
        else:
            state[key] = torch.randn_like(value) / math.sqrt(value.shape[-1])
    return state


def _hf_state(wan_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {wan_to_hf_key(k): v.clone() for k, v in wan_state.items()}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 5 and 14 tokens (ids end with </s> = 1), padded with 0 to 16."""
    ids = torch.zeros(2, TINY.text_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate((5, 14)):
        ids[b, : n - 1] = torch.randint(2, TINY.vocab_size, (n - 1,))
        ids[b, n - 1] = 1
        mask[b, :n] = 1
    return ids, mask


def _write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path


def test_matches_transformers_umt5_encoder(tmp_path: Path) -> None:
    """Same weights through the HF-name file: ours equals UMT5EncoderModel at valid positions, zero after."""
    from transformers import UMT5EncoderModel

    wan_state = _random_wan_state()
    hf_state = _hf_state(wan_state)
    reference = UMT5EncoderModel(_hf_config(TINY)).eval()
    reference.load_state_dict(hf_state | {"encoder.embed_tokens.weight": hf_state["shared.weight"]})
    save_file(hf_state, str(tmp_path / "umt5.safetensors"))
    ours = load_umt5(tmp_path / "umt5.safetensors", "tiny", dtype=torch.float32)

    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    valid = mask.bool()
    err = (got[valid] - expected[valid]).norm() / expected[valid].norm()
    assert err <= 1e-4, f"relative error {err:.2e} against transformers' UMT5EncoderModel"
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid])), "padded positions must be exactly zero"
    # each layer's own bias table matters (a shared first-layer table would differ)
    ours.blocks[1].pos_embedding.embedding.weight.data.copy_(ours.blocks[0].pos_embedding.embedding.weight)
    with torch.no_grad():
        assert not torch.allclose(ours(ids, mask)[valid], expected[valid], atol=1e-3)


def test_xxl_preset_has_hf_names_and_shapes() -> None:
    """The umt5-xxl preset (on meta) renames to exactly the keys and shapes of transformers' umT5-XXL encoder."""
    from transformers import UMT5EncoderModel

    cfg = UMT5_PRESETS["umt5-xxl"]
    with torch.device("meta"):
        ours = UMT5Encoder(cfg).state_dict()
        ref = UMT5EncoderModel(_hf_config(cfg)).state_dict()
    ref.pop("encoder.embed_tokens.weight")  # tied copy of shared.weight
    renamed = {wan_to_hf_key(k): tuple(v.shape) for k, v in ours.items()}
    assert renamed == {k: tuple(v.shape) for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in ref.values())
    assert ours["token_embedding.weight"].shape == (256384, 4096)
    assert (cfg.text_len, cfg.d_model) == (512, 4096)


def _reference(state: dict[str, torch.Tensor]) -> UMT5Encoder:
    model = UMT5Encoder(TINY).eval().requires_grad_(False)
    model.load_state_dict(state)
    return model


def test_wan_pth_and_hf_safetensors_load_alike(tmp_path: Path) -> None:
    """Wan .pth, HF/ComfyUI safetensors and an all-in-one file (prefixed, embed_tokens) give the same encoder."""
    wan_state = _random_wan_state()
    hf_state = _hf_state(wan_state)
    torch.save(wan_state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    tokenizer_bytes = {"spiece_model": torch.zeros(5, dtype=torch.uint8)}  # ComfyUI may embed the tokenizer
    save_file(hf_state | tokenizer_bytes, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    embed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in hf_state.items()}
    other = {"vae.decoder.weight": torch.ones(3), "model.diffusion_model.head.weight": torch.ones(2)}
    prefixed = {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in embed.items()}
    save_file(prefixed | other, str(tmp_path / "all_in_one.safetensors"))
    ids, mask = _batch()
    expected = _reference(wan_state)(ids, mask)
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "umt5_xxl_fp16.safetensors", "all_in_one.safetensors"):
        model = load_umt5(tmp_path / name, dtype=torch.float32)
        assert model.cfg == dataclasses.replace(
            TINY, max_distance=128, text_len=512
        )  # sizes read from the file
        model = load_umt5(tmp_path / name, "tiny", dtype=torch.float32)
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
        assert torch.equal(model(ids, mask), expected), name
    # default dtype: bfloat16, as Wan runs it
    bf16 = load_umt5(tmp_path / "umt5_xxl_fp16.safetensors", "tiny")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    out = bf16(ids, mask).float()
    assert (out - expected).norm() / expected.norm() < 0.05


def _fp8_scaled(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI-style scaled fp8 file (linear weights fp8 + scale_weight) and its exact dequantised weights."""
    file, dequantised = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in hf_state.items():
        if "SelfAttention." in key and "relative" not in key or "DenseReluDense" in key:
            scale = value.abs().max() / 448.0
            q = (value / scale).to(torch.float8_e4m3fn)
            file[key], file[key.replace(".weight", ".scale_weight")] = q, scale.reshape(())
            dequantised[key] = q.float() * scale
        else:
            file[key] = dequantised[key] = value
    return file, dequantised


def test_scaled_fp8_is_dequantised(tmp_path: Path) -> None:
    """A ComfyUI scaled-fp8 file loads as weight * scale_weight, exactly; outputs stay near full precision."""
    wan_state = _random_wan_state()
    file, dequantised = _fp8_scaled(_hf_state(wan_state))
    save_file(file, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    model = load_umt5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "tiny", dtype=torch.float32)
    loaded = {wan_to_hf_key(k): v for k, v in model.state_dict().items()}
    assert loaded.keys() == dequantised.keys()
    for key, value in dequantised.items():
        assert torch.equal(loaded[key], value), key
    ids, mask = _batch()
    expected = _reference(wan_state)(ids, mask)
    assert (model(ids, mask) - expected).norm() / expected.norm() < 0.2


def test_load_errors_name_the_keys(tmp_path: Path) -> None:
    """Missing, unexpected and mis-shaped keys are each named; a foreign file says what was expected."""
    state = _random_wan_state()
    broken = {k: v for k, v in state.items() if k != "blocks.1.attn.k.weight"} | {
        "blocks.0.extra.weight": torch.ones(2)
    }
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.k\.weight") as info:
        load_umt5(tmp_path / "broken.pth", "tiny")
    assert "unexpected keys: blocks.0.extra.weight" in str(info.value)
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.attn\.k\.weight \(file \[24, 32\], model \[4096, 4096\]\)"
    ):
        load_umt5(tmp_path / "tiny.pth", "umt5-xxl")
    save_file({"blocks.0.self_attn.q.weight": torch.ones(2, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="not a umT5 encoder checkpoint.*encoder.block.0.layer.0"):
        load_umt5(tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="unknown umT5 preset 'xl'.*umt5-xxl"):
        load_umt5(tmp_path / "tiny.pth", "xl")


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_refuses_pickle_with_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickle that would run code on load is refused (weights_only) and its payload never runs."""
    torch.save({"token_embedding.weight": torch.ones(2, 2), "hook": _Payload()}, tmp_path / "evil.pth")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth.*weights_only=True"):
        load_umt5(tmp_path / "evil.pth")
    assert "payload ran" not in capsys.readouterr().out


def test_clean_prompt_follows_wan() -> None:
    """Wan's cleaning: ftfy-style width/quote fixes, HTML unescaped twice, whitespace collapsed."""
    assert clean_prompt("  a\n\t red   cat  ") == "a red cat"
    assert clean_prompt("&amp;lt;b&amp;gt; &amp; c") == "<b> & c"
    assert clean_prompt("ＬＯＵＤ\u3000ＮＯＩＳＥＳ") == "LOUD NOISES"  # ftfy's documented width fix
    assert clean_prompt("\u201cquoted\u201d it\u2019s") == '"quoted" it\'s'
    cleaned = clean_prompt(WAN_NEGATIVE_PROMPT)
    assert "，" not in cleaned and cleaned.count(",") == WAN_NEGATIVE_PROMPT.count("，")


def test_tokenizer_appends_eos_pads_and_truncates(tmp_path: Path) -> None:
    """</s> after the prompt, <pad> to text_len, mask on tokens + </s>; long prompts keep </s> last."""
    tok = UMT5Tokenizer(_write_tokenizer(tmp_path / "tokenizer.json"), text_len=8)
    ids, mask = tok(["a red  cat", " ".join(WORDS[:11] * 2), ""])
    word = {w: i + 3 for i, w in enumerate(WORDS)}
    assert ids[0].tolist() == [word["a"], word["red"], word["cat"], 1, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1].tolist() == [word[w] for w in WORDS[:7]] + [1] and mask[1].all()
    assert ids[2].tolist() == [1] + [0] * 7 and mask[2].sum() == 1
    assert ids.shape == mask.shape == (3, 8)
    _write_tokenizer(tmp_path / "bad.json")
    data = json.loads((tmp_path / "bad.json").read_text())
    data["model"]["vocab"].pop("</s>")
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no '</s>' or '<pad>' token.*google/umt5-xxl"):
        UMT5Tokenizer(tmp_path / "bad.json")


def test_tokenizer_found_next_to_weights_or_on_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Next to the weights (also Wan's google/umt5-xxl/ folder) first, then hf_hub_download; offline names the file."""
    import huggingface_hub

    monkeypatch.setenv("CAUSVID_MODELS_DIR", str(tmp_path / "models"))
    wan_dir = tmp_path / "Wan2.1-T2V-1.3B"
    (wan_dir / "google" / "umt5-xxl").mkdir(parents=True)
    wan_tok = _write_tokenizer(wan_dir / "google" / "umt5-xxl" / "tokenizer.json")
    assert find_tokenizer(weights=wan_dir / "models_t5_umt5-xxl-enc-bf16.pth") == wan_tok
    assert find_tokenizer(wan_dir / "google" / "umt5-xxl") == wan_tok
    hub_tok = _write_tokenizer(tmp_path / "hub_tokenizer.json")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(hub_tok)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert find_tokenizer(weights=tmp_path / "elsewhere" / "umt5.safetensors") == hub_tok
    assert calls[0]["repo_id"] == "google/umt5-xxl" and calls[0]["filename"] == "tokenizer.json"

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HubDownloadError, match="tokenizer.json") as info:
        find_tokenizer(weights=tmp_path / "elsewhere" / "umt5.safetensors")
    message = str(info.value)
    assert "google/umt5-xxl" in message and str(tmp_path / "elsewhere" / "tokenizer.json") in message
    with pytest.raises(FileNotFoundError, match="tokenizer not found.*google/umt5-xxl"):
        find_tokenizer(tmp_path / "missing.json")


def test_text_encoder_end_to_end(tmp_path: Path) -> None:
    """TextEncoder protocol: float32 [B, text_len, dim], zeros after each prompt, batch-independent."""
    save_file(_hf_state(_random_wan_state()), str(tmp_path / "umt5.safetensors"))
    _write_tokenizer(tmp_path / "tokenizer.json")
    enc = UMT5TextEncoder.load(tmp_path / "umt5.safetensors", config="tiny", dtype=torch.float32)
    assert isinstance(enc, TextEncoder) and (enc.text_dim, enc.text_len) == (32, 16)
    prompts = ["a red cat", "the blue sky runs slowly under grass , !"]
    context, lengths = enc.encode_with_lengths(prompts)
    assert context.shape == (2, 16, 32) and context.dtype == torch.float32
    assert lengths.tolist() == [4, 10]
    for b, n in enumerate(lengths.tolist()):
        assert context[b, n:].abs().sum() == 0 and context[b, :n].abs().amin(dim=-1).gt(0).all()
    alone = enc.encode("a red cat")
    torch.testing.assert_close(alone[0], context[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.encode(prompts), context)


def test_a_gguf_umt5_encoder_loads_with_llama_cpp_names(tmp_path: Path) -> None:
    """city96-style umt5-xxl-encoder GGUF files (llama.cpp's t5 names: enc.blk.N.attn_q, token_embd, ...)
    load as the same encoder as the weights they hold (Q8_0 where a row fits whole blocks, else F32)."""
    gguf = pytest.importorskip("gguf")
    from causvid_core.umt5 import _GGUF_T5_NAMES

    hf_state = _hf_state(_random_wan_state())
    writer = gguf.GGUFWriter(str(tmp_path / "umt5-xxl-encoder-Q8_0.gguf"), arch="t5encoder")
    stored = {}
    for key, value in hf_state.items():
        name = key
        for old, new in reversed(_GGUF_T5_NAMES):  # Hugging Face's name -> llama.cpp's
            name = name.replace(new, old)
        data = value.float().numpy()
        q8 = data.ndim == 2 and data.shape[1] % 32 == 0
        kind = gguf.GGMLQuantizationType.Q8_0 if q8 else gguf.GGMLQuantizationType.F32
        packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, packed, raw_dtype=kind)
        stored[key] = torch.from_numpy(gguf.quants.dequantize(packed, kind).reshape(data.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "umt5-xxl-encoder-Q8_0.gguf")).tensors]
    assert {"token_embd.weight", "enc.blk.0.attn_q.weight", "enc.blk.1.ffn_gate.weight", "enc.output_norm.weight",
            "enc.blk.0.attn_rel_b.weight"} <= set(names)  # fmt: skip
    model = load_umt5(tmp_path / "umt5-xxl-encoder-Q8_0.gguf", "tiny", dtype=torch.float32)
    wan = {k: v for k, v in model.state_dict().items()}
    for key, value in stored.items():
        assert torch.equal(wan[hf_to_wan_key(key)], value), key
    ids, mask = _batch()
    reference = _reference({hf_to_wan_key(k): v for k, v in stored.items()})
    assert torch.equal(model(ids, mask), reference(ids, mask))
    with pytest.raises(CheckpointError, match="is a GGUF of a 'wan' model, not a umT5 text encoder"):
        bad = gguf.GGUFWriter(str(tmp_path / "dit.gguf"), arch="wan")
        bad.add_tensor("x", np.zeros((2, 2), np.float32))
        bad.write_header_to_file()
        bad.write_kv_data_to_file()
        bad.write_tensors_to_file()
        bad.close()
        load_umt5(tmp_path / "dit.gguf", "tiny")
