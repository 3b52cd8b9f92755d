"""VAE benchmark: streaming decode (chunk by chunk, frames written to an MP4 as they come) against one
full decode, and peak memory of streaming 10 s against 60 s of video.

    python -m bench.vae --json vae.json
    python -m bench.vae --quick            # a few seconds, for a smoke test

Random weights (no download). Each measurement runs in its own subprocess; peak memory is the growth
of the peak resident set (VmHWM, reset through /proc/self/clear_refs after the model is built and
warmed up) on CPU, or of torch's peak allocation on CUDA. The memory runs fix glibc's mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536) so freed tensors go back to the system and RSS follows live memory;
with glibc's adaptive default the peak also holds heap fragmentation, which keeps rising for the first
~30 chunks before it levels off. Figures (see bench/RESULTS.md):
- fps: decoded frames per second of decode time (the MP4 encoding is not timed);
- first_frames_s: time until the first frames exist (streaming: the first chunk; full: everything);
- peak_growth_mb at 10 s and 60 s streamed: the target is the same peak (ratio 1.0); the speed table's
  peaks use glibc's default allocator (streaming vs full decode, for contrast).
Videos are rounded up to whole chunks of latent frames, as the generator makes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from causvid_core.vae import VAE_PRESETS, WanVAE
from causvid_core.video_io import VideoWriter, vae_to_uint8

FPS = 16


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: torch.device) -> float:
    """Start a new peak measurement; returns the current usage in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _status_kb("VmRSS") / 1024


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kb("VmHWM") / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement: decode ``seconds`` of video at ``res`` pixels, streamed or in one pass."""
    torch.set_grad_enabled(False)
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS[spec["preset"]]).to(device).eval()
    lat = spec["res"] // 8
    chunk = spec["chunk"]  # whole chunks, as the generator makes them (the writer would cut the extra frames)
    latent_frames = chunk * math.ceil((1 + math.ceil((spec["seconds"] * FPS - 1) / 4)) / chunk)
    vae.decode(torch.randn(1, 16, chunk, lat, lat, device=device))  # warm-up on a throwaway stream
    base = _reset_peak(device)
    out_frames, first, decode_s, state_mb = 0, None, 0.0, 0.0
    start = time.perf_counter()
    if spec["mode"] == "full":
        z = torch.randn(1, 16, latent_frames, lat, lat, device=device)
        video = vae.decode(z)
        _sync(device)
        decode_s = first = time.perf_counter() - start
        out_frames = video.shape[2]
        del video
    else:
        decoder = vae.stream_decoder()
        with tempfile.TemporaryDirectory() as tmp, VideoWriter(Path(tmp) / "out.mp4", fps=FPS) as writer:
            for _ in range(latent_frames // chunk):
                z = torch.randn(1, 16, chunk, lat, lat, device=device)
                t0 = time.perf_counter()
                frames = decoder.decode(z)
                _sync(device)
                decode_s += time.perf_counter() - t0
                first = first if first is not None else time.perf_counter() - start
                writer.write(vae_to_uint8(frames))  # written the moment it exists, then dropped
                out_frames += frames.shape[2]
                del frames
        state_mb = decoder.state.nbytes() / 2**20
    return {**spec, "latent_frames": latent_frames, "frames": out_frames, "decode_s": round(decode_s, 3),
            "fps": round(out_frames / decode_s, 2), "first_frames_s": round(first, 3),
            "peak_growth_mb": round(_peak(device) - base, 1), "state_mb": round(state_mb, 2)}  # fmt: skip


def measure(spec: dict[str, Any], fixed_mmap: bool = False) -> dict[str, Any]:
    """Run ``worker`` in a fresh interpreter so peaks never mix."""
    cmd = [sys.executable, "-m", "bench.vae", "--worker", json.dumps(spec)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if fixed_mmap else None
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root, env=env)
    if done.returncode:
        raise RuntimeError(f"measurement {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(quick: bool) -> tuple[list[tuple[str, int, float]], list[tuple[str, int]], tuple[float, float]]:
    """(speed cases: preset, pixels, seconds), (memory cases: preset, pixels), (short, long seconds)."""
    if quick:
        return [("tiny", 32, 1.0)], [("tiny", 32)], (1.0, 3.0)
    return [("small", 64, 10.0), ("wan2.1", 64, 2.0)], [("small", 64), ("wan2.1", 32)], (10.0, 60.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    speed_cases, memory_cases, (short, long) = plan(args.quick)
    base = {"device": args.device, "chunk": args.chunk}
    speed = []
    for preset, res, seconds in speed_cases:
        spec = {**base, "preset": preset, "res": res, "seconds": seconds}
        stream, full = measure({**spec, "mode": "stream"}), measure({**spec, "mode": "full"})
        speed.append({"preset": preset, "res": res, "seconds": seconds, "stream": stream, "full": full})
    memory = []
    for preset, res in memory_cases:
        spec = {**base, "preset": preset, "res": res, "mode": "stream"}
        a, b = measure({**spec, "seconds": short}, True), measure({**spec, "seconds": long}, True)
        ratio = b["peak_growth_mb"] / max(a["peak_growth_mb"], 1e-9)
        memory.append({"preset": preset, "res": res, "short": a, "long": b, "peak_ratio": round(ratio, 3)})
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")  # fmt: skip
    return {"machine": machine, "torch": torch.__version__, "date": date.today().isoformat(), "fps": FPS,
            "chunk_latent_frames": args.chunk, "speed": speed, "memory": memory}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    rows = ["| preset | pixels | video | streaming fps | full fps | first frames: streaming / full (s) | "
            "peak growth: streaming / full (MB) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in result["speed"]:
        st, fu = s["stream"], s["full"]
        rows.append(f"| {s['preset']} | {s['res']}x{s['res']} | {s['seconds']:g} s ({st['frames']} frames) | "
                    f"{st['fps']} | {fu['fps']} | {st['first_frames_s']} / {fu['first_frames_s']} | "
                    f"{st['peak_growth_mb']} / {fu['peak_growth_mb']} |")  # fmt: skip
    rows += ["", "| preset | pixels | peak growth streamed, short (MB) | streamed, long (MB) | long / short | "
             "cached state (MB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m in result["memory"]:
        a, b = m["short"], m["long"]
        rows.append(f"| {m['preset']} | {m['res']}x{m['res']} | {a['peak_growth_mb']} ({a['seconds']:g} s) | "
                    f"{b['peak_growth_mb']} ({b['seconds']:g} s) | **{m['peak_ratio']}** | {b['state_mb']} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny preset, short videos: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per streamed chunk (3 -> 12 frames)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    result = run(args)
    print(f"{result['machine']}, torch {result['torch']}, {result['date']}\n{table(result)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
