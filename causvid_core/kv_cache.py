"""The explicit self-attention KV cache of streaming inference, with a rolling window.

The cache is an object passed into ``CausalWanModel.forward``; it is never stored on a module.
It keeps the keys and values of whole chunks: the first ``sink_chunks`` chunks forever and the
last ``window_chunks`` chunks after them, so memory and the cost of a new chunk stay constant
however long the stream runs.

Frame positions past the trained horizon (``rope_mode``):
- ``"absolute"`` (the reference): keys are stored already rotated at their absolute latent-frame
  index and a new chunk uses its absolute index, so the distance between the newest chunk and the
  sink grows without bound; relative distances inside the window stay those seen in training.
- ``"window"``: keys are stored before rotation and re-rotated at every chunk at their position
  inside the cache (sink first, then the window, then the new chunk), so the model never sees a
  position past ``(sink + window + 1) * chunk`` frames; the sink appears adjacent to the window.
Before the window first fills, both modes give identical results.

Memory layout (``layout``):
- ``"compact"`` (the reference): cached chunks sit in order; evicting the oldest window chunk moves
  every later chunk down (a memmove of the window per layer and chunk).
- ``"ring"``: every chunk keeps its slot; a new chunk overwrites the evicted chunk's slot (an index
  moves, not memory), and the buffers hold one spare chunk after the stored ones, so the chunk being
  generated is written there in place and attention reads one fixed view (no concatenation). Keys
  are then in slot order, not time order; attention without a mask does not depend on key order
  (``"absolute"`` keys carry their RoPE; ``"window"`` re-rotates each slot at its logical position,
  ``logical_positions``), so both layouts compute the same up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from .config import CausalConfig, DiTConfig

CacheLayout = Literal["compact", "ring"]
LAYOUTS = ("compact", "ring")


@dataclass
class _Chunk:
    start_frame: int  # absolute latent-frame index of its first frame
    num_frames: int


class CacheTooLargeError(ValueError):
    """The KV cache would not fit in the device's free memory; the message gives its size and the fixes."""


