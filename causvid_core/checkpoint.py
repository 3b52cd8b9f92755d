"""Read every DiT checkpoint layout users meet and load it into ``CausalWanModel``.

Layouts: the CausVid release (``model.pt``, ``generator`` state dict prefixed ``model.``),
Self-Forcing (``generator_ema`` preferred, FSDP / compile fragments), Wan2.1 safetensors (single or
sharded with an index), ComfyUI repackaged (``model.diffusion_model.`` prefix, fp16 / bf16 /
scaled fp8), GGUF (ComfyUI-GGUF's quantised Wan files: Q8_0 ... Q2_K, F16, BF16), diffusers
``WanTransformer3DModel`` (folder or single file), and this package's own safetensors (config in the
metadata). Quantised weights are dequantised one tensor at a time, on the target device (or, GGUF's,
kept packed: ``load_model(packed=True)``). Everything is renamed to Wan's key names, checked key by key
and shape by shape, and assigned into a model built on the ``meta`` device (no double allocation).
Pickles are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import PRESETS, DiTConfig, dit_config_from_dict, to_dict
from .gguf import MAGIC as GGUF_MAGIC
from .gguf import GGUFError, PackedLinear, QuantizedTensor, is_quantized_name, read_gguf
from .hub import resolve_source
from .model import CausalWanModel

META_KEY = "causvid_config"  # safetensors metadata key holding this package's DiTConfig as JSON
LAYOUTS: dict[str, str] = {
    "causvid": "CausVid checkpoint (torch pickle, 'generator' state dict)",
    "self-forcing": "Self-Forcing checkpoint (torch pickle, 'generator_ema' / 'generator')",
    "wan": "Wan2.1 safetensors (original key names)",
    "wan-sharded": "Wan2.1 sharded safetensors with an index.json",
    "comfyui": "ComfyUI repackaged safetensors (model.diffusion_model. prefix)",
    "comfyui-fp8": "ComfyUI fp8 e4m3fn safetensors (weights dequantised with scale_weight)",
    "gguf": "GGUF (ComfyUI-GGUF / llama.cpp container; quantised weights unpacked at load, or per matmul "
    "when kept packed)",
    "diffusers": "diffusers WanTransformer3DModel",
    "causvid-safetensors": "comfyui-causvid safetensors (config in the metadata)",
    "pickle": "torch pickle of a Wan state dict",
}
_STRIP_FRAGMENTS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.", "transformer.")
_MARKER_KEYS = ("scaled_fp8",)  # ComfyUI's fp8 marker tensor: carries a dtype, no weights
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-layer fp8 weight scales
_DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, quant info
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip

# Wan name <-> diffusers name, per block and top level (verified against diffusers 0.42's
# transformer_wan.py modules and its single-file Wan converter). diffusers' norm2 is the affine
# LayerNorm before cross-attention, Wan's norm3; shapes are identical ([1, 6, dim] tables).
_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"), ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"), ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"), ("norm2", "norm3"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
)  # fmt: skip
_TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says what to do."""


# -- key names -------------------------------------------------------------------------------
def _rename(key: str, src: int) -> str | None:
    """Rename one key between Wan (src=0) and diffusers (src=1) names; None if unknown."""
    dst = 1 - src
    prefix, rest, table = "", key, _TOP_NAMES
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        prefix, rest, table = f"blocks.{parts[1]}.", ".".join(parts[2:]), _BLOCK_NAMES
    for pair in sorted(table, key=lambda p: -len(p[src])):
        name = pair[src]
        if rest == name or rest.startswith(name + "."):
            return prefix + pair[dst] + rest[len(name) :]
    return None


def diffusers_to_wan_key(key: str) -> str | None:
    """Wan's name for a diffusers ``WanTransformer3DModel`` key (None if it has none)."""
    return _rename(key, 1)


def wan_to_diffusers_key(key: str) -> str | None:
    """diffusers' name for a Wan key (None if it has none)."""
    return _rename(key, 0)


def looks_like_diffusers(keys: list[str]) -> bool:
    """True when the keys use diffusers' Wan names."""
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)


