"""Wan's umT5-XXL text encoder: model, weight loading (Wan .pth, ComfyUI / Hugging Face safetensors) and tokenizer.

The encoder is T5 v1.1 style with UMT5's one difference: every layer has its own relative position
bias table (T5 has one, in the first layer). Pre-norm blocks with RMS norms (no mean, no bias),
attention without the 1/sqrt(d) scale, a gated-GELU (tanh) FFN and a final norm; no dropout.

Module names follow Wan's checkpoint (``wan/modules/t5.py``): ``token_embedding``,
``blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.gate.0, ffn.fc1, ffn.fc2, pos_embedding.embedding}``,
``norm``, so Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` loads as is and the Hugging Face / ComfyUI
names (``encoder.block.N.layer.0.SelfAttention.q`` ...) are a rename table.

Prompts are processed as Wan does: cleaned, tokenized, ``</s>`` appended, truncated and padded with
``<pad>`` (id 0) to ``text_len`` = 512; the output is zero after each prompt's tokens, which is what
Wan's DiT receives (Wan returns the valid tokens only and the DiT pads them with zeros).
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, safe_torch_load
from .gguf import MAGIC as GGUF_MAGIC
from .gguf import GGUFError, read_gguf
from .hub import HubDownloadError, local_path, parse_hub_ref, resolve_hub_ref, resolve_source

# Wan2.1's standard negative prompt (``wan/configs/shared_config.py``, ``sample_neg_prompt``).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
TOKENIZER_REPO = "google/umt5-xxl"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_REF = f"hf://{TOKENIZER_REPO}/{TOKENIZER_FILE}"


@dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder sizes (Hugging Face ``UMT5Config`` names) and the padded prompt length."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    num_buckets: int = 32  # relative attention buckets, bidirectional (half per direction)
    max_distance: int = 128  # relative distances beyond this share the last bucket
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.num_buckets % 4:
            raise ValueError(
                f"num_buckets {self.num_buckets} must be a multiple of 4 (bidirectional T5 buckets)"
            )
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance {self.max_distance} must exceed num_buckets // 4")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


UMT5_PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # d_kv * heads != d_model and short max_distance, so the tests reach every bucket regime.
    "tiny": UMT5Config(
        vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=6, num_buckets=8,
        max_distance=12, text_len=16,
    ),
}  # fmt: skip


# -- model -----------------------------------------------------------------------------------
def relative_position_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 bucket of rel = key - query: exact below num_buckets/4, log-spaced to max_distance."""
    half = num_buckets // 2  # one half per direction
    side = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return side + torch.where(dist < exact, dist, far)


class T5Norm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps): RMS in float32, cast to the weight's dtype (T5 / Wan order)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class RelativeBias(nn.Module):
    """Per-head bias table over relative-position buckets: bias[h, i, j] = table[bucket(j - i), h]."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, length: int) -> Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]


class SelfAttention(nn.Module):
    """softmax(q k^T + bias) v, without the 1/sqrt(d_kv) scale (T5 folds it into the weights)."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.num_heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B,H,L,d_kv]
        return self.o(out.transpose(1, 2).reshape(b, n, -1))  # [B, L, d_model]


class GatedFFN(nn.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x)): HF's wi_0 = gate.0, wi_1 = fc1, wo = fc2."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: Tensor) -> Tensor:
    """Keep float16 activations finite (umT5's residual stream overflows fp16), as Wan and HF do."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


class UMT5Block(nn.Module):
    """x += attn(norm1(x), bias_layer + mask); x += ffn(norm2(x)); each layer has its own bias table."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5Norm(cfg.d_model, cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = T5Norm(cfg.d_model, cfg.eps)
        self.ffn = GatedFFN(cfg)
        self.pos_embedding = RelativeBias(cfg)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        bias = self.pos_embedding(x.shape[1]) + mask_bias  # [B, H, L, L]
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack: ids [B, L] and mask [B, L] -> hidden states [B, L, d_model], zero where mask is 0."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(UMT5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5Norm(cfg.d_model, cfg.eps)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.token_embedding(ids)  # [B, L, D]
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        # padded keys get the dtype's most negative value: zero weight after the softmax
        mask_bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        mask_bias = mask_bias.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, mask_bias)
        x = self.norm(x)
        return torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


