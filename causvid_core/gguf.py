"""GGUF files (llama.cpp's container, in which ComfyUI-GGUF and others ship quantised Wan2.1 DiTs).

``read_gguf`` parses the header and leaves every tensor's bytes in the file (memory-mapped);
``QuantizedTensor.dequantize`` turns one tensor into float on a device, in torch, so a 14B file is
never whole in float32 and a GPU does the unpacking. The block formats follow ggml's definitions
(``ggml-common.h``): ``Q8_0``, ``Q5_0``/``Q5_1``, ``Q4_0``/``Q4_1`` (32 weights per block) and the
k-quants ``Q6_K``, ``Q5_K``, ``Q4_K``, ``Q3_K``, ``Q2_K`` (256 weights per super-block), plus the
plain ``F32``/``F16``/``BF16``/``F64`` and integer types. Tensors of more than 4 dimensions (Wan's
patch embedding) are either stored whole or flattened with their shape under the metadata key
``comfy.gguf.orig_shape.NAME``, as ComfyUI-GGUF writes them; both are read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

MAGIC = b"GGUF"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
QK_K = 256
# ggml type id -> (name, weights per block, bytes per block); the ids are ggml's enum ggml_type.
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
    15: ("Q8_K", QK_K, 292), 16: ("IQ2_XXS", QK_K, 66), 17: ("IQ2_XS", QK_K, 74), 18: ("IQ3_XXS", QK_K, 98),
    19: ("IQ1_S", QK_K, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", QK_K, 110), 22: ("IQ2_S", QK_K, 82),
    23: ("IQ4_XS", QK_K, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", QK_K, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", QK_K, 54),
    35: ("TQ2_0", QK_K, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}  # fmt: skip
# metadata value type id -> struct format (8: string, 9: array are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or a tensor type that cannot be dequantised; says what to do."""


@dataclass
class QuantizedTensor:
    """One tensor of a GGUF file: its type, logical (torch-order) shape and its bytes, still in the file."""

    name: str
    type_id: int
    shape: torch.Size
    data: np.ndarray  # uint8, a slice of the file's memory map

    @property
    def type_name(self) -> str:
        return TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]

    @property
    def dtype(self) -> str:
        """What a torch tensor's dtype says, for a file's dtype summary: ``float16`` for F16, else the
        ggml type's name (``Q4_K``)."""
        plain = _PLAIN.get(self.type_name)
        return str(plain).removeprefix("torch.") if plain is not None else self.type_name

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def raw(self, device: torch.device | str = "cpu") -> Tensor:
        """The packed bytes (uint8) on ``device``, read from the file."""
        return torch.from_numpy(np.array(self.data, copy=True)).to(device)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """The tensor as ``dtype`` on ``device`` (unpacked on that device, through float32)."""
        check_type(self.type_id, self.name)
        return unpack(self.raw(device), self.type_id, self.shape, dtype)


def check_type(type_id: int, name: str) -> None:
    """Raise naming the tensor when its type has no unpacker here."""
    kind = TYPES.get(type_id, (f"type {type_id}", 0, 0))[0]
    if kind not in _PLAIN and kind not in _DEQUANT:
        raise GGUFError(
            f"tensor {name} is stored as {kind}, which this loader cannot dequantise (it reads "
            f"{', '.join(SUPPORTED)}); use a GGUF of this model in one of those types"
        )


