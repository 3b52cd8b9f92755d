"""Streaming with the KV cache computes exactly what the block-masked full-sequence forward does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from causvid_core.config import PRESETS, CausalConfig, chunk_layout
from causvid_core.kv_cache import KVCache
from causvid_core.model import CausalWanModel

TINY = PRESETS["tiny"].dit


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial norms and modulation, so every parameter matters in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    torch.manual_seed(1)
    m = CausalWanModel(TINY).eval()
    _randomize(m)
    return m


def _stream(model, x, t, ctx, sizes, causal) -> torch.Tensor:
    cache = KVCache.allocate(TINY, causal, x.shape[0], x.shape[3], x.shape[4])
    outs, f = [], 0
    for n in sizes:
        outs.append(model(x[:, :, f : f + n], t[:, f : f + n], ctx, cache=cache, write_cache=True))
        f += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3], [1, 3, 3, 2], [1, 1, 1, 1, 1]])
def test_cached_chunks_equal_block_masked_forward(model, sizes) -> None:
    frames = sum(sizes)
    x = torch.randn(2, TINY.in_dim, frames, 4, 6)
    t = torch.rand(2, frames) * 1000
    ctx = torch.randn(2, 7, TINY.text_dim)
    causal = CausalConfig(chunk_frames=max(sizes), sink_chunks=1, window_chunks=len(sizes))
    with torch.no_grad():
        full = model(x, t, ctx, chunk_sizes=sizes)
        streamed = _stream(model, x, t, ctx, sizes, causal)
    assert (full - streamed).abs().max().item() <= 1e-5


def test_rolling_window_equals_windowed_mask(model) -> None:
    """Past the window, streaming equals the full forward whose mask hides the evicted chunks."""
    sizes = chunk_layout(24, 3)  # 8 chunks
    x = torch.randn(1, TINY.in_dim, 24, 4, 4)
    t = torch.rand(1, 24) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    causal = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)
    with torch.no_grad():
        windowed = model(x, t, ctx, chunk_sizes=sizes, sink_chunks=1, window_chunks=2)
        streamed = _stream(model, x, t, ctx, sizes, causal)
        unwindowed = model(x, t, ctx, chunk_sizes=sizes)
    assert (windowed - streamed).abs().max().item() <= 1e-5
    # the window really changed something after it filled (the test is not vacuous) ...
    late = slice(12, 24)
    assert (unwindowed[:, :, late] - streamed[:, :, late]).abs().max().item() > 1e-3
    # ... and nothing before it filled
    early = slice(0, 9)
    assert (unwindowed[:, :, early] - streamed[:, :, early]).abs().max().item() <= 1e-5


def test_without_a_sink_window_rope_streams_what_the_windowed_mask_computes(model) -> None:
    """The Shapes preset's layout (no sink, cached keys re-rotated inside the window): past the window the stream
    still computes the full forward under the windowed mask, RoPE seeing only distances, so a training clip
    longer than the window teaches exactly what the stream does."""
    sizes = chunk_layout(15, 3)  # 5 chunks: the 4th is the first whose window has rolled
    x = torch.randn(1, TINY.in_dim, 15, 4, 4)
    t = torch.rand(1, 15) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    causal = CausalConfig(chunk_frames=3, sink_chunks=0, window_chunks=2, rope_mode="window")
    with torch.no_grad():
        windowed = model(x, t, ctx, chunk_sizes=sizes, sink_chunks=0, window_chunks=2)
        streamed = _stream(model, x, t, ctx, sizes, causal)
        unwindowed = model(x, t, ctx, chunk_sizes=sizes)
    assert (windowed - streamed).abs().max().item() <= 1e-4
    assert (unwindowed[:, :, 9:] - streamed[:, :, 9:]).abs().max().item() > 1e-3


def test_window_rope_mode_matches_absolute_until_eviction(model) -> None:
    sizes = chunk_layout(15, 3)
    x = torch.randn(1, TINY.in_dim, 15, 4, 4)
    t = torch.rand(1, 15) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    absolute = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)
    window = dataclasses.replace(absolute, rope_mode="window")
    with torch.no_grad():
        a = _stream(model, x, t, ctx, sizes, absolute)
        w = _stream(model, x, t, ctx, sizes, window)
    assert (a[:, :, :9] - w[:, :, :9]).abs().max().item() <= 1e-5  # sink + window + current
    assert (a[:, :, 9:] - w[:, :, 9:]).abs().max().item() > 1e-4  # re-indexed after eviction


def test_bidirectional_differs_from_causal(model) -> None:
    """The teacher mode really attends to the future (so the mask tests above mean something)."""
    x = torch.randn(1, TINY.in_dim, 6, 4, 4)
    t = torch.full((1,), 500.0)
    ctx = torch.randn(1, 5, TINY.text_dim)
    with torch.no_grad():
        bi = model(x, t, ctx)
        causal = model(x, t, ctx, chunk_sizes=[3, 3])
    assert (bi[:, :, :3] - causal[:, :, :3]).abs().max().item() > 1e-4