# -- weights ---------------------------------------------------------------------------------
# Wan name <-> Hugging Face / ComfyUI name, per block (``blocks.N.`` <-> ``encoder.block.N.``).
_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("norm1", "layer.0.layer_norm"),
    ("attn.q", "layer.0.SelfAttention.q"),
    ("attn.k", "layer.0.SelfAttention.k"),
    ("attn.v", "layer.0.SelfAttention.v"),
    ("attn.o", "layer.0.SelfAttention.o"),
    ("pos_embedding.embedding", "layer.0.SelfAttention.relative_attention_bias"),
    ("norm2", "layer.1.layer_norm"),
    ("ffn.gate.0", "layer.1.DenseReluDense.wi_0"),
    ("ffn.fc1", "layer.1.DenseReluDense.wi_1"),
    ("ffn.fc2", "layer.1.DenseReluDense.wo"),
)
_TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("token_embedding", "shared"),
    ("token_embedding", "encoder.embed_tokens"),
    ("norm", "encoder.final_layer_norm"),
)
_LAYOUT_MARKERS = {"wan": "blocks.0.attn.q.weight", "hf": "encoder.block.0.layer.0.SelfAttention.q.weight"}
LAYOUTS = {
    "wan": "Wan umT5 state dict (models_t5_umt5-xxl-enc-bf16.pth names)",
    "hf": "Hugging Face / ComfyUI umT5 names (encoder.block.N.layer...), fp16/bf16/fp32 or scaled fp8",
    "gguf": "GGUF umT5 encoder (llama.cpp's t5 names, as city96's umt5-xxl-encoder GGUF files), any type "
    "causvid_core.gguf reads",
}
# llama.cpp's T5 tensor names -> Hugging Face's, replaced in this order (enc.blk.0.attn_q -> encoder.block.0...)
_GGUF_T5_NAMES = (
    ("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"), ("output_norm", "final_layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"), ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"), ("ffn_norm", "layer.1.layer_norm"),
)  # fmt: skip


def gguf_t5_to_hf_key(key: str) -> str:
    """Hugging Face's name of a llama.cpp T5 encoder tensor (``enc.blk.3.ffn_up.weight`` ->
    ``encoder.block.3.layer.1.DenseReluDense.wi_1.weight``)."""
    for old, new in _GGUF_T5_NAMES:
        key = key.replace(old, new)
    return key
_NON_WEIGHTS = ("scaled_fp8", "spiece_model")  # ComfyUI's fp8 marker and embedded tokenizer bytes
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_HF_OTHER_PARTS = ("decoder.", "lm_head.")  # a full seq2seq checkpoint: the encoder is taken alone
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK_RE = re.compile(r"^(blocks|encoder\.block)\.(\d+)\.(.+)\.(weight)$")


def hf_to_wan_key(key: str) -> str | None:
    """Wan's name for a Hugging Face / ComfyUI umT5 encoder key, or None when it is not one."""
    for wan, hf in _TOP_NAMES:
        if key == f"{hf}.weight":
            return f"{wan}.weight"
    m = _BLOCK_RE.match(key)
    if m and m.group(1) == "encoder.block":
        for wan, hf in _BLOCK_NAMES:
            if m.group(3) == hf:
                return f"blocks.{m.group(2)}.{wan}.weight"
    return None


def wan_to_hf_key(key: str) -> str | None:
    """The Hugging Face / ComfyUI name of a Wan umT5 key (the embedding maps to ``shared.weight``)."""
    for wan, hf in _TOP_NAMES[:1] + _TOP_NAMES[2:]:
        if key == f"{wan}.weight":
            return f"{hf}.weight"
    m = _BLOCK_RE.match(key)
    if m and m.group(1) == "blocks":
        for wan, hf in _BLOCK_NAMES:
            if m.group(3) == wan:
                return f"encoder.block.{m.group(2)}.{hf}.weight"
    return None


class _Tensors(NamedTuple):
    keys: list[str]
    shape: Callable[[str], tuple[int, ...]]
    get: Callable[[str], Tensor]


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


def _pickle_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path} holds no state dict of tensors (a {type(obj).__name__}); expected {LAYOUTS}"
    )


