"""Streaming benchmark, two suites (``--suite``):

speed (default, issue 8): first-frame latency, sustained FPS over 20 chunks with the VAE decode,
a per-stage breakdown (DiT steps, cache write, VAE decode), peak memory, FLOPs per chunk and their
share of a peak, and the output difference of the optimised path against the plain path:

    python -m bench.stream --preset wan2.1-t2v-1.3b --height 480 --width 832 --device cuda --json gpu.json
    python -m bench.stream --preset tiny --device cpu --json cpu.json

cache (issue 2): constant cost per chunk with the rolling KV cache, against no cache and against
bidirectional 50-step CFG generation of the same 21-latent-frame video:

    python -m bench.stream --suite cache --preset tiny --json out.json
    python -m bench.stream --suite cache --preset wan2.1-t2v-1.3b --layers 4 --height 64 --width 64 --json out.json

Random weights: no download needed. Timings are wall-clock medians; on a GPU each measurement
is synchronised. Figures of the cache suite (see bench/RESULTS.md):
- first_chunk_speedup_vs_bidirectional: 50-step CFG bidirectional time / time to the first chunk
- late_to_early_chunk_cost_ratio: median cost of chunks 38-42 over chunks 4-6 (target <= 1.10);
  chunk 5 runs before the window is full (it attends to 5 cached chunks, chunk 40 to 6), so
  steady_late_to_early_chunk_cost_ratio compares with chunks 8-12, after the window filled
- cache_memory_growth_ratio: KV-cache bytes at chunk 40 over chunk 10 (target 1.0)
- the same two ratios without a cache (every chunk recomputes its whole history), for contrast
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from causvid_core.config import CausalConfig, chunk_layout, get_preset
from causvid_core.kv_cache import KVCache
from causvid_core.model import SPEED_OPTIONS, CausalWanModel, CudaGraphStep
from causvid_core.sampling import (
    FlowSchedule,
    add_noise,
    chunk_timesteps,
    denoising_timesteps,
    sample_chunk,
    sample_teacher,
    x0_from_v,
)
from causvid_core.stream import StreamingGenerator, chunk_seed
from causvid_core.vae import VAE_PRESETS, WanVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_model(args: argparse.Namespace) -> tuple[CausalWanModel, Any]:
    preset = get_preset(args.preset)
    dit = preset.dit if args.layers is None else dataclasses.replace(preset.dit, num_layers=args.layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CausalWanModel(dit)
    return model.to(DTYPES[args.dtype]).eval(), preset


def stream_costs(
    model, prompt, latent_hw, causal, sampling, num_chunks, device
) -> tuple[list[float], list[int]]:
    """Seconds and KV-cache bytes of every chunk of a cached stream."""
    gen = StreamingGenerator(model, prompt, latent_size=latent_hw, causal=causal, sampling=sampling)
    costs, mem = [], []
    for _ in range(num_chunks):
        _, dt = _timed(gen.next_chunk, device)
        costs.append(dt)
        mem.append(gen.cache.nbytes)
    return costs, mem


def uncached_chunk_cost(model, prompt, latent_hw, chunk, index, steps, device) -> tuple[float, int]:
    """Cost of chunk ``index`` when its whole history is recomputed (block-causal, no cache)."""
    h, w = latent_hw
    hist = index * chunk
    cin = model.config.in_dim
    history = torch.randn(1, cin, hist, h, w, device=device)
    x = torch.randn(1, cin, chunk, h, w, device=device)
    sizes = chunk_layout(hist + chunk, chunk)
    sched = FlowSchedule(8.0)

    def run() -> torch.Tensor:
        nonlocal x
        for i, t in enumerate(steps):
            tt = torch.cat([torch.zeros(1, hist), torch.full((1, chunk), t)], dim=1).to(device)
            v = model(torch.cat([history, x], dim=2), tt, prompt, chunk_sizes=sizes)[:, :, hist:]
            x0 = x0_from_v(x, v, sched.sigma(t).to(device))
            if i + 1 < len(steps):
                x = add_noise(x0, torch.randn_like(x0), sched.sigma(steps[i + 1]).float())
        return x0

    with torch.no_grad():
        _, dt = _timed(run, device)
    # what no cache must hold: activations of the whole sequence instead of a fixed window
    return dt, (hist + chunk) * h * w


def bidirectional_time(
    model, prompt, latent_hw, frames, num_steps, measure_steps, device
) -> tuple[float, int]:
    """Seconds of 50-step CFG bidirectional generation of ``frames`` latent frames.

    When ``measure_steps < num_steps`` the time of the measured steps is scaled up (every step
    costs the same: two forwards over the whole video).
    """
    h, w = latent_hw
    noise = torch.randn(1, model.config.in_dim, frames, h, w, device=device)
    uncond = torch.zeros_like(prompt)
    steps = min(measure_steps, num_steps)
    with torch.no_grad():
        sample_teacher(model, noise, prompt, uncond, num_steps=1)  # warm-up
        _, dt = _timed(lambda: sample_teacher(model, noise, prompt, uncond, num_steps=steps), device)
    return dt * num_steps / steps, steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model, preset = build_model(args)
    lh, lw = args.height // 8, args.width // 8
    causal = CausalConfig(chunk_frames=3, sink_chunks=args.sink, window_chunks=args.window)
    prompt = torch.randn(1, model.config.text_len, model.config.text_dim, device=device)
    steps = [float(t) for t in preset.sampling.denoising_steps]
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection
        StreamingGenerator(model, prompt, latent_size=(lh, lw), causal=causal).next_chunk()

    costs, mem = stream_costs(model, prompt, (lh, lw), causal, preset.sampling, args.chunks, device)
    early = statistics.median(costs[4:7])
    steady_early = statistics.median(costs[8:13])
    late = statistics.median(costs[38:43])
    bidir_s, measured = bidirectional_time(model, prompt, (lh, lw), 21, 50, args.bidir_steps, device)
    nc5, tok5 = uncached_chunk_cost(model, prompt, (lh, lw), 3, 5, steps, device)
    nc40, tok40 = uncached_chunk_cost(model, prompt, (lh, lw), 3, 40, steps, device)
    nc10_tokens = (10 * 3 + 3) * lh * lw
    result = {
        "preset": args.preset,
        "layers": model.config.num_layers,
        "dim": model.config.dim,
        "resolution": f"{args.width}x{args.height}",
        "latent": [lh, lw],
        "dtype": args.dtype,
        "device": device_name(device),
        "torch": torch.__version__,
        "sink_chunks": args.sink,
        "window_chunks": args.window,
        "denoising_steps": steps,
        "first_chunk_s": costs[0],
        "bidirectional_50step_cfg_s": bidir_s,
        "bidirectional_measured_steps": measured,
        "first_chunk_speedup_vs_bidirectional": bidir_s / costs[0],
        "chunk_5_s": costs[5],
        "chunk_40_s": costs[40],
        "late_to_early_chunk_cost_ratio": late / early,
        "steady_late_to_early_chunk_cost_ratio": late / steady_early,
        "cache_bytes_chunk_10": mem[10],
        "cache_bytes_chunk_40": mem[40],
        "cache_memory_growth_ratio": mem[40] / mem[10],
        "no_cache_late_to_early_chunk_cost_ratio": nc40 / nc5,
        "no_cache_context_growth_ratio": tok40 / nc10_tokens,
        "latent_frames_per_s": 3 / statistics.median(costs[3:]),
        "chunk_costs_s": costs,
    }
    return result


# -- speed suite (issue 8) ---------------------------------------------------------------------
OPTIONS = (
    "ring", "rope_cache", "fused_qkv", "vae_frames", "bf16", "compile", "cuda_graphs", "vae_overlap", "fp8",
)  # fmt: skip
GPU_OPTIONS = {"cuda_graphs", "vae_overlap", "fp8"}
STAGES = ("dit_steps_s", "cache_write_s", "vae_decode_s")
PEAK_KIND = {"cuda": "torch max_memory_allocated", "cpu": "process peak RSS (ru_maxrss)"}
DEFAULT_OPTIONS = {
    "cpu": "ring,rope_cache,fused_qkv,vae_frames",
    "cuda": "ring,rope_cache,fused_qkv,bf16,cuda_graphs,vae_overlap",
}


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--options", default=None, help=f"speed suite: comma list of {', '.join(OPTIONS)}")
    p.add_argument("--vae", default=None, help="speed suite: VAE preset (wan2.1, small, tiny, none)")
    p.add_argument("--sustained-chunks", type=int, default=20)
    p.add_argument("--compare-chunks", type=int, default=8, help="chunks compared with the plain path")
    p.add_argument("--breakdown-chunks", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=None, help="default: a measured matmul peak")


def dit_flops_per_chunk(dit, frames: int, tokens_per_frame: int, cached_frames: int, forwards: int) -> int:
    """2 x multiply-adds of the DiT on one chunk: projections, self/cross attention, FFN, patch, head, time."""
    d, tokens, per = dit.dim, frames * tokens_per_frame, 0
    per += 2 * tokens * d * d * 4  # self-attention q, k, v, o
    per += 4 * tokens * (cached_frames * tokens_per_frame + tokens) * d  # QK^T and PV, cached + new keys
    per += 2 * tokens * d * d * 2 + 4 * tokens * dit.text_len * d  # cross q, o and attention
    per += 2 * tokens * d * dit.ffn_dim * 2
    patch = dit.patch_size[0] * dit.patch_size[1] * dit.patch_size[2]
    io = 2 * tokens * patch * d * (dit.in_dim + dit.out_dim)
    time_mlp = 2 * frames * (dit.freq_dim * d + d * d + d * 6 * d)
    return forwards * (dit.num_layers * per + io + time_mlp)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this device in the run's dtype (the ceiling FLOPs are compared with)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    reps = 10 if device.type == "cuda" else 3
    _, dt = _timed(lambda: [a @ a for _ in range(reps)], device)
    return 2 * n**3 * reps / dt / 1e12


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Path:
    """One way of running the stream: a model with options applied, a cache layout, a VAE."""

    def __init__(self, args: argparse.Namespace, options: set[str], device: torch.device) -> None:
        self.device, self.options = device, options
        self.dtype = torch.bfloat16 if "bf16" in options else torch.float32
        self.model, _ = build_model(args)
        self.model.rope_cache = "rope_cache" in options
        self.model.to(self.dtype)
        # ring, fused_qkv, fp8 and compile as users switch them on; after the cast, which would turn
        # float8 weights back
        self.model.set_speed(sorted(options & set(SPEED_OPTIONS)))
        vae_name = args.vae or (args.preset if args.preset in ("tiny", "shapes") else "wan2.1")
        self.vae = None
        if vae_name != "none":
            torch.manual_seed(1)
            self.vae = WanVAE(VAE_PRESETS[vae_name]).to(device, self.dtype).eval()
            self.vae.set_conv_impl("frames" if "vae_frames" in options else "native")
        self.side = torch.cuda.Stream(device) if "vae_overlap" in options else None


class _Run:
    """One stream on a path: ``next(sync)`` makes a chunk, decodes it, and times the three stages."""

    def __init__(self, path: _Path, prompt: torch.Tensor, causal: CausalConfig, sampling, lhw) -> None:
        self.path, self.lhw = path, lhw
        model = path.model
        self.cross = model.encode_context(prompt.to(path.dtype))
        self.cache = KVCache.allocate(
            model.config, causal, 1, *lhw, path.device, path.dtype, layout=model.cache_layout
        )
        self.step = CudaGraphStep(model, self.cache) if "cuda_graphs" in path.options else model
        self.schedule = FlowSchedule.from_config(sampling)
        self.steps = denoising_timesteps(sampling, self.schedule)
        self.decoder = path.vae.stream_decoder() if path.vae is not None else None
        self.frame = self.index = 0

    def next(self, sync: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
        """(clean latents, decoded frames, [DiT steps, cache write, VAE decode] seconds when synced)."""
        p, dev = self.path, self.path.device
        gen = torch.Generator().manual_seed(chunk_seed(0, self.index))
        noise = torch.randn((1, p.model.config.in_dim, 3, *self.lhw), generator=gen).to(dev, p.dtype)
        marks = [time.perf_counter()]
        x0 = sample_chunk(self.step, noise, self.cross, self.cache, self.steps, self.schedule,
                          start_frame=self.frame, generator=gen, write_cache=False)  # fmt: skip
        marks.append(self._mark(sync))
        t0 = chunk_timesteps(0, 1, 3, dev)
        self.step(x0, t0, self.cross, cache=self.cache, start_frame=self.frame, write_cache=True)
        marks.append(self._mark(sync))
        frames = self._decode(x0)
        marks.append(self._mark(sync))
        self.frame, self.index = self.frame + 3, self.index + 1
        return x0, frames, [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def _mark(self, sync: bool) -> float:
        if sync:
            _sync(self.path.device)
        return time.perf_counter()

    def _decode(self, x0: torch.Tensor) -> torch.Tensor | None:
        side = self.path.side
        if self.decoder is None:
            return None
        if side is None:
            return self.decoder.decode(x0)
        side.wait_stream(torch.cuda.current_stream(self.path.device))
        with torch.cuda.stream(side):  # overlaps the DiT work of the next chunk
            frames = self.decoder.decode(x0)
        x0.record_stream(side)
        return frames

    def many(self, n: int, sync: bool) -> list:
        return [self.next(sync) for _ in range(n)]


def _output_difference(args, options, prompt, causal, sampling, lhw, fast: _Path) -> dict[str, float]:
    """Latents of the first chunks on the plain path (fp32, compact cache, no options) and the fast one."""
    plain = _Path(args, set(), fast.device)
    ref = _Run(plain, prompt, causal, sampling, lhw).many(args.compare_chunks, False)
    del plain
    opt = _Run(fast, prompt, causal, sampling, lhw).many(args.compare_chunks, False)
    out = {}
    for i, name in ((0, "latent"), (1, "frames")):
        if ref[0][i] is None:
            continue
        a = torch.cat([c[i].float() for c in ref], 2)
        b = torch.cat([c[i].float() for c in opt], 2)
        out[f"{name}_rel_l2"] = ((a - b).norm() / a.norm()).item()
        out[f"{name}_max_abs"] = (a - b).abs().max().item()
    return out


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    names = args.options if args.options is not None else DEFAULT_OPTIONS.get(device.type, "")
    options = {o for o in names.split(",") if o}
    if options - set(OPTIONS):
        raise SystemExit(
            f"unknown options {sorted(options - set(OPTIONS))}; choose from {', '.join(OPTIONS)}"
        )
    if options & GPU_OPTIONS and device.type != "cuda":
        raise SystemExit(f"options {sorted(options & GPU_OPTIONS)} need --device cuda")
    preset = get_preset(args.preset)
    lhw, sampling = (args.height // 8, args.width // 8), preset.sampling
    causal = CausalConfig(chunk_frames=3, sink_chunks=args.sink, window_chunks=args.window)
    torch.manual_seed(0)
    prompt = torch.randn(1, preset.dit.text_len, preset.dit.text_dim, device=device)
    fast = _Path(args, options, device)
    with torch.no_grad():
        diff = _output_difference(args, options, prompt, causal, sampling, lhw, fast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = _Run(fast, prompt, causal, sampling, lhw)  # a fresh stream: time to its first frames
        _sync(device)
        start = time.perf_counter()
        _, first_frames, _ = run.next(True)
        first_frame_s = time.perf_counter() - start
        fill = args.sink + args.window + 1  # then the window is full (and CUDA graphs are captured)
        steady = [c[2] for c in run.many(fill + args.breakdown_chunks, True)][-args.breakdown_chunks :]
        _sync(device)
        start = time.perf_counter()
        done = run.many(args.sustained_chunks, False)
        _sync(device)
        sustained_s = time.perf_counter() - start
    frames = sum(12 if c[1] is None else c[1].shape[2] for c in done)
    tpf = fast.model.config.tokens_per_frame(*lhw)
    forwards = len(sampling.denoising_steps) + 1
    flops = dit_flops_per_chunk(fast.model.config, 3, tpf, KVCache.capacity_frames(causal), forwards)
    peak = args.peak_tflops or measured_peak_tflops(device, fast.dtype)
    chunk_s = sustained_s / args.sustained_chunks
    stage = {k: statistics.median(s[i] for s in steady) for i, k in enumerate(STAGES)}
    return {
        "suite": "speed", "preset": args.preset, "layers": fast.model.config.num_layers,
        "resolution": f"{args.width}x{args.height}", "device": device_name(device), "torch": torch.__version__,
        "options": sorted(options), "sink_chunks": args.sink, "window_chunks": args.window,
        "first_frame_s": first_frame_s,
        "first_chunk_frames": None if first_frames is None else first_frames.shape[2],
        "sustained_chunks": args.sustained_chunks, "sustained_fps": frames / sustained_s,
        "sustained_chunk_s": chunk_s, **stage,
        "peak_memory_mb": _peak_memory_mb(device), "peak_memory_kind": PEAK_KIND[device.type],
        "output_diff_vs_plain": diff, "compare_chunks": args.compare_chunks,
        "dit_tflop_per_chunk": flops / 1e12, "peak_tflops": peak,
        "peak_tflops_source": "given" if args.peak_tflops else "measured dense matmul",
        "dit_share_of_peak": flops / (stage["dit_steps_s"] + stage["cache_write_s"]) / 1e12 / peak,
        "chunk_share_of_peak": flops / chunk_s / 1e12 / peak,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (CPU-sized real width)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--chunks", type=int, default=43, help="cache suite: chunks streamed")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--bidir-steps", type=int, default=50, help="bidirectional steps actually timed")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--suite", default="speed", choices=["speed", "cache"])
    add_speed_arguments(p)
    args = p.parse_args(argv)
    if args.suite == "speed":
        result = run_speed(args)
    elif args.chunks < 43:
        p.error("--chunks must be at least 43 (chunk 40 and its neighbours are measured)")
    else:
        result = run(args)
    for key, value in result.items():
        if key not in ("chunk_costs_s", "options_detail"):
            print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
