"""3D rotary embeddings, block-causal masks and the attention call.

RoPE follows Wan2.1: the head dimension is split into a time part and two space parts
(``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)``) and adjacent pairs of channels rotate together.
Angles are computed in float64 from integer positions, so any frame index works (no 1024 table).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Attention backends a user can pick; "auto" lets PyTorch choose the fastest kernel it has.
ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
_GPU_ONLY = {"flash", "cudnn"}


def rope_inv_freqs(head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse frequencies of the (frame, row, column) parts, float64: theta^(-2j/d_part)."""
    d_space = 2 * (head_dim // 6)
    d_time = head_dim - 2 * d_space
    parts = []
    for d_part in (d_time, d_space, d_space):
        parts.append(1.0 / theta ** (torch.arange(0, d_part, 2, dtype=torch.float64) / d_part))
    return parts[0], parts[1], parts[2]


def rope_angles(
    frame_positions: Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0
) -> Tensor:
    """Rotation angles [F*H*W, head_dim/2] (float64) for tokens ordered (frame, row, column)."""
    inv_t, inv_h, inv_w = (f.to(frame_positions.device) for f in rope_inv_freqs(head_dim, theta))
    frames = frame_positions.to(torch.float64)
    n_f = frames.numel()
    rows = torch.arange(height, dtype=torch.float64, device=frames.device)
    cols = torch.arange(width, dtype=torch.float64, device=frames.device)
    a_t = torch.outer(frames, inv_t)[:, None, None, :].expand(n_f, height, width, -1)
    a_h = torch.outer(rows, inv_h)[None, :, None, :].expand(n_f, height, width, -1)
    a_w = torch.outer(cols, inv_w)[None, None, :, :].expand(n_f, height, width, -1)
    return torch.cat([a_t, a_h, a_w], dim=-1).reshape(n_f * height * width, -1)


class RopeTable:
    """cos/sin of rope angles for a token grid, cast once to the compute dtype.

    ``apply`` rotates each adjacent channel pair as one complex product, (x0 + i x1)(cos + i sin),
    which is the same arithmetic as the explicit pair formula and many times faster on a CPU.
    """

    def __init__(self, angles: Tensor, dtype: torch.dtype = torch.float32) -> None:
        self.cos = torch.cos(angles).to(dtype)  # [L, D/2]
        self.sin = torch.sin(angles).to(dtype)
        self.rotation = torch.complex(self.cos.float(), self.sin.float())[None, :, None, :]  # [1, L, 1, D/2]

    @classmethod
    def for_frames(
        cls,
        frame_positions: Tensor,
        height: int,
        width: int,
        head_dim: int,
        theta: float = 10000.0,
        dtype: torch.dtype = torch.float32,
    ) -> RopeTable:
        return cls(rope_angles(frame_positions, height, width, head_dim, theta), dtype)

    @classmethod
    def cached(
        cls,
        frame_positions: Sequence[int],
        height: int,
        width: int,
        head_dim: int,
        theta: float = 10000.0,
        device: torch.device | str = "cpu",
    ) -> RopeTable:
        """``for_frames`` through a small LRU cache: the steps of a chunk (and every block) share one table."""
        key = (tuple(frame_positions), height, width, head_dim, theta, str(torch.device(device)))
        table = _ROPE_CACHE.get(key)
        if table is None:
            positions = torch.tensor(key[0], dtype=torch.long, device=device)
            table = _ROPE_CACHE[key] = cls.for_frames(positions, height, width, head_dim, theta)
            while len(_ROPE_CACHE) > ROPE_CACHE_SIZE:
                _ROPE_CACHE.popitem(last=False)
        else:
            _ROPE_CACHE.move_to_end(key)
        return table

    def apply(self, x: Tensor) -> Tensor:
        """Rotate adjacent channel pairs of ``x`` [B, L, heads, head_dim]; result in x's dtype."""
        b, n, h, d = x.shape
        if torch.compiler.is_compiling():  # inductor does not generate code for complex products
            xf = x.float().reshape(b, n, h, d // 2, 2)
            cos, sin = self.rotation.real, self.rotation.imag
            out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 0] * sin + xf[..., 1] * cos], -1)
            return out.reshape(b, n, h, d).to(x.dtype)
        pairs = torch.view_as_complex(x.float().reshape(b, n, h, d // 2, 2))  # [B, L, heads, D/2]
        return torch.view_as_real(pairs * self.rotation).reshape(b, n, h, d).to(x.dtype)


# Tables kept by ``RopeTable.cached``: a few chunks' worth (absolute positions move on every chunk).
ROPE_CACHE_SIZE = 16
_ROPE_CACHE: OrderedDict[tuple, RopeTable] = OrderedDict()


def block_causal_frame_mask(
    chunk_sizes: list[int], sink_chunks: int | None = None, window_chunks: int | None = None
) -> Tensor:
    """Frame-level mask [F, F], True where frame j is visible to frame i.

    Block-causal: ``chunk(j) <= chunk(i)``. With a rolling window (``sink_chunks`` and
    ``window_chunks`` given), earlier chunks are visible only if they are sink chunks or among
    the ``window_chunks`` chunks right before i's chunk -- exactly what the rolling KVCache keeps.
    """
    chunk_of = torch.repeat_interleave(
        torch.arange(len(chunk_sizes)), torch.tensor(chunk_sizes, dtype=torch.long)
    )
    ci, cj = chunk_of[:, None], chunk_of[None, :]
    mask = cj <= ci
    if window_chunks is not None:
        sink = sink_chunks or 0
        mask &= (cj == ci) | (cj < sink) | (cj >= ci - window_chunks)
    return mask


def token_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """Expand a frame-level mask to tokens [F*S, F*S]."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def check_backend(name: str, device: torch.device | str) -> None:
    """Fail early, with the fix, when a backend cannot run on ``device``."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name in _GPU_ONLY and torch.device(device).type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA GPU; use 'auto' or 'math' on {device}")


@contextlib.contextmanager
def backend_context(name: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to one backend inside the block ('auto': no restriction)."""
    backend = ATTENTION_BACKENDS[name]
    if backend is None:
        yield
        return
    with sdpa_kernel(backend):
        yield


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on [B, L, heads, head_dim] tensors; returns [B, Lq, heads*head_dim]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # [B, heads, Lq, head_dim]
    return out.transpose(1, 2).flatten(2)