@contextmanager
def _open_tensors(path: Path) -> Iterator[_Tensors]:
    """Key list, shapes and one-at-a-time reads of a safetensors file, a GGUF (names made Hugging Face's,
    tensors dequantised to float32 one at a time) or a weights-only pickle."""
    with open(path, "rb") as f:
        gguf_file = f.read(4) == GGUF_MAGIC
    if gguf_file:
        try:
            tensors, meta = read_gguf(path)
        except GGUFError as err:
            raise CheckpointError(str(err)) from err
        arch = meta.get("general.architecture")
        if isinstance(arch, str) and arch not in ("t5", "t5encoder"):
            raise CheckpointError(f"{path} is a GGUF of a '{arch}' model, not a umT5 text encoder")
        named = {gguf_t5_to_hf_key(k): t for k, t in tensors.items()}

        def get(k: str) -> Tensor:
            try:
                return named[k].dequantize(torch.float32)
            except GGUFError as err:
                raise CheckpointError(str(err)) from err

        yield _Tensors(list(named), lambda k: tuple(named[k].shape), get)
    elif _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield _Tensors(list(f.keys()), lambda k: tuple(f.get_slice(k).get_shape()), f.get_tensor)
    else:
        sd = _pickle_state_dict(safe_torch_load(path), path)
        yield _Tensors(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__)


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _plan(keys: list[str], path: Path) -> tuple[str, dict[str, str], dict[str, str], list[str]]:
    """Layout, Wan key -> file key, weight file key -> scale key, and unrecognised keys."""
    found = [(layout, k[: -len(m)]) for layout, m in _LAYOUT_MARKERS.items() for k in keys if k.endswith(m)]
    if not found:
        raise CheckpointError(
            f"{path} is not a umT5 encoder checkpoint: no key ends with {' or '.join(_LAYOUT_MARKERS.values())} "
            f"(its keys start: {_names(sorted(keys))}). Expected one of: {'; '.join(LAYOUTS.values())}."
        )
    layout, prefix = min(found, key=lambda lp: len(lp[1]))  # keys outside the prefix belong to other models
    inner = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    scales = {k.rsplit(".", 1)[0] + ".weight": k for k in inner if k.endswith(_SCALE_SUFFIXES)}
    weights = [
        k for k in inner
        if k not in _NON_WEIGHTS and not k.endswith(_SCALE_SUFFIXES + _DROP_SUFFIXES)
        and not (layout == "hf" and k.startswith(_HF_OTHER_PARTS))
    ]  # fmt: skip
    if layout == "hf" and "shared.weight" in weights and "encoder.embed_tokens.weight" in weights:
        weights.remove("encoder.embed_tokens.weight")  # the tied copy of the same table
    mapping, unexpected = {}, []
    for k in weights:
        wan = hf_to_wan_key(k) if layout == "hf" else k
        if wan is None:
            unexpected.append(prefix + k)
        else:
            mapping.setdefault(wan, prefix + k)
    orphan = sorted(w for w in scales if w not in weights)
    if orphan:
        raise CheckpointError(
            f"{path}: scale tensors without a weight ({_names(orphan)}): the fp8 file is incomplete"
        )
    return layout, mapping, {prefix + w: prefix + s for w, s in scales.items()}, unexpected


def infer_umt5_config(shapes: dict[str, tuple[int, ...]], text_len: int = 512) -> UMT5Config:
    """Encoder sizes from Wan-named tensor shapes (max_distance is not stored: 128, umT5's value)."""
    need = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight")  # fmt: skip
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"cannot size the umT5 encoder: missing keys {_names(missing)}")
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    layers = 1 + max(int(m.group(2)) for k in shapes if (m := _BLOCK_RE.match(k)))
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_ff=shapes["blocks.0.ffn.fc1.weight"][0], num_layers=layers,
        num_heads=heads, d_kv=shapes["blocks.0.attn.q.weight"][0] // heads, num_buckets=buckets,
        max_distance=UMT5Config.max_distance, text_len=text_len,
    )  # fmt: skip


