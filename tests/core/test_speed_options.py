"""Speed options (issue 8) compute what the plain path computes: fp32 options within 1e-5, bf16 within
its rounding, and GPU-only options fail on a CPU with the reason."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.stream import dit_flops_per_chunk
from causvid_core.attention import RopeTable, rope_angles
from causvid_core.config import PRESETS, CausalConfig
from causvid_core.kv_cache import KVCache
from causvid_core.model import CausalWanModel, CudaGraphStep, fp8_quantize
from causvid_core.stream import StreamingGenerator

TINY = PRESETS["tiny"].dit
CAUSAL = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)


def _model(seed: int = 5) -> CausalWanModel:
    torch.manual_seed(seed)
    m = CausalWanModel(TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    return _model()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randn(1, 6, TINY.text_dim, generator=torch.Generator().manual_seed(11))


def _video(
    model, prompt, chunks: int, causal: CausalConfig = CAUSAL, layout: str = "compact"
) -> torch.Tensor:
    gen = StreamingGenerator(model, prompt, latent_size=(4, 4), causal=causal)
    if layout != "compact":
        p = next(model.parameters())
        gen.cache = KVCache.allocate(model.config, causal, 1, 4, 4, p.device, p.dtype, layout=layout)
    return torch.cat(list(gen.stream(chunks)), dim=2)


def test_rope_rotation_matches_the_pair_formula() -> None:
    """(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) on adjacent channel pairs, written out here."""
    angles = rope_angles(torch.arange(3, 6), 2, 3, 12)
    x = torch.randn(2, 18, 4, 12)
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    expected = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    assert (RopeTable(angles).apply(x) - expected).abs().max().item() <= 1e-6


def test_cached_rope_tables_change_nothing(model, prompt) -> None:
    plain = _model()
    plain.rope_cache = False
    assert torch.equal(_video(model, prompt, 5), _video(plain, prompt, 5))


@pytest.mark.parametrize("rope_mode", ["absolute", "window"])
def test_ring_cache_gives_the_compact_cache_stream(model, prompt, rope_mode) -> None:
    """12 chunks, sink 1 + window 2: eviction from chunk 3 on. Key order differs after it, so the sums
    of the softmax run in another order: a few fp32 ulps of the output (|x| up to ~4 here, ulp 4.8e-7),
    hence 1e-6 relative to the output's largest magnitude."""
    causal = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2, rope_mode=rope_mode)
    compact = _video(model, prompt, 12, causal)
    ring = _video(model, prompt, 12, causal, layout="ring")
    scale = max(1.0, compact.abs().max().item())
    assert (compact - ring).abs().max().item() <= 1e-6 * scale
    assert torch.equal(compact[:, :, :12], ring[:, :, :12])  # same key order until the first eviction


def test_ring_eviction_moves_an_index_not_memory(model, prompt) -> None:
    """Past the window a commit writes only the evicted chunk's slot; buffers are never reallocated."""
    gen = StreamingGenerator(model, prompt, latent_size=(4, 4), causal=CAUSAL)
    gen.cache = cache = KVCache.allocate(TINY, CAUSAL, 1, 4, 4, layout="ring")
    pointers = [t.data_ptr() for t in (*cache.keys, *cache.values)]
    per_chunk = 3 * cache.tokens_per_frame
    for i in range(12):
        before = [t.clone() for t in cache.keys]
        slots_before = dict(zip([c.start_frame for c in cache.chunks], cache.offsets, strict=True))
        gen.next_chunk()
        assert [t.data_ptr() for t in (*cache.keys, *cache.values)] == pointers
        assert len(cache.chunks) == min(i + 1, 3)
        if i >= 3:  # full: the oldest window chunk's slot is reused, the others are untouched
            evicted = sorted(slots_before)[1]
            assert cache.offsets[-1] == slots_before[evicted]
            for start, off in slots_before.items():
                if start != evicted:
                    assert torch.equal(
                        cache.keys[0][:, off : off + per_chunk], before[0][:, off : off + per_chunk]
                    )
    assert cache.frame_positions().tolist() == [0, 1, 2, 33, 34, 35, 30, 31, 32]
    assert cache.logical_positions() == [0, 1, 2, 6, 7, 8, 3, 4, 5]


def test_ring_keeps_working_when_a_chunk_size_changes(model, prompt) -> None:
    """A chunk of another size than the evicted one falls back to packing (memory moves, result holds)."""
    outs = []
    for layout in ("compact", "ring"):
        gen = StreamingGenerator(model, prompt, latent_size=(4, 4), causal=CAUSAL)
        gen.cache = KVCache.allocate(TINY, CAUSAL, 1, 4, 4, layout=layout)
        outs.append(torch.cat([gen.next_chunk(n) for n in (3, 3, 3, 3, 2, 3, 1, 3)], dim=2))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6 * max(1.0, outs[0].abs().max().item())


