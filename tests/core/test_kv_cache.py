"""The rolling KV cache: constant memory, sink kept, oldest window chunk evicted, clear errors."""

from __future__ import annotations

import pytest
import torch

from causvid_core.config import PRESETS, CausalConfig
from causvid_core.kv_cache import KVCache

TINY = PRESETS["tiny"].dit


def _write_chunk(cache: KVCache, start: int, frames: int, value: float) -> None:
    tokens = frames * cache.tokens_per_frame
    for layer in range(len(cache.keys)):
        k = torch.full((1, tokens, TINY.num_heads, TINY.head_dim), value)
        cache.stage(layer, k, -k)
    cache.commit(start, frames)


def test_rolling_window_keeps_sink_and_latest_chunks_in_constant_memory() -> None:
    causal = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)
    cache = KVCache.allocate(TINY, causal, 1, 4, 4)
    nbytes = cache.nbytes
    for i in range(10):
        _write_chunk(cache, 3 * i, 3, float(i))
    assert cache.nbytes == nbytes
    assert [c.start_frame for c in cache.chunks] == [0, 24, 27]
    assert cache.frame_positions().tolist() == [0, 1, 2, 24, 25, 26, 27, 28, 29]
    k, v = cache.read(0)
    per_chunk = 3 * cache.tokens_per_frame
    assert k[:, :per_chunk].unique().tolist() == [0.0]  # the sink survived
    assert k[:, per_chunk : 2 * per_chunk].unique().tolist() == [8.0]
    assert k[:, 2 * per_chunk :].unique().tolist() == [9.0]
    assert torch.equal(v, -k)


def test_estimate_matches_allocation_and_clone_is_independent() -> None:
    causal = CausalConfig(chunk_frames=3, first_chunk_frames=1, sink_chunks=1, window_chunks=3)
    cache = KVCache.allocate(TINY, causal, 2, 4, 6, dtype=torch.float32)
    assert cache.nbytes == KVCache.estimate_bytes(TINY, causal, 2, 4, 6, dtype=torch.float32)
    snapshot = cache.clone()
    for layer in range(len(cache.keys)):
        cache.stage(
            layer,
            torch.ones(2, 6, TINY.num_heads, TINY.head_dim),
            torch.ones(2, 6, TINY.num_heads, TINY.head_dim),
        )
    cache.commit(0, 1)
    assert snapshot.num_frames == 0 and cache.num_frames == 1
    # a branch taken after a chunk keeps that chunk's keys when the stream writes on (its own memory)
    branch = cache.clone()
    _write_chunk(cache, 1, 3, 5.0)
    k, v = branch.read(0)
    assert branch.num_frames == 1 and k.unique().tolist() == [1.0] and v.unique().tolist() == [1.0]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(branch.keys, cache.keys, strict=True))
    _write_chunk(branch, 1, 3, 7.0)  # and writing to the branch leaves the stream as it was
    assert cache.read(0)[0][:, -3 * cache.tokens_per_frame :].unique().tolist() == [5.0]


def test_real_size_estimate_is_reported_in_bytes() -> None:
    """1.3B at 480x832 in bf16, sink 1 + window 5 chunks of 3 frames stored (the new chunk is not):
    30 layers * (K and V) * 18 * 1560 tokens * 1536 channels * 2 bytes."""
    dit = PRESETS["wan2.1-t2v-1.3b"].dit
    est = KVCache.estimate_bytes(dit, CausalConfig(), 1, 60, 104, dtype=torch.bfloat16)
    assert est == 30 * 2 * 18 * 1560 * 1536 * 2


def test_errors_name_the_problem() -> None:
    causal = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)
    cache = KVCache.allocate(TINY, causal, 1, 4, 4)
    _write_chunk(cache, 0, 3, 1.0)
    with pytest.raises(ValueError, match="written in order"):
        _write_chunk(cache, 0, 3, 1.0)
    _write_chunk(cache, 3, 3, 2.0)
    _write_chunk(cache, 6, 3, 3.0)
    with pytest.raises(ValueError, match="does not fit"):
        _write_chunk(cache, 9, 4, 4.0)
    assert [c.start_frame for c in cache.chunks] == [0, 3, 6]  # the failed write changed nothing
    cache.stage(0, torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(RuntimeError, match="all 2 layers"):
        cache.commit(9, 3)


def test_ring_layout_keeps_the_same_chunks_in_fixed_slots() -> None:
    """Same chunks as the compact layout; the newest takes the evicted chunk's slot, the sink never moves."""
    causal = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)
    cache = KVCache.allocate(TINY, causal, 1, 4, 4, layout="ring")
    per_chunk = 3 * cache.tokens_per_frame
    assert cache.nbytes == KVCache.estimate_bytes(TINY, causal, 1, 4, 4, torch.float32, layout="ring")
    assert cache.capacity_tokens == 3 * per_chunk  # plus one chunk of room for the chunk being generated
    for i in range(10):
        _write_chunk(cache, 3 * i, 3, float(i))
    assert [c.start_frame for c in cache.chunks] == [0, 24, 27]  # time order, as the compact layout
    k, v = cache.read(0)
    slots = [k[:, j * per_chunk : (j + 1) * per_chunk].unique().tolist() for j in range(3)]
    assert slots == [[0.0], [9.0], [8.0]]  # chunk 9 overwrote chunk 7's slot (slot 1)
    assert cache.frame_positions().tolist() == [0, 1, 2, 27, 28, 29, 24, 25, 26]
    assert torch.equal(v, -k)
    copy = cache.clone()
    assert copy.offsets == cache.offsets and copy.layout == "ring"
    cache.reset()
    assert cache.num_tokens == 0 and cache.offsets == []