def check_umt5_shapes(
    shapes: dict[str, tuple[int, ...]], cfg: UMT5Config, unexpected: list[str], path: Path
) -> None:
    """Raise naming every missing, unexpected and wrongly shaped key against the model ``cfg`` builds."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UMT5Encoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(unexpected + [k for k in shapes if k not in expected])
    wrong = sorted(
        f"{k} (file {list(shapes[k])}, model {list(expected[k])})"
        for k in expected
        if k in shapes and shapes[k] != expected[k]
    )
    problems = [
        f"{len(v)} {what}: {_names(v)}"
        for what, v in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong),
        )
        if v
    ]
    if problems:
        raise CheckpointError(
            f"{path} does not fit the umT5 encoder (d_model={cfg.d_model}, layers={cfg.num_layers}, "
            f"heads={cfg.num_heads}, d_ff={cfg.d_ff}): " + "; ".join(problems) + ". Use Wan's "
            "models_t5_umt5-xxl-enc-bf16.pth or ComfyUI's umt5_xxl_*.safetensors, and pass no config "
            "(it is read from the file) or the matching one."
        )


def _convert(weight: Tensor, scale: Tensor | None, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """weight * scale_weight (fp8 files; float32 product), else a plain cast, to ``dtype`` on ``device``."""
    if weight.dtype in _FP8:  # e4m3fn has NaN codes but no inf; ComfyUI zeroes them (nan_to_num) too
        weight = torch.nan_to_num(weight.to(device).float())
    if scale is None:
        return weight.to(device=device, dtype=dtype)
    scale = scale.to(device=device, dtype=torch.float32)
    scale = scale.reshape(scale.shape + (1,) * (weight.ndim - scale.ndim))  # scalar or one per output row
    return (weight.to(device).float() * scale).to(dtype)


def load_umt5(
    source: str | Path,
    config: UMT5Config | str | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> UMT5Encoder:
    """Build the encoder on ``meta`` and assign the file's tensors (one converted at a time): eval, no grad."""
    path = resolve_source(source)
    if isinstance(config, str) and config not in UMT5_PRESETS:
        raise ValueError(
            f"unknown umT5 preset {config!r}: choose one of {sorted(UMT5_PRESETS)} or pass a UMT5Config"
        )
    cfg = UMT5_PRESETS[config] if isinstance(config, str) else config
    with _open_tensors(path) as src:
        _, mapping, scales, unexpected = _plan(src.keys, path)
        shapes = {wan: src.shape(k) for wan, k in mapping.items()}
        cfg = cfg or infer_umt5_config(shapes)
        check_umt5_shapes(shapes, cfg, unexpected, path)
        with torch.device("meta"):
            model = UMT5Encoder(cfg)
        state = {}
        for wan, key in mapping.items():
            scale = src.get(scales[key]) if key in scales else None
            state[wan] = _convert(src.get(key), scale, dtype, device)
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -- tokenizer -------------------------------------------------------------------------------
def _fix_text_lite(text: str) -> str:
    """The data-free part of ``ftfy.fix_text``'s defaults (no mojibake repair): see ``clean_prompt``."""
    text = text.translate(_CONTROL_CHARS).translate(_LIGATURES).translate(_WIDTH_MAP)
    text = re.sub("[\u2018-\u201b]", "'", re.sub("[\u201c-\u201f]", '"', text))
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _width_map() -> dict[int, str]:
    table = {0x3000: " "}  # ideographic space
    for code in range(0xFF01, 0xFFF0):  # fullwidth ASCII and halfwidth katakana / hangul forms
        alt = unicodedata.normalize("NFKC", chr(code))
        if alt != chr(code):
            table[code] = alt
    return table