def test_fused_qkv_equals_separate_projections(prompt) -> None:
    plain, fused = _model(), _model()
    fused.set_fused_qkv(True)
    a, b = _video(plain, prompt, 5), _video(fused, prompt, 5)
    assert (a - b).abs().max().item() <= 1e-5
    with torch.no_grad():  # editing weights after fusing (a LoRA merge) rebuilds the fused matrix
        for m in (plain, fused):
            m.blocks[0].self_attn.k.weight.mul_(1.5)
    a, b = _video(plain, prompt, 3), _video(fused, prompt, 3)
    assert (a - b).abs().max().item() <= 1e-5


def test_bfloat16_stays_close_to_float32(prompt) -> None:
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op); a few dozen rounded ops in
    2 blocks, 3 steps and 3 chunks add up to about 1% of the output's spread. 5% still separates a
    different prompt (whose output differs by ~100%), so the bound means something."""
    fp32 = _model()
    bf16 = _model().to(torch.bfloat16)
    a = _video(fp32, prompt, 3)
    b = _video(bf16, prompt.to(torch.bfloat16), 3).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel <= 0.05, rel
    other = _video(fp32, torch.randn_like(prompt), 3)
    assert ((a - other).norm() / a.norm()).item() > 0.2


def test_fp8_quantisation_error_is_within_e4m3_rounding() -> None:
    w = torch.randn(32, 48)
    w8, scale = fp8_quantize(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    back = w8.float() * scale
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, absolute error tiny below
    assert ((back - w).abs() <= w.abs() * 2**-4 + scale * 2**-6).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_gpu_only_options_name_the_problem_on_cpu(model) -> None:
    with pytest.raises(RuntimeError, match="fp8 weights needs a CUDA GPU"):
        _model().quantize_fp8()
    cache = KVCache.allocate(TINY, CAUSAL, 1, 4, 4, layout="ring")
    with pytest.raises(RuntimeError, match="CUDA graphs needs a CUDA GPU"):
        CudaGraphStep(model, cache)


def test_bad_layout_is_named() -> None:
    with pytest.raises(ValueError, match="layout must be one of compact, ring"):
        KVCache.allocate(TINY, CAUSAL, 1, 4, 4, layout="rolling")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compiled_blocks_equal_eager(prompt) -> None:
    """The tiny preset compiles in about 30 s on 2 loaded cores; past 60 s it skips with the time."""
    eager, compiled = _model(), _model()
    compiled.compile_blocks()
    start = time.perf_counter()
    b = _video(compiled, prompt, 4)
    elapsed = time.perf_counter() - start
    if elapsed > 60:
        pytest.skip(f"torch.compile took {elapsed:.0f} s on this machine (budget 60 s)")
    assert (_video(eager, prompt, 4) - b).abs().max().item() <= 1e-5


def test_benchmark_flop_count_matches_torch_counter(model) -> None:
    """The FLOPs the benchmark divides by (its share of peak) are those torch counts in one cached step."""
    m = _model()
    m.set_attention_backend("math")
    cache = KVCache.allocate(TINY, CAUSAL, 1, 4, 6)
    cross = m.encode_context(torch.randn(1, 5, TINY.text_dim))
    with torch.no_grad():
        for _ in range(3):  # fill sink + window
            m(torch.randn(1, 16, 3, 4, 6), torch.zeros(1, 3), cross, cache=cache, write_cache=True)
        with FlopCounterMode(display=False) as counter:
            m(torch.randn(1, 16, 3, 4, 6), torch.rand(1, 3) * 1000, cross, cache=cache)
    assert dit_flops_per_chunk(TINY, 3, 6, 9, forwards=1) == counter.get_total_flops()


def test_ring_forward_then_commit_tail_equals_a_write_pass(model) -> None:
    """What a replayed CUDA graph does (a plain forward, then ``commit_tail``) caches what a write pass does."""
    caches = [KVCache.allocate(TINY, CAUSAL, 1, 4, 4, layout="ring") for _ in range(2)]
    cross = model.encode_context(torch.randn(1, 5, TINY.text_dim))
    with torch.no_grad():
        for i in range(6):
            x, t = torch.randn(1, 16, 3, 4, 4), torch.zeros(1, 3)
            model(x, t, cross, cache=caches[0], write_cache=True)
            model(x, t, cross, cache=caches[1])
            caches[1].commit_tail(3 * i, 3)
    assert caches[0].offsets == caches[1].offsets
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
        assert torch.equal(a[:, : caches[0].num_tokens], b[:, : caches[1].num_tokens])
    with pytest.raises(ValueError, match="layout='ring'"):
        KVCache.allocate(TINY, CAUSAL, 1, 4, 4).commit_tail(0, 3)


# -- VAE on the CPU ------------------------------------------------------------------------------
def _vae_pair() -> tuple:
    from causvid_core.vae import VAE_PRESETS, WanVAE

    torch.manual_seed(3)
    native, frames = WanVAE(VAE_PRESETS["tiny"]).eval(), WanVAE(VAE_PRESETS["tiny"]).eval()
    frames.load_state_dict(native.state_dict())
    native.set_conv_impl("native")
    frames.set_conv_impl("frames")
    return native, frames


def test_vae_frame_convolutions_equal_conv3d_streamed() -> None:
    """Encode (strided time convs) and a chunked decode through 2D convolutions over frames give the
    Conv3d result within fp32 summation order: 1e-5 relative to the output's largest magnitude."""
    native, frames = _vae_pair()
    video = torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        enc = [v.encode(video) for v in (native, frames)]
        dec = []
        for vae in (native, frames):
            d = vae.stream_decoder()
            dec.append(torch.cat([d.decode(z[:, :, :1]), d.decode(z[:, :, 1:4]), d.decode(z[:, :, 4:])], 2))
    for a, b in (enc, dec):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def test_vae_frame_convolutions_train_like_conv3d() -> None:
    """The VAE stage trains through the same path on a CPU: gradients agree with Conv3d's."""
    native, frames = _vae_pair()
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    grads = []
    for vae in (native, frames):
        vae.decode_raw(vae.encode_raw(video)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).norm() / grads[0].norm() <= 1e-5


