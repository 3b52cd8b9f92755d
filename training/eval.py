"""Score Shapes videos: ``python -m training.eval`` (figures of SHAPES.md, see ``training/metrics.py``).

Sources of videos:
- ``--videos DIR``: mp4 files plus ``prompts.json`` (``{"file.mp4": "a red circle moving right"}``)
  or ``prompts.csv`` (``file,prompt`` rows, header optional);
- ``--ground-truth N``: N rendered videos of ``prompt_set(N)`` (a sanity check: all figures near 100).
Prints a table, writes ``--json PATH`` and, with ``--drift PNG``, the per-window curves.
``--compare A.json=LABEL B.json=LABEL --drift PNG`` draws earlier runs' curves side by side, one panel
per figure (Figure 8 in miniature). ``--paired BASE.json NEW.json`` prints the paired differences of two
runs on the same prompts and seeds, with standard errors: whether a retrained model is really better.
``evaluate(generate_fn, prompts, seeds, seconds)`` is the entry point for models.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import score_video, score_with_drift
from .shapes import FPS, prompt_set, render_video

GenerateFn = Callable[[str, int, int], np.ndarray]  # (prompt, seed, num_frames) -> uint8 [F, H, W, 3]
FIGURES = ("text_alignment", "temporal_quality", "frame_quality")
PARTS = ("colour_accuracy", "shape_accuracy", "direction_accuracy", "purity", "single_object", "presence")
CURVE_COLOURS = {
    "text_alignment": (40, 80, 230),
    "temporal_quality": (230, 40, 40),
    "frame_quality": (40, 160, 60),
}


def _mean_dicts(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the numeric entries shared by all rows."""
    keys = [k for k in rows[0] if all(k in r for r in rows) and isinstance(rows[0][k], float)]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _mean_drift(per_video: Sequence[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Mean over videos of each window index (videos shorter than a window are left out of it)."""
    longest = max(len(w) for w in per_video)
    return [_mean_dicts([w[k] for w in per_video if len(w) > k]) for k in range(longest)]


def score_items(
    items: Iterable[tuple[str, str, np.ndarray, float]],
    drift: bool = False,
    window_s: float = 5.0,
    background: str | None = None,
    on_video: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Score (name, prompt, video uint8 [F, H, W, 3], fps) items: per-video figures, summary, drift.
    ``on_video(videos so far)`` is called after each video (progress, partial results)."""
    videos, drifts = [], []
    for name, prompt, video, fps in items:
        if drift:
            figures, windows = score_with_drift(video, prompt, int(round(fps)), window_s, background)
            drifts.append(windows)
        else:
            figures = score_video(video, prompt, background)
        videos.append({"name": name, "prompt": prompt, **figures})
        if on_video is not None:
            on_video(videos)
    if not videos:
        raise ValueError("no videos to score")
    result: dict[str, Any] = {"summary": _mean_dicts(videos), "videos": videos}
    if drift:
        result["drift"] = _mean_drift(drifts)
    return result


def evaluate(
    generate_fn: GenerateFn,
    prompts: Sequence[str],
    seeds: Sequence[int],
    seconds: float,
    fps: int = FPS,
    drift: bool = False,
    window_s: float = 5.0,
    background: str | None = None,
    on_video: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Generate one video per (prompt, seed) with ``generate_fn`` and score them all."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    num_frames = int(round(seconds * fps))
    items = (
        (f"{i:03d}_seed{s}", p, generate_fn(p, s, num_frames), float(fps))
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    )
    return score_items(items, drift=drift, window_s=window_s, background=background, on_video=on_video)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, its folder made first; atomic (a stop mid-write keeps the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def partial_path(path: Path) -> Path:
    """Where the videos finished so far go while ``--json PATH`` is being made: ``PATH.partial.json``."""
    return path.with_name(f"{path.stem}.partial.json")


class _Progress:
    """After each video: one line on stderr (count, its figures, elapsed time) and, with ``--json PATH``,
    the figures so far in ``PATH.partial.json`` with ``"partial": true``, so a long evaluation stopped
    part-way keeps the videos it finished and a complete earlier PATH is not replaced by a partial one.
    The final result goes to PATH and the partial file is removed."""

    def __init__(self, total: int | None, json_path: Path | None) -> None:
        self.total, self.json_path, self.t0 = total, json_path, time.perf_counter()

    def __call__(self, videos: list[dict[str, Any]]) -> None:
        v = videos[-1]
        of = f"/{self.total}" if self.total else ""
        figs = " / ".join(f"{v[k]:.1f}" for k in FIGURES)
        print(f"[{len(videos)}{of}] {v['name']} {v['prompt']!r}: {figs} (text / temporal / frame), "
              f"{time.perf_counter() - self.t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        if self.json_path is not None:
            write_json(partial_path(self.json_path),
                        {"partial": True, "summary": _mean_dicts(videos), "videos": videos})  # fmt: skip


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file with PyAV: (uint8 [F, H, W, 3], fps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate) if stream.average_rate else float(FPS)
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return np.stack(frames), fps


def load_prompt_map(folder: Path) -> dict[str, str]:
    """file -> prompt from ``prompts.json`` or ``prompts.csv`` in ``folder``."""
    js, cs = folder / "prompts.json", folder / "prompts.csv"
    if js.exists():
        data = json.loads(js.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{js} must be a JSON object mapping file name to prompt")
        return {str(k): str(v) for k, v in data.items()}
    if cs.exists():
        with cs.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
        if rows and [c.strip().lower() for c in rows[0]] == ["file", "prompt"]:
            rows = rows[1:]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise ValueError(f"{cs}: every row must be 'file,prompt', got {bad[0]}")
        return {r[0].strip(): r[1].strip() for r in rows}
    raise FileNotFoundError(
        f"no prompts.json or prompts.csv in {folder}; add one mapping each mp4 to its prompt"
    )


def _folder_items(folder: Path) -> Iterable[tuple[str, str, np.ndarray, float]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--videos {folder}: no such folder")
    mapping = load_prompt_map(folder)
    missing = [name for name in mapping if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"videos listed in the prompt map but absent from {folder}: {missing}")
    unlisted = sorted(p.name for p in folder.glob("*.mp4") if p.name not in mapping)
    if unlisted:
        raise ValueError(f"mp4 files without a prompt in the prompt map of {folder}: {unlisted}")
    for name in sorted(mapping):
        video, fps = read_video(folder / name)
        yield name, mapping[name], video, fps


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table: one row per video and the mean."""
    cols = FIGURES + PARTS[:3]
    heads = ["text", "temporal", "frame", "colour", "shape", "direction"]
    lines = [f"{'video':<16} {'prompt':<50} " + " ".join(f"{h:>9}" for h in heads)]
    for row in result["videos"]:
        vals = " ".join(f"{row.get(c, float('nan')):9.1f}" for c in cols)
        lines.append(f"{row['name'][:16]:<16} {row['prompt'][:50]:<50} {vals}")
    mean = result["summary"]
    lines.append(f"{'MEAN':<16} {'':<50} " + " ".join(f"{mean.get(c, float('nan')):9.1f}" for c in cols))
    return "\n".join(lines)


Series = tuple[tuple[int, int, int], list[tuple[float, float]]]


def _panel(draw: Any, box: tuple[int, int, int, int], t_end: float, value_range: tuple[float, float],
           series: Sequence[Series], y_ticks: Sequence[float], t_ticks: int) -> None:  # fmt: skip
    """One plot panel: the axes box (x0, y0, x1, y1), grid lines with their values, time labels under
    the box, and per series (colour, [(seconds, value), ...]) a line with a dot at each point."""
    x0, y0, x1, y1 = box
    lo, hi = value_range

    def xy(t: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t / t_end, y0 + (y1 - y0) * (1 - (v - lo) / max(hi - lo, 1e-6))

    for v in y_ticks:
        y = xy(0, float(v))[1]
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 34, y - 6), f"{v:.0f}", fill=(0, 0, 0))
    for t in np.linspace(0, t_end, t_ticks):
        draw.text((xy(float(t), lo)[0] - 10, y1 + 6), f"{t:.0f}s", fill=(0, 0, 0))
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for colour, points in series:
        pts = [xy(t, v) for t, v in points]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def _points(windows: Sequence[dict[str, float]], key: str) -> list[tuple[float, float]]:
    """(window middle in seconds, the figure) per window."""
    return [((w["start_s"] + w["end_s"]) / 2, w.get(key, 0.0)) for w in windows]


def plot_drift(windows: Sequence[dict[str, float]], path: str | Path, title: str = "Shapes drift") -> None:
    """Draw the three figures per window against time (seconds) into a PNG with Pillow."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 400, 60, 20, 40, 50
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    t_end = max(win["end_s"] for win in windows)
    series = [(colour, _points(windows, key)) for key, colour in CURVE_COLOURS.items()]
    _panel(draw, (left, top, w - right, h - bottom), t_end, (0.0, 100.0), series, range(0, 101, 25), 7)
    for i, (key, colour) in enumerate(CURVE_COLOURS.items()):
        draw.text((left + 10 + 170 * i, 12), key.replace("_", " "), fill=colour)
    draw.text((w // 2 - 60, h - 18), title, fill=(0, 0, 0))
    img.save(str(path))


MODEL_COLOURS = ((40, 80, 230), (230, 40, 40), (40, 160, 60), (200, 130, 0), (130, 60, 200), (90, 90, 90))


def _read_drift(spec: str) -> tuple[str, list[dict[str, float]]]:
    """``PATH[=LABEL]`` of a ``--json`` file written with ``--drift`` -> (label, windows)."""
    path, _, label = spec.partition("=")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--compare {spec}: cannot read {path} ({err})") from None
    if not result.get("drift"):
        raise SystemExit(f"--compare {spec}: {path} has no per-window figures; evaluate with --drift PNG "
                         "--json PATH (and --seconds longer than --window) to write them")  # fmt: skip
    return label or Path(path).stem, result["drift"]


def plot_drift_comparison(curves: Sequence[tuple[str, Sequence[dict[str, float]]]], path: str | Path) -> None:
    """Figure 8 in miniature: one panel per figure (text, temporal, frame), one line per model against
    time; each panel's value axis spans the curves' range (at least 20 points) so differences show."""
    from PIL import Image, ImageDraw

    pw, ph, left, right, top, bottom = 380, 300, 45, 15, 30, 40
    legend = 22 * len(curves) + 10
    img = Image.new("RGB", (3 * pw, ph + legend), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    t_end = max(win["end_s"] for _, ws in curves for win in ws)
    for p, key in enumerate(FIGURES):
        vals = [win.get(key, 0.0) for _, ws in curves for win in ws]
        mid, span = (min(vals) + max(vals)) / 2, max(max(vals) - min(vals) + 6.0, 20.0)
        lo, hi = max(0.0, mid - span / 2), min(100.0, mid + span / 2)
        series = [(colour, _points(ws, key)) for (_, ws), colour in zip(curves, MODEL_COLOURS, strict=False)]
        x0 = p * pw
        _panel(draw, (x0 + left, top, x0 + pw - right, ph - bottom), t_end, (lo, hi), series,
               np.linspace(lo, hi, 5), 5)  # fmt: skip
        draw.text((x0 + left + 5, 10), key.replace("_", " "), fill=(0, 0, 0))
    for i, ((label, _), colour) in enumerate(zip(curves, MODEL_COLOURS, strict=False)):
        y = ph + 5 + 22 * i
        draw.line([(left, y + 6), (left + 30, y + 6)], fill=colour, width=3)
        draw.text((left + 40, y), label, fill=(0, 0, 0))
    img.save(str(path))


PAIRED_FIGURES = (*FIGURES, "colour_accuracy", "shape_accuracy", "direction_accuracy")


def paired_difference(base: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per figure: both runs' means over the videos they share (same name and prompt), the mean paired
    difference new - base and its standard error. Two models scored on the same prompts and seeds differ
    far less in their paired differences than their spreads suggest, so this is how to tell a gain from
    noise. Raises ValueError when the runs share no video or name one video with different prompts."""
    def by_name(result: dict[str, Any], which: str) -> dict[str, dict[str, Any]]:
        videos = result.get("videos")
        if not videos:
            raise ValueError(f"the {which} JSON has no per-video figures: write it with training.eval --json")
        return {v["name"]: v for v in videos}

    a, b = by_name(base, "base"), by_name(new, "new")
    names = sorted(a.keys() & b.keys())
    if not names:
        raise ValueError("the two runs share no video: score both with the same --prompts and --seed")
    for name in names:
        if a[name].get("prompt") != b[name].get("prompt"):
            raise ValueError(f"video {name} has different prompts in the two runs ({a[name].get('prompt')!r}, "
                             f"{b[name].get('prompt')!r}): score both with the same --seed")  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    for key in PAIRED_FIGURES:
        if not all(key in a[n] and key in b[n] for n in names):
            continue
        x = np.array([a[n][key] for n in names], dtype=np.float64)
        y = np.array([b[n][key] for n in names], dtype=np.float64)
        d = y - x
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[key] = {"base": float(x.mean()), "new": float(y.mean()), "difference": float(d.mean()),
                    "standard_error": se, "videos": float(len(d))}  # fmt: skip
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", type=Path, help="folder of mp4 files with prompts.json or prompts.csv")
    src.add_argument("--ground-truth", type=int, metavar="N", help="score N rendered ground-truth videos")
    src.add_argument("--model", help="stream videos with a causal student: embedded:NAME or a checkpoint")
    src.add_argument("--teacher", help="sample videos with a many-step teacher (sliding windows): a checkpoint, "
                     "or embedded:NAME for the teacher an embedded model ships")
    src.add_argument("--compare", nargs="+", metavar="JSON[=LABEL]",
                     help="plot the drift curves of earlier --drift runs side by side into --drift PNG")  # fmt: skip
    src.add_argument("--paired", nargs=2, type=Path, metavar=("BASE_JSON", "NEW_JSON"),
                     help="paired differences (new - base, standard errors) of two --json runs on the same prompts")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=64, help="with --model/--teacher: prompts (default 64)")
    ap.add_argument(
        "--vae", help="VAE weights or embedded:NAME (default: the embedded model's; needed for checkpoints)"
    )
    ap.add_argument("--teacher-steps", type=int, default=50, help="Euler steps of --teacher (default 50)")
    ap.add_argument("--guidance", type=float, default=6.0, help="CFG scale of --teacher (default 6)")
    ap.add_argument("--causal-chunk", type=int, help="--teacher is block-causal with chunks of this size (default: a causal teacher's own, "
                    "from its training metadata; none for a bidirectional one)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of ground-truth videos (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt set and first video seed")
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    ap.add_argument(
        "--drift", type=Path, metavar="PNG", help="also compute per-window figures; plot them here"
    )
    ap.add_argument("--window", type=float, default=5.0, help="drift window in seconds (default 5)")
    ap.add_argument(
        "--estimate-background", action="store_true", help="segment against the dominant border colour"
    )
    return ap.parse_args(argv)


def _model_fn(args: argparse.Namespace) -> Any:
    """The generator of ``--model`` / ``--teacher`` with its VAE and text encoder."""
    from causvid_core.bundle import part_file, vae_file
    from causvid_core.vae import load_wan_vae

    from . import generators
    from .data import checkpoint_text_encoder

    source = args.model or args.teacher
    vae_path = vae_file(args.vae, source)
    if vae_path is None:
        raise SystemExit("--vae PATH is needed with a checkpoint (e.g. runs/shapes/vae/final.safetensors)")
    vae = load_wan_vae(vae_path)
    config = None
    if not source.startswith("embedded:"):  # found before any video, and named: not a shape error mid-decode
        from causvid_core.checkpoint import describe

        config = describe(source).config
        if config.in_dim != vae.z_dim:
            raise ValueError(
                f"{source} works on {config.in_dim}-channel latents but --vae {vae_path} makes {vae.z_dim}: pass "
                "the VAE its run trained (its runs folder's vae/final.safetensors or vae-decoder/final.safetensors)"
            )
    text = checkpoint_text_encoder(source, config)  # the config read once, for both
    if args.model:
        return generators.student(args.model, vae, text=text)
    teacher = part_file(args.teacher, "teacher")  # embedded:NAME: the teacher it ships (teacher.safetensors)
    chunk = args.causal_chunk if args.causal_chunk is not None else _trained_causal_chunk(Path(teacher))
    return generators.teacher(teacher, vae, text, steps=args.teacher_steps, guidance=args.guidance,
                              causal_chunk=chunk)  # fmt: skip


def _trained_causal_chunk(path: Path) -> int | None:
    """The chunk size a ``teacher --kind causal`` checkpoint was trained with (its metadata); None otherwise."""
    from causvid_core.bundle import file_metadata

    raw = file_metadata(path).get("causvid_training") if path.is_file() else None
    cfg = json.loads(raw) if raw else {}
    if cfg.get("kind") != "causal":
        return None
    chunk = int(cfg.get("causal", {}).get("chunk_frames", 3))
    print(f"{path.name}: a causal teacher (teacher --kind causal), sampled chunk-causally in chunks of {chunk}")
    return chunk


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: score, print the table, write JSON / PNG; returns the result dict."""
    args = _parse_args(argv)
    drift = args.drift is not None
    if drift and args.drift.suffix.lower() != ".png":  # found before minutes of scoring, not after
        raise ValueError(f"--drift {args.drift}: the plot is a PNG; give a path ending in .png")
    if args.compare:
        if len(args.compare) > len(MODEL_COLOURS):
            raise SystemExit(f"--compare takes at most {len(MODEL_COLOURS)} runs, got {len(args.compare)}")
        if not drift:
            raise SystemExit("--compare needs --drift PNG: the file to draw the comparison into")
        curves = [_read_drift(spec) for spec in args.compare]
        plot_drift_comparison(curves, args.drift)
        for label, ws in curves:
            first, last = ws[0], ws[-1]
            print(f"{label}: " + ", ".join(f"{k.split('_')[0]} {first[k]:.1f} -> {last[k]:.1f}" for k in FIGURES))
        return {"compare": dict(curves)}
    if args.paired:
        runs = []
        for path in args.paired:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: write it with python -m training.eval ... --json {path}")
            try:
                runs.append(json.loads(path.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not a JSON file of training.eval ({err})") from None
        paired = paired_difference(*runs)
        n = int(next(iter(paired.values()))["videos"]) if paired else 0
        print(f"{'figure':20s} {'base':>7s} {'new':>7s} {'new-base':>9s} {'s.e.':>6s}   ({n} videos in both)")
        for key, row in paired.items():
            print(f"{key:20s} {row['base']:7.1f} {row['new']:7.1f} {row['difference']:+9.1f} "
                  f"{row['standard_error']:6.1f}")  # fmt: skip
        if args.json is not None:
            write_json(args.json, {"paired": paired})
        return {"paired": paired}
    background = "estimate" if args.estimate_background else None
    if args.videos is not None:
        result = score_items(_folder_items(args.videos), drift=drift, window_s=args.window,
                             background=background, on_video=_Progress(None, args.json))  # fmt: skip
    elif args.model or args.teacher:
        fn = _model_fn(args)
        prompts = prompt_set(max(args.prompts, 6), args.seed)[: args.prompts]
        seeds = [args.seed + i for i in range(len(prompts))]
        result = evaluate(fn, prompts, seeds, args.seconds, drift=drift, window_s=args.window,
                          background=background, on_video=_Progress(len(prompts), args.json))  # fmt: skip
    else:
        n = args.ground_truth
        if n < 1:
            raise SystemExit(f"--ground-truth needs at least 1 video, got {n}")
        prompts = prompt_set(max(n, 6), args.seed)[:n]
        seeds = [args.seed + i for i in range(n)]
        result = evaluate(
            render_video,
            prompts,
            seeds,
            args.seconds,
            drift=drift,
            window_s=args.window,
            background=background,
            on_video=_Progress(n, args.json),
        )
    print(format_table(result))
    if args.json is not None:
        write_json(args.json, result)
        partial_path(args.json).unlink(missing_ok=True)
    if drift:
        plot_drift(result["drift"], args.drift)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as err:  # a missing folder, checkpoint or prompt map: no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped: the videos finished so far are in --json's .partial.json file (if --json was given)",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)