_WIDTH_MAP = _width_map()
_LIGATURES = {ord(k): v for k, v in {"Ĳ": "IJ", "ĳ": "ij", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi",
                                      "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}  # fmt: skip
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD),
     *range(0x1D173, 0x1D17B), *range(0xE0000, 0xE0080)]
)  # fmt: skip


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix_text, html.unescape twice, whitespace runs -> one space, strip.

    ``ftfy.fix_text`` is used when ftfy is installed (Wan always has it). Without it, its
    data-free default fixes are applied (full-width forms to ASCII, e.g. '，' -> ',', curly quotes
    to straight, Latin ligatures split, control characters removed, NFC); only ftfy's mojibake repair
    is missing, which leaves normally typed prompts unchanged.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        text = _fix_text_lite(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def find_tokenizer(tokenizer: str | Path | None = None, weights: str | Path | None = None) -> Path:
    """google/umt5-xxl's tokenizer.json: given, next to the weights, in the local models folder, or the Hub."""
    if tokenizer is not None:
        path = (
            Path(tokenizer).expanduser()
            if not str(tokenizer).startswith("hf://")
            else resolve_hub_ref(tokenizer)
        )
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {path}. Pass google/umt5-xxl's {TOKENIZER_FILE} (or its folder), "
                f"from https://huggingface.co/{TOKENIZER_REPO}"
            )
        return path
    near: list[Path] = []
    if weights is not None and not str(weights).startswith("hf://"):
        folder = Path(weights).expanduser().parent
        near = [folder / TOKENIZER_FILE, folder / TOKENIZER_REPO / TOKENIZER_FILE]  # Wan2.1's own layout
        for candidate in near:
            if candidate.is_file():
                return candidate
    try:
        return resolve_hub_ref(TOKENIZER_REF)
    except HubDownloadError as err:
        places = [str(p) for p in near] + [str(local_path(parse_hub_ref(TOKENIZER_REF)))]
        raise HubDownloadError(
            f"umT5 tokenizer {TOKENIZER_FILE} not found: {err} Any of these places works: {', '.join(places)}."
        ) from err


class UMT5Tokenizer:
    """Wan's prompt preprocessing: clean, tokenize, append </s>, truncate and pad with <pad> to text_len."""

    def __init__(self, path: str | Path, text_len: int = 512, clean: bool = True) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                "the umT5 tokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from err
        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos_id = self.tokenizer.token_to_id("</s>")
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(
                f"{self.path} has no '</s>' or '<pad>' token: it is not google/umt5-xxl's {TOKENIZER_FILE} "
                f"(get it from https://huggingface.co/{TOKENIZER_REPO})"
            )
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for </s>), got {text_len}")
        self.text_len, self.clean = text_len, clean

    def __call__(self, prompts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """ids [B, text_len] (long) and mask [B, text_len] (1 on the prompt's tokens and its </s>)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        for b, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            tokens = enc.ids[: self.text_len - 1] + [self.eos_id]  # truncation keeps </s> last, as HF does
            ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[b, : len(tokens)] = 1
        return ids, mask


class UMT5TextEncoder:
    """The ``TextEncoder`` for real Wan/CausVid models: prompts -> float32 [B, text_len, 4096], zero padded."""

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer) -> None:
        if tokenizer.text_len != model.cfg.text_len:
            raise ValueError(
                f"tokenizer text_len {tokenizer.text_len} != model text_len {model.cfg.text_len}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.text_dim, self.text_len = model.cfg.d_model, model.cfg.text_len

    @classmethod
    def load(
        cls,
        weights: str | Path,
        tokenizer: str | Path | None = None,
        *,
        config: UMT5Config | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> UMT5TextEncoder:
        """Weights (Wan .pth, ComfyUI / HF safetensors, or hf://) plus the tokenizer (see ``find_tokenizer``)."""
        model = load_umt5(weights, config, dtype=dtype, device=device)
        return cls(model, UMT5Tokenizer(find_tokenizer(tokenizer, weights), model.cfg.text_len))

    @torch.no_grad()
    def encode_with_lengths(
        self, prompts: Sequence[str] | str, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Context [B, text_len, text_dim] float32 (zeros after each prompt) and token counts [B] (with </s>)."""
        ids, mask = self.tokenizer(prompts)
        param = next(self.model.parameters())
        out = self.model(ids.to(param.device), mask.to(param.device)).float()  # [B, L, D]
        lengths = mask.sum(dim=1).to(out.device)
        return (out, lengths) if device is None else (out.to(device), lengths.to(device))

    def encode(self, prompts: Sequence[str] | str, device: torch.device | str | None = None) -> Tensor:
        """Encode prompts to float32 [B, text_len, text_dim] on the model's device (or ``device``)."""
        return self.encode_with_lengths(prompts, device)[0]

    __call__ = encode