def test_vae_conv_impl_is_checked() -> None:
    native, _ = _vae_pair()
    with pytest.raises(ValueError, match="conv impl must be one of auto, native, frames"):
        native.set_conv_impl("fast")


def test_speed_benchmark_reports_every_figure_and_the_plain_output(tmp_path) -> None:
    """``python -m bench.stream`` on the CPU preset: the figures issue 8 asks for are in the JSON, and the
    default CPU options reproduce the plain path's latents and frames within fp32 tolerance."""
    import json

    from bench.stream import main

    out = tmp_path / "cpu.json"
    main(["--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "32", "--window", "2",
          "--sustained-chunks", "3", "--compare-chunks", "5", "--breakdown-chunks", "2",
          "--json", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert set(res["options"]) == {"ring", "rope_cache", "fused_qkv", "vae_frames"}
    for key in ("first_frame_s", "sustained_fps", "dit_steps_s", "cache_write_s", "vae_decode_s",
                "peak_memory_mb", "dit_tflop_per_chunk", "dit_share_of_peak"):  # fmt: skip
        assert res[key] > 0, key
    diff = res["output_diff_vs_plain"]
    assert diff["latent_rel_l2"] <= 1e-5 and diff["frames_rel_l2"] <= 1e-5, diff


def test_speed_options_by_name_reach_the_generator(prompt) -> None:
    """``set_speed`` (the CLI's --speed) switches the generator's cache to the ring and fuses QKV; the
    stream stays the reference stream; a wrong name lists the right ones."""
    plain, fast = _model(), _model()
    assert fast.set_speed("ring, fused_qkv") == ["ring", "fused_qkv"]
    gen = StreamingGenerator(fast, prompt, latent_size=(4, 4), causal=CAUSAL)
    assert gen.cache.layout == "ring" and fast.blocks[0].self_attn.fused_qkv
    a, b = _video(plain, prompt, 6), torch.cat(list(gen.stream(6)), dim=2)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    fast.set_speed("reference")
    assert fast.cache_layout == "compact" and not fast.blocks[0].self_attn.fused_qkv
    with pytest.raises(ValueError, match="choose from ring, fused_qkv, compile, fp8"):
        fast.set_speed("ring,turbo")


def test_fused_qkv_runs_under_inference_mode(prompt) -> None:
    """ComfyUI loads and runs models under torch.inference_mode, whose tensors have no version counter."""
    plain = _model()
    with torch.inference_mode():
        fused = _model()  # weights made as inference tensors, as in the host
        fused.set_fused_qkv(True)
        a, b = _video(plain, prompt, 4), _video(fused, prompt, 4)
    assert (a - b).abs().max().item() <= 1e-5
