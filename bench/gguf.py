"""GGUF benchmark: what keeping a quantised Wan file's weights packed costs and saves.

    python -m bench.gguf --json gguf.json                 # Wan-1.3B width, 2 of 30 layers, CPU
    python -m bench.gguf --layers 30 --device cuda        # the whole 1.3B on a GPU
    python -m bench.gguf --quick                          # seconds, for a smoke test

Random weights at Wan2.1-1.3B's width (dim 1536, ffn 8960, 12 heads), written as a GGUF by
``python -m causvid_core quantize`` (block linears quantised, small tensors F32, as ComfyUI-GGUF's converter
writes them), then loaded twice: unpacked to the compute dtype (``load_model``) and packed
(``load_model(packed=True)``, what the nodes and the CLI do). Figures per type:
- file_mb, weights_mb (parameters and buffers as loaded), load_s;
- forward_ms: one denoising forward pass of one 3-latent-frame chunk (median of --repeats), and the
  packed/unpacked ratio: the price of unpacking every block linear for each matmul;
- max_abs_diff of the two models' outputs (0: the same weights reach the matmul);
- unpack_gbps: unpacking speed of random blocks of each type (output float32 bytes per second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from causvid_core.checkpoint import load_model, save_model
from causvid_core.cli import main as quantize_command
from causvid_core.config import DiTConfig
from causvid_core.gguf import _DEQUANT, TYPES, QuantizedTensor, unpack
from causvid_core.model import CausalWanModel


def _machine() -> str:
    """CPU model and core count (``/proc/cpuinfo`` where there is one)."""
    name = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        name = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in info.read_text().splitlines()
                if ln.startswith("model name")
            ),
            name,
        )
    return f"{name}, {os.cpu_count()} cores"


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _forward_ms(
    model: CausalWanModel, x: torch.Tensor, ctx: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor]:
    t = torch.full((1,), 757.0, device=x.device)
    times, out = [], None
    with torch.no_grad():
        kv = model.encode_context(ctx)
        for _ in range(repeats + 1):  # the first is a warm-up
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x, t, kv)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:]), out


def _unpack_gbps(device: str, blocks: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    out = {}
    for type_id, (name, per_block, size) in TYPES.items():
        if name not in _DEQUANT:
            continue
        raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
        raw[:, :2] = np.array([0.01], np.float16).view(np.uint8)  # a finite scale where most types keep one
        qt = QuantizedTensor("w", type_id, torch.Size([blocks * per_block]), raw.reshape(-1))
        packed = qt.raw(device)
        unpack(packed, type_id, qt.shape, torch.float32)
        start = time.perf_counter()
        for _ in range(3):
            unpack(packed, type_id, qt.shape, torch.float32)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        out[name] = round(3 * blocks * per_block * 4 / (time.perf_counter() - start) / 1e9, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (Wan-1.3B has 30)")
    p.add_argument("--height", type=int, default=256, help="video height in pixels (latent / 8)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument(
        "--types",
        default="Q8_0,Q4_0",
        help="GGUF types to write (any of `python -m causvid_core quantize --type`)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a small width and size, for a smoke test")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, freq_dim=32, text_dim=64)
        args.height = args.width = 64
    else:
        cfg = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=args.layers)
    torch.manual_seed(0)
    with torch.no_grad():
        model = CausalWanModel(cfg)
        for name, param in model.named_parameters():
            if param.ndim >= 2 and not name.endswith("modulation"):
                param.normal_(0, param[0].numel() ** -0.5)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, 3, args.height // 8, args.width // 8, generator=gen).to(args.device, dtype)
    ctx = torch.randn(1, 32, cfg.text_dim, generator=gen).to(args.device, dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = save_model(model, Path(tmp) / "wan.safetensors")
        for name in args.types.split(","):
            path = Path(tmp) / f"wan-{name}.gguf"
            if quantize_command(["quantize", str(source), "--type", name.strip(), "--out", str(path)]) != 0:
                return 2
            row: dict[str, Any] = {"type": name, "file_mb": round(path.stat().st_size / 2**20, 1)}
            outs = {}
            for mode, packed in (("unpacked", False), ("packed", True)):
                start = time.perf_counter()
                loaded, _ = load_model(path, dtype=dtype, device=args.device, packed=packed)
                row[f"{mode}_load_s"] = round(time.perf_counter() - start, 2)
                row[f"{mode}_weights_mb"] = round(_bytes(loaded) / 2**20, 1)
                ms, outs[mode] = _forward_ms(loaded, x, ctx, args.repeats)
                row[f"{mode}_forward_ms"] = round(ms, 1)
                del loaded
            row["forward_ratio"] = round(row["packed_forward_ms"] / row["unpacked_forward_ms"], 2)
            row["max_abs_diff"] = float((outs["packed"] - outs["unpacked"]).abs().max())
            rows.append(row)
            print(json.dumps(row))
    result = {
        "date": str(date.today()), "machine": _machine(),
        "torch": torch.__version__, "device": args.device, "dtype": args.dtype, "layers": cfg.num_layers,
        "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "tokens": 3 * (args.height // 16) * (args.width // 16),
        "rows": rows, "unpack_gbps": _unpack_gbps(args.device, 4096 if args.quick else 65536),
    }  # fmt: skip
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result["unpack_gbps"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