def _is_marker(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _MARKER_KEYS


def _strip_prefix(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str]]:
    """Remove wrapper fragments and a prefix shared by every (non-marker) key.

    In an all-in-one ComfyUI checkpoint only the ``model.diffusion_model.`` keys are the DiT;
    the others (VAE, text encoder) are dropped and returned.
    """
    sd = {_strip_fragments(k): v for k, v in sd.items()}
    dit = "model.diffusion_model."
    dropped = [k for k in sd if not k.startswith(dit) and not _is_marker(k)]
    if len(dropped) < len(sd) and any(k.startswith(dit) for k in sd) and dropped:
        sd = {k: v for k, v in sd.items() if k.startswith(dit) or _is_marker(k)}
    else:
        dropped = []
    stripped = ""
    for _ in range(3):  # e.g. "module.model.blocks..." needs two passes
        names = [k for k in sd if not _is_marker(k)]
        prefix = next((p for p in _PREFIXES if names and all(k.startswith(p) for k in names)), None)
        if prefix is None:
            break
        sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
        stripped += prefix
    return sd, stripped, dropped


def _strip_fragments(key: str) -> str:
    for frag in _STRIP_FRAGMENTS:
        key = key.replace(frag, "")
    return key


def _split_scales(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Take ComfyUI fp8 ``scale_weight`` tensors out (weight key -> scale); drop marker keys.

    The product weight * scale_weight is formed per tensor at conversion time (``RawCheckpoint.take``), so a
    14B fp8 file never exists as a whole in float32.
    """
    out, scales, dropped = dict(sd), {}, []
    for key in list(out):
        if _is_marker(key) or key.endswith(_DROP_SUFFIXES):
            dropped.append(key)
            del out[key]
    for key in [k for k in out if k.endswith(_SCALE_SUFFIXES)]:
        wkey = key.rsplit(".", 1)[0] + ".weight"
        if wkey not in out:
            raise CheckpointError(f"{key} has no matching weight {wkey}: the fp8 file is incomplete")
        scales[wkey] = out.pop(key)
        dropped.append(key)
    return out, scales, dropped


def _dequantised(
    weight: Tensor | QuantizedTensor, scale: Tensor | None, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """weight * scale_weight (float32 product, one tensor at a time), or a GGUF tensor unpacked, cast to
    ``dtype``."""
    if isinstance(weight, QuantizedTensor):
        try:
            return weight.dequantize(dtype, device)
        except GGUFError as err:
            raise CheckpointError(str(err)) from err
    if scale is None:
        return weight.to(device=device, dtype=dtype)
    weight = weight.to(device)
    scale = scale.to(device=device, dtype=torch.float32)
    scale = scale.reshape(scale.shape + (1,) * (weight.ndim - scale.ndim))  # scalar or [out] per row
    return (weight.float() * scale).to(dtype)


# -- containers ------------------------------------------------------------------------------
@contextlib.contextmanager
def reading_safetensors(path: str | Path) -> Iterator[None]:
    """Turn safetensors' own error on a truncated or corrupt file into one that names the file and the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is damaged or incomplete ({err}): download or copy it again (an interrupted download "
            "leaves a file like this)"
        ) from err


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with a clear error for a damaged file."""
    from safetensors.torch import load_file

    with reading_safetensors(path):
        return load_file(str(path))


def _read_safetensors(path: Path, meta: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    sd: dict[str, Tensor] = {}
    with reading_safetensors(path), safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            if meta:
                sl = f.get_slice(key)
                sd[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES[sl.get_dtype()], device="meta")
            else:
                sd[key] = f.get_tensor(key)
    return sd, metadata


def _read_sharded(index: Path, meta: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{index} is not a safetensors index (no 'weight_map'): {err}") from err
    sd, metadata = {}, {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"shard {shard} named in {index.name} is missing; put it in {index.parent}")
        part, part_meta = _read_safetensors(shard_path, meta)
        sd.update(part)
        metadata.update(part_meta)
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{len(missing)} keys of {index.name} are in no shard, e.g. {missing[:5]}")
    return sd, metadata


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a pickle that needs code to run is refused."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError, EOFError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(
            s in str(err) for s in ("PytorchStreamReader", "magic number", "zip archive", "mmap")
        ):  # out of memory and the like: not about the file's format
            raise
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        if not any("GLOBAL" in line for line in lines):  # not a pickle of tensors at all
            raise CheckpointError(
                f"{path} is not a readable checkpoint: neither safetensors nor a complete torch.save file "
                f"({type(err).__name__}). Give the model's .safetensors / .pt / .pth file, or download it again if "
                "it was cut short"
            ) from err
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs to run code to load ({reason}). "
            "Only plain tensors and containers are read (torch.load(weights_only=True)), because "
            "an untrusted pickle can execute arbitrary code. If you trust the file, convert it to "
            "safetensors once in a separate Python session: sd = torch.load(path, weights_only=False); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')"
        ) from err


def _unwrap_pickle(obj: Any, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a pickled object and the layout it implies."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    for key, layout in (("generator_ema", "self-forcing"), ("generator", "causvid")):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            if any(f in k for k in inner for f in _STRIP_FRAGMENTS):
                layout = "self-forcing"
            return inner, layout
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj.get(key), dict) and obj[key]:
            return obj[key], "pickle"
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, "pickle"
    raise CheckpointError(
        f"{path} has no state dict: top-level keys are {sorted(map(str, obj))[:10]}; expected "
        "'generator' / 'generator_ema' (CausVid, Self-Forcing) or a dict of tensors"
    )


def _is_gguf(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _read_gguf_file(path: Path) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """The tensors of a GGUF file (bytes left in the file) and its scalar metadata as ``gguf.KEY`` strings."""
    try:
        tensors, metadata = read_gguf(path)
    except GGUFError as err:
        raise CheckpointError(str(err)) from err
    arch = metadata.get("general.architecture")
    if isinstance(arch, str) and not arch.lower().startswith("wan") and arch != "pig":
        raise CheckpointError(
            f"{path} is a GGUF of a '{arch}' model, not a Wan2.1 DiT: give a Wan GGUF (ComfyUI-GGUF's Wan "
            "files, architecture 'wan'), or the model's .safetensors"
        )
    # this package's own keys (config, sampling, cache, fps, latent statistics: ``quantize``) pass as they are
    return tensors, {(k if k.startswith("causvid_") else f"gguf.{k}"): str(v) for k, v in metadata.items()
                     if not isinstance(v, list)}  # fmt: skip


def _find_in_folder(folder: Path) -> tuple[Path, dict[str, str]]:
    """The weights file of a model folder (diffusers or Wan) and its config.json as metadata."""
    if (folder / "transformer").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "transformer"  # a whole diffusers pipeline
    metadata: dict[str, str] = {}
    if (folder / "config.json").is_file():
        metadata["config.json"] = (folder / "config.json").read_text()
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth"):
        found = sorted(folder.glob(pattern))
        if pattern == "*.safetensors" and found and sorted(folder.glob("*.safetensors.index.json")):
            continue
        if len(found) == 1:
            return found[0], metadata
        if len(found) > 1:
            raise CheckpointError(f"{folder} has several {pattern} files {[p.name for p in found]}; pass one")
    raise CheckpointError(f"no weights (.safetensors, .gguf, .bin, .pt) found in {folder}")


@dataclass
class RawCheckpoint:
    """A checkpoint renamed to Wan's key names, before it meets a model."""

    state_dict: dict[str, Tensor | QuantizedTensor]  # GGUF tensors stay packed until taken
    layout: str
    metadata: dict[str, str]
    path: Path
    ignored_keys: list[str] = field(default_factory=list)  # fp8 scales, markers, non-DiT parts
    source_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> element count
    scales: dict[str, Tensor] = field(default_factory=dict)  # fp8 weight key -> scale_weight

    def take(self, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """Remove one tensor, dequantised (fp8 * scale_weight, GGUF blocks) and cast to ``dtype`` on ``device``."""
        return _dequantised(self.state_dict.pop(key), self.scales.pop(key, None), dtype, device)


def _read_raw(path: Path, meta: bool = False) -> RawCheckpoint:
    metadata: dict[str, str] = {}
    if path.is_dir():
        path, metadata = _find_in_folder(path)
    layout = None
    if path.name.endswith(".index.json"):
        sd, more = _read_sharded(path, meta)
        layout = "wan-sharded"
    elif path.suffix == ".safetensors":
        sd, more = _read_safetensors(path, meta)
    elif _is_gguf(path):
        sd, more = _read_gguf_file(path)
        layout = "gguf"
    else:
        sd, layout = _unwrap_pickle(safe_torch_load(path), path)
        sd, more = {k: v.to("meta") if meta else v for k, v in sd.items() if isinstance(v, Tensor)}, {}
    metadata = {**more, **metadata}
    sd, prefix, dropped = _strip_prefix(sd)
    dtypes = Counter()
    for v in sd.values():
        dtypes[str(v.dtype).removeprefix("torch.")] += v.numel()
    diffusers = looks_like_diffusers(list(sd))
    if diffusers:
        sd = {diffusers_to_wan_key(k) or k: v for k, v in sd.items()}
    sd, scales, ignored = _split_scales(sd)
    if META_KEY in metadata and layout != "gguf":
        layout = "causvid-safetensors"
    elif diffusers or '"WanTransformer3DModel"' in metadata.get("config.json", ""):
        layout = "diffusers"
    elif layout is None:
        fp8 = bool(scales) or any(v.dtype in _FP8 for v in sd.values())
        layout = "comfyui-fp8" if fp8 else "comfyui" if "diffusion_model." in prefix else "wan"
    return RawCheckpoint(sd, layout, metadata, path, ignored + dropped, dict(dtypes), scales)


def detect_layout(source: str | Path) -> str:
    """Name of the checkpoint layout of ``source`` (a key of ``LAYOUTS``); reads headers only."""
    return _read_raw(resolve_source(source), meta=True).layout


def read_state_dict(
    source: str | Path, *, meta: bool = False
) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    """(state dict with Wan key names, layout name, metadata) of any supported checkpoint.

    fp8 weights with a ``scale_weight`` and GGUF's quantised weights come back dequantised in float32;
    ``meta=True`` gives shape-only tensors (nothing is read but the headers, for safetensors and GGUF).
    """
    raw = _read_raw(resolve_source(source), meta=meta)
    for key in list(raw.scales):
        raw.state_dict[key] = raw.take(key, torch.float32, raw.state_dict[key].device)
    for key, value in raw.state_dict.items():
        if isinstance(value, QuantizedTensor):
            raw.state_dict[key] = torch.empty(value.shape, device="meta") if meta else value.dequantize()
    return raw.state_dict, raw.layout, raw.metadata


# -- config ----------------------------------------------------------------------------------
def default_num_heads(dim: int) -> int:
    """Wan's head count for a width: head_dim 128 (1536 -> 12 heads for 1.3B, 5120 -> 40 for 14B)."""
    return max(1, dim // 128)


def config_from_metadata(metadata: dict[str, str]) -> DiTConfig | None:
    """The config a file carries: our ``causvid_config`` metadata, or a Wan / diffusers config.json."""
    if META_KEY in metadata:
        data = json.loads(metadata[META_KEY])
        return dit_config_from_dict(data.get("dit", data))
    if "config.json" not in metadata:
        return None
    cfg = json.loads(metadata["config.json"])
    if "num_attention_heads" in cfg:  # diffusers WanTransformer3DModel
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        data = {
            "dim": heads * head_dim, "num_heads": heads, "ffn_dim": cfg.get("ffn_dim"),
            "num_layers": cfg.get("num_layers"), "freq_dim": cfg.get("freq_dim"),
            "text_dim": cfg.get("text_dim"), "in_dim": cfg.get("in_channels"),
            "out_dim": cfg.get("out_channels") or cfg.get("in_channels"),
            "patch_size": cfg.get("patch_size"), "eps": cfg.get("eps"),
            "qk_norm": cfg["qk_norm"] is not None if "qk_norm" in cfg else None,
            "cross_attn_norm": cfg.get("cross_attn_norm"),
            "model_type": "i2v" if cfg.get("image_dim") else "t2v",
        }  # fmt: skip
    else:  # Wan's own config.json (dim, num_heads, ...)
        data = {f: cfg[f] for f in DiTConfig.__dataclass_fields__ if f in cfg}
    return dit_config_from_dict({k: v for k, v in data.items() if v is not None})


def infer_config(state_dict: dict[str, Tensor], *, num_heads: int | None = None) -> DiTConfig:
    """DiTConfig from tensor shapes (Wan key names); heads from ``default_num_heads`` unless given."""
    sd = state_dict
    need = (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "head.head.weight",
    )
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(
            f"cannot infer the model size: keys {absent} are missing (found e.g. {sorted(sd)[:5]}); "
            "is this a Wan2.1 DiT checkpoint (not a VAE, text encoder or LoRA)?"
        )
    dim, in_dim, *patch = sd["patch_embedding.weight"].shape
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks or "blocks.0.ffn.0.weight" not in sd:
        raise CheckpointError("cannot infer the model size: no 'blocks.0.ffn.0.weight' in the checkpoint")
    i2v = any(k.startswith("img_emb.") or ".cross_attn.k_img." in k for k in sd)
    return DiTConfig(
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        num_heads=num_heads or default_num_heads(dim),
        num_layers=max(blocks) + 1,
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        text_dim=sd["text_embedding.0.weight"].shape[1],
        in_dim=in_dim,
        out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
        patch_size=tuple(patch),
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        model_type="i2v" if i2v else "t2v",
        image_dim=sd["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in sd else 1280,
    )


# -- checking and loading --------------------------------------------------------------------
def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def check_state_dict(state_dict: dict[str, Tensor], cfg: DiTConfig, *, strict: bool = True) -> list[str]:
    """Compare every key and shape with the model ``cfg`` builds; raise naming what differs.

    Returns the unexpected keys (only when ``strict`` is False; with ``strict`` they are an error).
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CausalWanModel(cfg).state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = sorted(
        f"{k} (file {list(state_dict[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_names(wrong)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit the model (dim={cfg.dim}, layers={cfg.num_layers}, "
            f"ffn_dim={cfg.ffn_dim}): " + "; ".join(problems) + ". Check that the file is a Wan2.1 T2V "
            "DiT and that an explicit config (if any) matches it, or pass strict=False to ignore "
            "unexpected keys."
        )
    return unexpected


def resolve_dtype(dtype: torch.dtype | str | None, source_dtypes: dict[str, int]) -> torch.dtype:
    """The load dtype: the one asked for, else the file's main float dtype (fp8 and GGUF quants -> bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    floats = {
        k: n for k, n in source_dtypes.items() if k.startswith(("float", "bfloat")) or is_quantized_name(k)
    }
    main = max(floats, key=floats.get) if floats else "float32"
    return torch.bfloat16 if main.startswith("float8") or is_quantized_name(main) else getattr(torch, main)


@dataclass
class LoadReport:
    """What ``load_model`` found and did."""

    source: str
    layout: str
    config: DiTConfig
    config_source: str  # "explicit", "file metadata", "config.json" or "inferred from shapes"
    dtype: torch.dtype
    device: str
    num_params: int
    source_dtypes: dict[str, int]
    ignored_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)  # LoraReport per merged LoRA
    packed: dict[str, int] = field(default_factory=dict)  # GGUF type -> linear layers kept packed

    def summary(self) -> str:
        """A few human-readable lines (what ``inspect`` prints)."""
        c = self.config
        lines = [
            f"source:     {self.source}",
            f"layout:     {self.layout} ({LAYOUTS.get(self.layout, '')})",
            f"config:     dim={c.dim} ffn_dim={c.ffn_dim} heads={c.num_heads} layers={c.num_layers} "
            f"freq_dim={c.freq_dim} text_dim={c.text_dim} in/out={c.in_dim}/{c.out_dim} "
            f"patch={tuple(c.patch_size)} qk_norm={c.qk_norm} cross_attn_norm={c.cross_attn_norm} "
            f"({self.config_source})",
            f"parameters: {self.num_params:,} ({_short(self.num_params)})",
            "file dtype: " + ", ".join(f"{k} ({n:,})" for k, n in sorted(self.source_dtypes.items())),
            f"load dtype: {str(self.dtype).removeprefix('torch.')} "
            + ("(default; weights not loaded)" if self.device == "meta" else f"on {self.device}"),
        ]
        preset = next((name for name, p in PRESETS.items() if p.dit == c), None)
        if preset:
            lines.insert(3, f"preset:     {preset}")
        if self.ignored_keys:
            lines.append(
                f"not loaded: {len(self.ignored_keys)} keys (fp8 scales folded in, markers, non-DiT parts): "
                f"{_names(self.ignored_keys, 3)}"
            )
        if self.unexpected_keys:
            lines.append(
                f"ignored:    {len(self.unexpected_keys)} unexpected keys: {_names(self.unexpected_keys)}"
            )
        if self.packed:
            lines.append(
                "packed:     "
                + ", ".join(f"{n} {kind}" for kind, n in sorted(self.packed.items()))
                + " linear layers keep the file's blocks in memory, unpacked for each matmul"
            )
        lines += ["lora:       " + lora.summary() for lora in self.loras]
        return "\n".join(lines)


def _pick_config(raw: RawCheckpoint, config: DiTConfig | None) -> tuple[DiTConfig, str]:
    if config is not None:
        return config, "explicit"
    from_file = config_from_metadata(raw.metadata)
    if from_file is not None:
        return from_file, "file metadata" if META_KEY in raw.metadata else "config.json"
    return infer_config(raw.state_dict), "inferred from shapes"


def describe(source: str | Path, *, config: DiTConfig | None = None) -> LoadReport:
    """Layout, config, parameter count and dtypes of a checkpoint, reading shapes only."""
    raw = _read_raw(resolve_source(source), meta=True)
    cfg, how = _pick_config(raw, config)
    # i2v files cannot be built (CausalWanModel is T2V) but can still be described
    unexpected = check_state_dict(raw.state_dict, cfg, strict=False) if cfg.model_type == "t2v" else []
    n = sum(v.numel() for k, v in raw.state_dict.items() if k not in unexpected)
    dtype = resolve_dtype(None, raw.source_dtypes)
    return LoadReport(str(source), raw.layout, cfg, how, dtype, "meta", n, raw.source_dtypes,
                      raw.ignored_keys, unexpected)  # fmt: skip


def load_model(
    source: str | Path,
    *,
    config: DiTConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    lora: list[tuple[str | Path, float]] | None = None,
    strict: bool = True,
    packed: bool = False,
) -> tuple[CausalWanModel, LoadReport]:
    """Load any supported DiT checkpoint (path, folder or ``hf://`` reference) into CausalWanModel.

    The config comes from ``config``, else the file (metadata / config.json), else tensor shapes.
    ``dtype`` None keeps the file's main float dtype (fp8 and quantised GGUF files load as bfloat16). LoRAs are
    merged as W' = W + strength * alpha / rank * up @ down. The model is built on ``meta`` and the
    converted tensors are assigned, so the weights exist once. ``packed`` keeps a GGUF file's quantised
    block linears (attention and FFN) in their blocks (``PackedLinear``: the file's size in memory, one
    unpacking per matmul; inference only); a layer a LoRA changes is unpacked to merge it.
    """
    from .lora import merge_lora, read_lora

    raw = _read_raw(resolve_source(source))
    cfg, how = _pick_config(raw, config)
    unexpected = check_state_dict(raw.state_dict, cfg, strict=strict)
    target = resolve_dtype(dtype, raw.source_dtypes)
    sd = _UnpackOnRead(target, device)
    for key in list(raw.state_dict):
        value = raw.state_dict[key]
        if key in unexpected:
            raw.state_dict.pop(key)
        elif (
            packed
            and isinstance(value, QuantizedTensor)
            and is_quantized_name(value.type_name)
            and _packable(key)
        ):
            sd[key] = raw.state_dict.pop(key)  # stays in its blocks unless a LoRA reads it
        else:
            sd[key] = raw.take(key, target, device)
    reports = [merge_lora(sd, read_lora(path), strength, name=str(path)) for path, strength in lora or []]
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    kinds: Counter[str] = Counter()
    for key, value in list(dict.items(sd)):
        if isinstance(value, QuantizedTensor):
            parent, name = key.removesuffix(".weight").rsplit(".", 1)
            layer = PackedLinear(value, device, target)
            setattr(model.get_submodule(parent), name, layer)
            del sd[key]
            sd[f"{parent}.{name}.packed"] = layer.packed
            kinds[value.type_name] += 1
    model.load_state_dict(dict(sd), strict=True, assign=True)
    model.eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    n += sum(m.weight_numel for m in model.modules() if isinstance(m, PackedLinear))
    report = LoadReport(
        source=str(source), layout=raw.layout, config=cfg, config_source=how, dtype=target,
        device=str(device), num_params=n, source_dtypes=raw.source_dtypes, ignored_keys=raw.ignored_keys,
        unexpected_keys=unexpected, loras=reports, packed=dict(kinds),
    )  # fmt: skip
    return model, report


_PACKABLE_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                    "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip


def _packable(key: str) -> bool:
    """A transformer block's attention or FFN weight (the bulk of the parameters)."""
    parts = key.split(".")
    return parts[0] == "blocks" and parts[-1] == "weight" and ".".join(parts[2:-1]) in _PACKABLE_LAYERS


class _UnpackOnRead(dict):
    """A state dict whose packed GGUF entries unpack (to the load dtype and device) when read, as a LoRA
    merge reads the weights it changes; iterating and ``dict.items`` leave them packed."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.dtype, self.device = dtype, device

    def __getitem__(self, key: str) -> Tensor:
        value = super().__getitem__(key)
        if isinstance(value, QuantizedTensor):
            value = _dequantised(value, None, self.dtype, self.device)
            self[key] = value
        return value


def save_model(model: CausalWanModel, path: str | Path, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the weights as safetensors with the DiTConfig as JSON under ``causvid_config``."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", META_KEY: json.dumps(to_dict(model.config))}
    for key, value in (extra_metadata or {}).items():
        if key == META_KEY:
            raise ValueError(f"extra_metadata may not override {META_KEY!r}")
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # an interrupted save never leaves a truncated file under the real name
    return path
