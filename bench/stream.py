"""Streaming benchmark: constant cost per chunk with the rolling KV cache, against no cache and
against bidirectional 50-step CFG generation of the same 21-latent-frame video.

    python -m bench.stream --preset tiny --json out.json
    python -m bench.stream --preset wan2.1-t2v-1.3b --layers 4 --height 64 --width 64 --json out.json

Random weights: no download needed. Timings are wall-clock medians; on a GPU each measurement
is synchronised. Figures (see bench/RESULTS.md):
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
from causvid_core.model import CausalWanModel
from causvid_core.sampling import FlowSchedule, add_noise, sample_teacher, x0_from_v
from causvid_core.stream import StreamingGenerator

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (CPU-sized real width)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--chunks", type=int, default=43)
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--bidir-steps", type=int, default=50, help="bidirectional steps actually timed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.chunks < 43:
        p.error("--chunks must be at least 43 (chunk 40 and its neighbours are measured)")
    result = run(args)
    for key, value in result.items():
        if key != "chunk_costs_s":
            print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
