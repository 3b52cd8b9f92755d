"""Long-render benchmark: a 2-minute render to an mp4 holds flat memory and writes every frame.

    python -m bench.long_render                      # embedded:shapes, 64x64, 120 s, CPU
    python -m bench.long_render --model embedded:shapes --seconds 120 --json out.json

Samples the process's resident memory (RSS, /proc/self/statm) after every chunk and prints:
- rss_growth_after_chunk_10: peak RSS from chunk 10 to the end over RSS at chunk 10 (target <= 1.05)
- frames_in_file / frames_expected: decoded count of the finished mp4 (target: equal)
- time_to_first_frame_s, fps (whole run, decoding and writing included), sidecar bytes per chunk
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from causvid_core.cli import build_job
from causvid_core.pipeline import num_chunks
from causvid_core.resume import render_to_file, sidecar_path
from causvid_core.video_io import probe_video


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    settings = {"model": args.model, "prompt": args.prompt, "seconds": args.seconds, "seed": 0, "crf": 18}
    job = build_job(settings, out, device=args.device)
    total = num_chunks(job.request, job.causal)
    rss, sidecar, first = [], [], []
    start = time.perf_counter()

    def on_chunk(event) -> None:
        if not first:
            first.append(time.perf_counter() - start)
        rss.append(rss_bytes())
        sidecar.append(sidecar_path(out).stat().st_size)

    state = render_to_file(job, on_chunk=on_chunk)
    elapsed = time.perf_counter() - start
    base = rss[min(10, len(rss) - 1)]
    return {
        "model": args.model, "size": [job.request.width, job.request.height], "seconds": args.seconds,
        "chunks": total, "threads": torch.get_num_threads(), "device": str(job.model.patch_embedding.weight.device),
        "time_to_first_frame_s": round(first[0], 3), "wall_s": round(elapsed, 2),
        "fps": round(state.frames_written / elapsed, 2), "rss_mib_at_chunk_10": round(base / 2**20, 1),
        "rss_mib_peak_after_10": round(max(rss[10:] or rss) / 2**20, 1),
        "rss_growth_after_chunk_10": round(max(rss[10:] or rss) / base, 4),
        "rss_mib_every_20_chunks": [round(r / 2**20, 1) for r in rss[::20]],
        "sidecar_kib_max": round(max(sidecar) / 1024, 1),
        "frames_expected": job.request.num_frames, "frames_in_file": probe_video(out).frames,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:shapes")
    parser.add_argument("--prompt", default="a red circle moving right")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench_long_render.mp4")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