def unpack(raw: Tensor, type_id: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Packed bytes (uint8, any device) of a ``type_id`` tensor -> ``dtype`` [shape] on the same device."""
    kind, _, block = TYPES[type_id]
    out = raw.view(_PLAIN[kind]) if kind in _PLAIN else _DEQUANT[kind](raw.view(-1, block)).reshape(-1)
    return out.reshape(shape).to(dtype)


class PackedLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF block format (Q4_K, Q8_0, ...) on the device and is
    unpacked for each matmul: the weights take the file's size in memory (a Q4_K 14B model about 8 GB
    where bfloat16 takes 28), at the cost of one unpacking per layer per forward pass."""

    def __init__(
        self, tensor: QuantizedTensor, device: torch.device | str, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        check_type(tensor.type_id, tensor.name)
        self.out_features, self.in_features = tensor.shape
        self.type_id, self.compute_dtype = tensor.type_id, compute_dtype
        self.register_buffer("packed", tensor.raw(device))
        self.bias = nn.Parameter(torch.empty(self.out_features, device="meta"), requires_grad=False)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def unpacked_weight(self) -> Tensor:
        return unpack(
            self.packed, self.type_id, torch.Size((self.out_features, self.in_features)), self.compute_dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return nn.functional.linear(x.to(self.compute_dtype), self.unpacked_weight(), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {TYPES[self.type_id][0]}"


# -- block formats (each takes uint8 [blocks, bytes] and gives float32 [blocks, weights]) --------------
def _f16(b: Tensor, at: int) -> Tensor:
    """The little-endian float16 at byte ``at`` of each block, as float32 [blocks, 1]."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """Low nibbles then high nibbles of each 16-byte row ([n, 16] -> [n, 32]), ggml's order in a block."""
    qs = qs.contiguous()  # shifts of a strided slice run several times slower on a CPU
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: Tensor, count: int) -> Tensor:
    """Bit ``j`` of the little-endian integer in ``qh`` [n, count / 8], for j < count, as uint8 [n, count]."""
    qh = qh.contiguous()
    return torch.stack([(qh >> s) & 1 for s in range(8)], dim=-1).reshape(qh.shape[0], count)


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:20]).float() + _f16(b, 2)


def _q5(b: Tensor, qh_at: int) -> Tensor:
    high = _bits(b[:, qh_at : qh_at + 4], 32)
    return (_nibbles(b[:, qh_at + 4 : qh_at + 20]) | (high << 4)).float()


def _q5_0(b: Tensor) -> Tensor:
    return _f16(b, 0) * (_q5(b, 2) - 16)


def _q5_1(b: Tensor) -> Tensor:
    return _f16(b, 0) * _q5(b, 4) + _f16(b, 2)


def _shifted(x: Tensor, shifts: tuple[int, ...], mask: int) -> Tensor:
    """``(x >> s) & mask`` for each shift, stacked before x's last axis: [n, g, L] -> [n, g, len(shifts), L]."""
    x = x.contiguous()  # Python-int shifts: no small host-to-device copy (a GPU stall) per layer
    return torch.stack([(x >> s) & mask for s in shifts], dim=-2)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _shifted(qs.view(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _shifted(packed[:, :8].view(n, 1, 8), (0, 4), 0x0F).reshape(n, 16)
    high = _shifted(packed[:, 8:].view(n, 1, 4), (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = (low | (high << 4)).float() - 32
    dl = (_f16(b, 108) * scales).view(n, 16, 1)
    ql = _shifted(qs.view(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    qh = _shifted(hmask.view(n, 1, 32), tuple(range(8)), 1).reshape(n, 16, 16).float()
    return (dl * (ql - 4 * (1 - qh))).reshape(n, QK_K)  # a clear high bit subtracts 4


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins of a Q4_K / Q5_K super-block from its 12 packed bytes."""
    n = packed.shape[0]
    d, m, md = packed.view(n, 3, 4).unbind(1)
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale.float(), mins.float()


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, mins = _k_scales(b[:, 4:16])
    q = _shifted(b[:, 16:144].view(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32).float()
    return ((_f16(b, 0) * scale).view(n, 8, 1) * q - (_f16(b, 2) * mins).view(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, mins = _k_scales(b[:, 4:16])
    ql = _shifted(b[:, 48:176].view(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 16:48].view(n, 1, 32), tuple(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return ((_f16(b, 0) * scale).view(n, 8, 1) * q - (_f16(b, 2) * mins).view(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = _shifted(b[:, :128].view(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 128:192].view(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    return ((_f16(b, 208) * scales).view(n, 16, 1) * q).reshape(n, QK_K)


_DEQUANT = {"Q8_0": _q8_0, "Q6_K": _q6_k, "Q5_K": _q5_k, "Q5_1": _q5_1, "Q5_0": _q5_0, "Q4_K": _q4_k,
            "Q4_1": _q4_1, "Q4_0": _q4_0, "Q3_K": _q3_k, "Q2_K": _q2_k}  # fmt: skip
SUPPORTED = ("F32", "F16", "BF16", *_DEQUANT)


def is_quantized_name(name: str) -> bool:
    """True for a ggml block type's name (``Q8_0``, ``Q4_K``, ``IQ2_XS``, ...): a dtype summary's quantised part."""
    return any(name == t[0] for t in TYPES.values()) and name not in _PLAIN


# -- the container -------------------------------------------------------------------------------
class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        chunk = self.f.read(size)
        if len(chunk) < size:
            raise GGUFError(
                f"{self.path} ends inside its header: the file is incomplete; download or copy it again"
            )
        return struct.unpack(fmt, chunk)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 24:
            raise GGUFError(f"{self.path}: a header string claims {n} bytes; the file is damaged")
        data = self.f.read(n)
        if len(data) < n:
            raise GGUFError(
                f"{self.path} ends inside its header: the file is incomplete; download or copy it again"
            )
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            inner, count = self.take("<I"), self.take("<Q")
            return [self.value(inner) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFError(
                f"{self.path}: unknown metadata value type {kind}; the file is damaged or newer than this reader"
            )
        return self.take(_SCALARS[kind])


def read_gguf(path: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """(tensors by name, metadata) of a GGUF file; the tensors' bytes stay in the file until dequantised."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version = r.take("<I")
        if version not in (2, 3):
            raise GGUFError(
                f"{path} is GGUF version {version}; versions 2 and 3 are read. "
                + ("Version 1 is obsolete: convert the model again with a current tool" if version == 1 else
                   "Was it written big-endian, or by a newer tool?")
            )  # fmt: skip
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.take("<Q") for _ in range(r.take("<I"))]
            infos.append((name, dims, r.take("<I"), r.take("<Q")))
        align = int(metadata.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    tensors: dict[str, QuantizedTensor] = {}
    for name, dims, kind, offset in infos:
        count = int(np.prod(dims)) if dims else 1
        per_block, block_bytes = TYPES.get(kind, ("", 0, 0))[1:]
        if not per_block:
            raise GGUFError(
                f"{path}: tensor {name} has unknown ggml type {kind}; the file is newer than this reader"
            )
        if count % per_block:
            raise GGUFError(
                f"{path}: tensor {name} has {count} values, not a whole number of {per_block}-value blocks"
            )
        nbytes = count // per_block * block_bytes
        begin = start + offset
        if begin + nbytes > size:
            raise GGUFError(
                f"{path} is damaged or incomplete: tensor {name} ends at byte {begin + nbytes:,} of a "
                f"{size:,}-byte file; download or copy it again (an interrupted download leaves a file like this)"
            )
        shape = list(reversed(dims))  # ggml lists the fastest-varying dimension first
        orig = metadata.get(ORIG_SHAPE_KEY + name)
        if orig is not None:
            if int(np.prod(orig)) != count:
                raise GGUFError(
                    f"{path}: {ORIG_SHAPE_KEY}{name} = {orig} does not hold the tensor's {count} values"
                )
            shape = [int(d) for d in orig]
        tensors[name] = QuantizedTensor(name, kind, torch.Size(shape), mm[begin : begin + nbytes])
    return tensors, metadata


# -- writing ------------------------------------------------------------------------------------------
_TYPE_IDS = {name: i for i, (name, _, _) in TYPES.items()}
WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16", "F32")


def _roundf(x: Tensor) -> Tensor:
    """C's roundf (halves away from zero), as ggml quantises; torch.round rounds halves to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize(x: Tensor, kind: str) -> Tensor:
    """float [..., n] -> the packed bytes (uint8, flat) of ``kind``, as ggml's reference quantisers make them."""
    if kind not in WRITABLE:
        raise GGUFError(f"cannot write {kind}: choose one of {', '.join(WRITABLE)}")
    x = x.detach().float().reshape(-1)
    if kind in _PLAIN:
        return x.to(_PLAIN[kind]).contiguous().view(torch.uint8)
    if x.numel() % 32:
        raise GGUFError(f"{kind} needs a multiple of 32 values, got {x.numel()}")
    blocks = x.view(-1, 32)
    if kind == "Q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _roundf(blocks * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([d.half().view(torch.uint8), q], dim=1).reshape(-1)
    levels = 16 if kind.startswith("Q4") else 32
    if kind.endswith("_0"):  # symmetric: the value of largest magnitude maps to -levels/2
        peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
        d = peak / -(levels // 2)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inv + (levels // 2 + 0.5)).clamp(0, levels - 1).to(torch.uint8)
        head = d.half().view(torch.uint8)
    else:  # _1: min and step, q = trunc((x - min) / d + 0.5)
        low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        d = (high - low) / (levels - 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((blocks - low) * inv + 0.5).clamp(0, levels - 1).to(torch.uint8)
        head = torch.cat([d.half().view(torch.uint8), low.half().view(torch.uint8)], dim=1)
    nibbles = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    if levels == 16:
        return torch.cat([head, nibbles], dim=1).reshape(-1)
    high_bits = (q >> 4).to(torch.int64) << torch.arange(32)  # bit j of qh: the fifth bit of value j
    qh = high_bits.sum(dim=1, keepdim=True).to(torch.int64)
    qh_bytes = torch.cat([((qh >> (8 * i)) & 0xFF) for i in range(4)], dim=1).to(torch.uint8)
    return torch.cat([head, qh_bytes, nibbles], dim=1).reshape(-1)


def _pack_value(value: Any) -> bytes:
    """A metadata value as GGUF stores it: type id, then the value (strings, ints, floats, bools, lists)."""
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<Iq", 11, value) if not 0 <= value < 2**32 else struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        raw = value.encode()
        return struct.pack("<IQ", 8, len(raw)) + raw
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    raise GGUFError(f"cannot store metadata value {value!r} in GGUF")


def write_gguf(
    path: str | Path,
    tensors: list[tuple[str, tuple[int, ...], str, Any]],
    metadata: dict[str, Any],
    alignment: int = 32,
) -> Path:
    """Write a GGUF file: ``tensors`` are (name, torch-order shape, type, producer) where ``producer()`` gives
    the packed bytes (``quantize``), called one tensor at a time so a large model is never whole in memory.
    Written to a temporary name and renamed, so an interrupted write leaves no file under ``path``."""
    import os

    path = Path(path)
    infos, offset = [], 0
    for name, shape, kind, _ in tensors:
        _, per_block, size = TYPES[_TYPE_IDS[kind]]
        count = int(np.prod(shape)) if shape else 1
        nbytes = count // per_block * size
        infos.append((name, shape, kind, offset, nbytes))
        offset += -(-nbytes // alignment) * alignment
    head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata) + 1))
    for key, value in {"general.alignment": alignment, **metadata}.items():
        raw = key.encode()
        head += struct.pack("<Q", len(raw)) + raw + _pack_value(value)
    for name, shape, kind, off, _ in infos:
        raw = name.encode()
        head += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", _TYPE_IDS[kind], off)
    head += b"\0" * (-len(head) % alignment)
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for (name, _, _, producer), (_, _, _, _, nbytes) in zip(tensors, infos, strict=True):
                data = producer().cpu().numpy().tobytes()
                if len(data) != nbytes:
                    raise GGUFError(f"{name}: {len(data)} bytes where its shape and type need {nbytes}")
                f.write(data + b"\0" * (-nbytes % alignment))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
