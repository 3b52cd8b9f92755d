"""Run logs: a progress line on stdout, a CSV file, optional TensorBoard, loss plots and sample videos."""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Progress:
    """step/total, loss, it/s and ETA: one rewritten line on a TTY, plain lines otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True) -> None:
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or (step % self.every and step != self.total and not self.tty):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        vals = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step")
        line = f"[{bar}] {step}/{self.total} {vals} | {rate:.2f} it/s eta {_fmt_time(eta)}"
        if self.tty:
            end = "\n" if step == self.total else ""
            print("\r" + line, end=end, flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricLog:
    """CSV (``log.csv``) of every step's metrics, plus TensorBoard when it is installed."""

    def __init__(self, folder: Path, resume_step: int = 0) -> None:
        self.path = folder / "log.csv"
        self.rows: list[dict[str, float]] = []
        if self.path.exists():  # keep rows up to the resumed step, drop the rest
            with self.path.open() as f:
                self.rows = [
                    {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
                ]
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # tensorboard is optional
            self._tb = None

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(row["step"]))

    def flush(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        tmp = self.path.with_name(".tmp-log.csv")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (int(v) if k == "step" else repr(float(v))) for k, v in r.items()})
        tmp.replace(self.path)
        if self._tb is not None:
            self._tb.flush()


def plot_losses(rows: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """A PNG line plot of every loss column against the step (Pillow, no matplotlib needed)."""
    from PIL import Image, ImageDraw

    keys = [k for k in (rows[0] if rows else {}) if "loss" in k]
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), title, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for n, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if len(pts) < 2:
            continue
        xs, ys = np.array([p[0] for p in pts]), np.log10(np.maximum([p[1] for p in pts], 1e-12))
        x_lo, x_hi, y_lo, y_hi = (
            xs.min(),
            max(xs.max(), xs.min() + 1),
            ys.min(),
            max(ys.max(), ys.min() + 1e-6),
        )
        line = [
            (
                pad + (x - x_lo) / (x_hi - x_lo) * (w - 2 * pad),
                h - pad - (y - y_lo) / (y_hi - y_lo) * (h - 2 * pad),
            )
            for x, y in zip(xs, ys, strict=True)
        ]
        colour = colours[n % len(colours)]
        draw.line(line, fill=colour, width=2)
        draw.text((w - 200, 8 + 14 * n), f"{key} (log10 {y_lo:.2f}..{y_hi:.2f})", fill=colour)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_strip(frames: np.ndarray, path: Path, count: int = 8, scale: int = 2) -> None:
    """A PNG of ``count`` evenly spaced frames side by side (nearest-neighbour ``scale``x): a sample seen at
    a glance in a file browser, next to its mp4, and comparable step to step."""
    from PIL import Image

    t = frames.shape[0]
    picks = np.linspace(0, t - 1, num=min(count, t)).round().astype(int)
    strip = np.concatenate([frames[i] for i in picks], axis=1)
    image = Image.fromarray(np.ascontiguousarray(strip))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def write_video(frames: np.ndarray, path: Path, fps: int = 16) -> None:
    """Write uint8 [T, H, W, 3] frames to a small mp4 (H.264 when available, else MPEG-4)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
        except Exception:
            stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[: h - h % 2, : w - w % 2]), format="rgb24"
            )
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
