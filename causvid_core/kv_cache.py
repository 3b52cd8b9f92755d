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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import CausalConfig, DiTConfig


@dataclass
class _Chunk:
    start_frame: int  # absolute latent-frame index of its first frame
    num_frames: int


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
    ) -> KVCache:
        """Preallocate a cache sized for ``sink + window`` chunks of the largest chunk size."""
        tpf = dit.tokens_per_frame(latent_height, latent_width)
        cap = cls.capacity_frames(causal) * tpf
        shape = (batch, cap, dit.num_heads, dit.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dit.num_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dit.num_layers)]
        return cls(keys, values, tpf, causal.sink_chunks, causal.window_chunks, causal.rope_mode)

    @staticmethod
    def capacity_frames(causal: CausalConfig) -> int:
        largest = max(causal.chunk_frames, causal.first_chunk_frames or 0)
        return (causal.sink_chunks + causal.window_chunks) * largest

    @staticmethod
    def estimate_bytes(
        dit: DiTConfig,
        causal: CausalConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> int:
        """Bytes the cache will hold, to report before a render starts."""
        tokens = KVCache.capacity_frames(causal) * dit.tokens_per_frame(latent_height, latent_width)
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * dit.num_layers * batch * tokens * dit.num_heads * dit.head_dim * elem

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

    def frame_positions(self) -> Tensor:
        """Absolute latent-frame index of every cached frame, in cache order."""
        pos = [torch.arange(c.start_frame, c.start_frame + c.num_frames) for c in self.chunks]
        return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of the valid keys and values of one layer [B, num_tokens, heads, head_dim]."""
        n = self.num_tokens
        return self.keys[layer][:, :n], self.values[layer][:, :n]

    # -- writing ---------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Hold one layer's keys/values of the chunk being written until ``commit``."""
        self._pending[layer] = (k, v)

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
        capacity = self.keys[0].shape[1] // self.tokens_per_frame
        if kept + num_frames > capacity:
            raise ValueError(
                f"a chunk of {num_frames} frames does not fit the cache ({capacity} frames, {kept} kept); "
                "allocate it for the largest chunk size"
            )
        if evict:
            self._evict_oldest_window_chunk()
        start, tokens = self.num_tokens, num_frames * self.tokens_per_frame
        for layer, (k, v) in pending.items():
            self.keys[layer][:, start : start + tokens] = k
            self.values[layer][:, start : start + tokens] = v
        self.chunks.append(_Chunk(start_frame, num_frames))

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

    def reset(self) -> None:
        """Forget every cached chunk (buffers are kept)."""
        self.chunks.clear()
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
        )