def format_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GB"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def free_bytes(device: torch.device | str) -> int | None:
    """Memory a new tensor can take on a CUDA device (the driver's free memory plus what torch holds unused);
    None where it cannot be told (a CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass(frozen=True)
class CachePlan:
    """The cache a stream will allocate: its size, the line that says so, and whether it fits the device."""

    dit: DiTConfig
    causal: CausalConfig
    batch: int
    latent_height: int
    latent_width: int
    dtype: torch.dtype = torch.bfloat16
    layout: CacheLayout = "compact"

    @property
    def nbytes(self) -> int:
        dit = self.dit
        tokens = KVCache.buffer_frames(self.causal, self.layout) * dit.tokens_per_frame(
            self.latent_height, self.latent_width
        )
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * dit.num_layers * self.batch * tokens * dit.num_heads * dit.head_dim * elem

    def describe(self) -> str:
        """One line saying what the cache will hold and its size, for before a render starts."""
        c = self.causal
        return (
            f"KV cache {format_bytes(self.nbytes)}: {c.sink_chunks} sink + {c.window_chunks} window chunks of "
            f"{KVCache.largest_chunk(c)} latent frames"
            + (" + 1 spare (ring)" if self.layout == "ring" else "")
            + f" at {self.latent_height}x{self.latent_width} latents, {self.dit.num_layers} layers"
            + (f", batch {self.batch}" if self.batch > 1 else "")
            + f", {str(self.dtype).removeprefix('torch.')}"
        )

    def check_fits(self, device: torch.device | str) -> None:
        """Raise ``CacheTooLargeError`` (its size, the cost of one window chunk, the fixes) when the cache would
        not fit in the device's free memory; a render calls it before it writes anything. A no-op where the
        free memory cannot be told (CPU)."""
        free = free_bytes(device)
        if free is not None and self.nbytes > free:
            raise CacheTooLargeError(self.too_large(free, device))

    def too_large(self, free: int, device: torch.device | str) -> str:
        one = replace(self, causal=replace(self.causal, sink_chunks=0, window_chunks=1), layout="compact")
        return (
            f"{self.describe()}, but {format_bytes(free)} of {device} is free. Lower the window "
            f"(each window chunk holds {format_bytes(one.nbytes)}; the sink stays), the size or the batch, "
            "or free GPU memory (a GGUF or the fp8 speed option makes the weights smaller)"
        )


@dataclass
class KVCache:
    """Per-layer key/value buffers [B, capacity_tokens, heads, head_dim] plus chunk bookkeeping."""

    keys: list[Tensor]
    values: list[Tensor]
    tokens_per_frame: int
    sink_chunks: int
    window_chunks: int
    rope_mode: str = "absolute"
    chunks: list[_Chunk] = field(default_factory=list)
    _pending: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    layout: CacheLayout = "compact"
    offsets: list[int] = field(default_factory=list)  # first token of each chunk in ``chunks``
    spare_tokens: int = 0  # room after the stored chunks for the chunk being generated (ring)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"cache layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if len(self.offsets) != len(self.chunks):  # a cache built from chunks in order
            self.offsets = self._packed_offsets(self.chunks)

    @classmethod
    def allocate(
        cls,
        dit: DiTConfig,
        causal: CausalConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        layout: CacheLayout = "compact",
    ) -> KVCache:
        """Preallocate a cache sized for ``sink + window`` chunks of the largest chunk size (plus the
        chunk being generated for ``layout="ring"``)."""
        if layout not in LAYOUTS:
            raise ValueError(f"cache layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        tpf = dit.tokens_per_frame(latent_height, latent_width)
        cap = cls.buffer_frames(causal, layout) * tpf
        spare = cap - cls.capacity_frames(causal) * tpf
        shape = (batch, cap, dit.num_heads, dit.head_dim)
        plan = CachePlan(dit, causal, batch, latent_height, latent_width, dtype, layout)
        plan.check_fits(device)
        try:
            keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dit.num_layers)]
            values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dit.num_layers)]
        except torch.OutOfMemoryError:
            raise CacheTooLargeError(plan.too_large(free_bytes(device) or 0, device)) from None
        return cls(
            keys, values, tpf, causal.sink_chunks, causal.window_chunks, causal.rope_mode,
            layout=layout, spare_tokens=spare,
        )  # fmt: skip

    @staticmethod
    def largest_chunk(causal: CausalConfig) -> int:
        """Latent frames of the largest chunk the cache stores (a longer first chunk counts)."""
        return max(causal.chunk_frames, causal.first_chunk_frames or 0)

    @staticmethod
    def capacity_frames(causal: CausalConfig) -> int:
        return (causal.sink_chunks + causal.window_chunks) * KVCache.largest_chunk(causal)

    @staticmethod
    def buffer_frames(causal: CausalConfig, layout: CacheLayout = "compact") -> int:
        """Frames the buffers hold: the stored chunks, plus one chunk of room for ``"ring"``."""
        extra = KVCache.largest_chunk(causal) if layout == "ring" else 0
        return KVCache.capacity_frames(causal) + extra

    @staticmethod
    def estimate_bytes(
        dit: DiTConfig,
        causal: CausalConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        dtype: torch.dtype = torch.bfloat16,
        layout: CacheLayout = "compact",
    ) -> int:
        """Bytes the cache will hold, to report before a render starts."""
        return CachePlan(dit, causal, batch, latent_height, latent_width, dtype, layout).nbytes

    # -- reading ---------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return sum(c.num_frames for c in self.chunks)

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def next_frame(self) -> int:
        """Absolute index of the frame after the last cached one (0 when empty)."""
        return self.chunks[-1].start_frame + self.chunks[-1].num_frames if self.chunks else 0

    @property
    def capacity_tokens(self) -> int:
        """Tokens the stored chunks may occupy (the ring's room for the chunk being generated excluded)."""
        return self.keys[0].shape[1] - self.spare_tokens

    def _slot_order(self) -> list[int]:
        """Indices into ``chunks`` sorted by where each chunk sits in the buffers."""
        return sorted(range(len(self.chunks)), key=lambda i: self.offsets[i])

    def frame_positions(self) -> Tensor:
        """Absolute latent-frame index of every cached frame, in buffer order (as ``read`` returns them)."""
        pos = [torch.arange(c.start_frame, c.start_frame + c.num_frames) for c in self.chunks]
        if not pos:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([pos[i] for i in self._slot_order()])

    def logical_positions(self) -> list[int]:
        """Position in time order (sink first, 0..num_frames-1) of every cached frame, in buffer order."""
        first, n = [], 0
        for c in self.chunks:
            first.append(n)
            n += c.num_frames
        out: list[int] = []
        for i in self._slot_order():
            out.extend(range(first[i], first[i] + self.chunks[i].num_frames))
        return out

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of the valid keys and values of one layer [B, num_tokens, heads, head_dim]."""
        n = self.num_tokens
        return self.keys[layer][:, :n], self.values[layer][:, :n]

    # -- writing ---------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Hold one layer's keys/values of the chunk being written until ``commit``."""
        self._pending[layer] = (k, v)

    def read_with(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """Ring layout: write the new chunk's ``k``/``v`` [B, n, heads, head_dim] in place after the
        stored tokens and return views of stored + new; None when the fast path does not apply
        (compact layout, another dtype or device, or no room), so the caller concatenates instead."""
        buf_k, buf_v = self.keys[layer], self.values[layer]
        start, n = self.num_tokens, k.shape[1]
        if (
            self.layout != "ring"
            or k.dtype != buf_k.dtype
            or k.device != buf_k.device
            or k.shape[0] != buf_k.shape[0]
            or start + n > buf_k.shape[1]
        ):
            return None
        buf_k[:, start : start + n].copy_(k)
        buf_v[:, start : start + n].copy_(v)
        return buf_k[:, : start + n], buf_v[:, : start + n]

    def commit_tail(self, start_frame: int, num_frames: int) -> None:
        """Ring layout: commit the chunk the last forward wrote in place after the stored tokens
        (what a replayed CUDA graph leaves behind, since it cannot run ``stage`` itself)."""
        if self.layout != "ring":
            raise ValueError("commit_tail needs a cache allocated with layout='ring'")
        start, tokens = self.num_tokens, num_frames * self.tokens_per_frame
        for layer in range(len(self.keys)):
            end = start + tokens
            self.stage(layer, self.keys[layer][:, start:end], self.values[layer][:, start:end])
        self.commit(start_frame, num_frames)

    def commit(self, start_frame: int, num_frames: int) -> None:
        """Append the staged chunk to every layer, evicting the oldest window chunk if full.

        A commit that fails leaves the cache as it was (the staged keys are dropped).
        """
        pending, self._pending = self._pending, {}
        if len(pending) != len(self.keys):
            raise RuntimeError(f"commit needs keys from all {len(self.keys)} layers, got {len(pending)}")
        if self.chunks and start_frame < self.next_frame:
            raise ValueError(
                f"chunk starts at frame {start_frame} but the cache already holds frames up to "
                f"{self.next_frame - 1}: chunks are written in order"
            )
        evict = len(self.chunks) >= self.sink_chunks + self.window_chunks
        kept = self.num_frames - (self.chunks[self.sink_chunks].num_frames if evict else 0)
        capacity = self.capacity_tokens // self.tokens_per_frame
        if kept + num_frames > capacity:
            raise ValueError(
                f"a chunk of {num_frames} frames does not fit the cache ({capacity} frames, {kept} kept); "
                "allocate it for the largest chunk size"
            )
        if self.layout == "ring":
            self._commit_ring(pending, start_frame, num_frames, evict)
            return
        if evict:
            self._evict_oldest_window_chunk()
        start, tokens = self.num_tokens, num_frames * self.tokens_per_frame
        for layer, (k, v) in pending.items():
            self.keys[layer][:, start : start + tokens] = k
            self.values[layer][:, start : start + tokens] = v
        self.chunks.append(_Chunk(start_frame, num_frames))
        self.offsets.append(start)

    def _commit_ring(
        self, pending: dict[int, tuple[Tensor, Tensor]], start_frame: int, num_frames: int, evict: bool
    ) -> None:
        """Write into the evicted chunk's slot when it has the same size, else compact first (rare)."""
        victim = self.sink_chunks
        if evict and self.chunks[victim].num_frames == num_frames:
            dest = self.offsets[victim]
            del self.chunks[victim], self.offsets[victim]
        else:
            if evict:  # the staged views may overlap where the packed chunks go: copy them out first
                pending = {layer: (k.clone(), v.clone()) for layer, (k, v) in pending.items()}
                self._compact_without(victim)
            dest = self.num_tokens
        tokens = num_frames * self.tokens_per_frame
        for layer, (k, v) in pending.items():
            for buf, src in ((self.keys[layer], k), (self.values[layer], v)):
                dst = buf[:, dest : dest + tokens]
                if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
                    dst.copy_(src)  # written in place by ``read_with`` when the pointers agree
        self.chunks.append(_Chunk(start_frame, num_frames))
        self.offsets.append(dest)

    def _compact_without(self, victim: int) -> None:
        """Drop chunk ``victim`` and pack the others in time order from token 0 (moves memory)."""
        del self.chunks[victim], self.offsets[victim]
        tpf = self.tokens_per_frame
        spans = [(off, c.num_frames * tpf) for off, c in zip(self.offsets, self.chunks, strict=True)]
        for buf in (*self.keys, *self.values):
            packed = torch.cat([buf[:, off : off + width] for off, width in spans], dim=1)
            buf[:, : packed.shape[1]] = packed
        self.offsets = self._packed_offsets(self.chunks)

    def _packed_offsets(self, chunks: list[_Chunk]) -> list[int]:
        out, n = [], 0
        for c in chunks:
            out.append(n)
            n += c.num_frames * self.tokens_per_frame
        return out

    def _evict_oldest_window_chunk(self) -> None:
        victim = self.sink_chunks
        if victim >= len(self.chunks):
            return
        lo = sum(c.num_frames for c in self.chunks[:victim]) * self.tokens_per_frame
        width = self.chunks[victim].num_frames * self.tokens_per_frame
        end = self.num_tokens
        for buf in (*self.keys, *self.values):
            buf[:, lo : end - width] = buf[:, lo + width : end].clone()
        del self.chunks[victim]
        self.offsets = self._packed_offsets(self.chunks)

    def reset(self) -> None:
        """Forget every cached chunk (buffers are kept)."""
        self.chunks.clear()
        self.offsets.clear()
        self._pending.clear()

    def clone(self) -> KVCache:
        """An independent copy (for branching a stream)."""
        return KVCache(
            [k.clone() for k in self.keys],
            [v.clone() for v in self.values],
            self.tokens_per_frame,
            self.sink_chunks,
            self.window_chunks,
            self.rope_mode,
            [_Chunk(c.start_frame, c.num_frames) for c in self.chunks],
            layout=self.layout,
            offsets=list(self.offsets),
            spare_tokens=self.spare_tokens,
        )
