"""A student's own latents, each with the video it should have drawn: data for ``vae --student DIT``.

The shipped student writes the prompt's shape into its latents (the shape code, channels 3-5) in every
latent frame, yet a decoder fitted to the encoder's latents draws its squares and triangles as round
blobs: the student's latents lie off the encoder's, and those decoders never saw such latents. This
makes the pairs a decoder fine-tune needs to learn them: the student streams a clip of a random prompt,
the init decoder draws it, the object's centroid is measured in every frame (as the figures measure it),
and the target is the prompt's object rendered exactly (its shape, colour and background) along the
student's own path: a straight line at the prompt's velocity plus the drawing's deviation from it,
averaged over ``smooth`` frames (5 by default; 0 keeps none of it). The target keeps where the student put
the object (a causal decoder cannot move it far from where its latents say without drifting) and asks only
for what the student meant: the right shape, clean edges and even steps.

Clips are made in shards of ``SHARD`` and kept in the stage's folder, so a stopped run resumes without
making them again; a shard is only reused when it was made by the same student, init VAE and settings.
A shard keeps each clip's measured path, not its target, so every ``smooth`` reads the same shards.
Missing shards are made by several one-thread processes at once (``workers``): on a 2-core CPU two such
processes make about a third more clips per second than one process with two threads (2.84 against 2.14).
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .generators import FrameCollector
from .metrics import frame_stats, wrapped
from .shapes import (
    DIRECTION_VECTORS,
    REFERENCE_SIZE,
    SPEED,
    _coverage,
    object_centres,
    parse_prompt,
    random_prompt,
    render_video,
    to_model_range,
)

SHARD = 64  # clips per shard file
SMOOTH_FRAMES = 5  # the centred moving average over the student's path (--student-smooth's default)
MAX_PATH_ERROR = 4.0  # px (at 64x64): a clip whose path is this far (rms) from a straight one is skipped
# shards keep each clip's measured path, its start and deviation (1 kept the drawn targets, 400 times the bytes;
# 2 the smoothed path, so another --student-smooth meant making them again)
FORMAT = 3


@functools.cache
def _centroid_offsets(size: int) -> dict[str, np.ndarray]:
    """Each shape's measured centroid minus its bounding-box centre (a triangle's sits lower); measured once per
    size (callers only read it)."""
    out = {}
    for shape in ("circle", "square", "triangle"):
        prompt = f"a red {shape} moving right"
        stats = frame_stats(render_video(prompt, 5, 4, size), (0, 0, 0))
        out[shape] = np.nanmean(wrapped(stats.centroid - object_centres(prompt, 5, np.arange(4), size), size), 0)
    return out


def measure_path(video: np.ndarray, prompt: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The path a drawn video [F, H, W, 3] shows, as (start [2], deviation [F, 2]): the straight path at the
    prompt's velocity through the drawing's mean position starts at ``start`` (a bounding-box centre), and the
    drawing's measured centroids (less the shape's centroid offset) lie ``deviation`` off it, frame by frame.
    None when the object is missing in a frame or the path strays more than ``MAX_PATH_ERROR`` px (rms) from
    the straight one: no clean target."""
    p = parse_prompt(prompt)
    size = video.shape[2]
    offsets = _centroid_offsets(size)
    stats = frame_stats(video, p.background_rgb)
    if not stats.present.all():
        return None
    t = np.arange(len(video), dtype=np.float64)[:, None]
    start = np.mod(stats.centroid - offsets[p.shape] - _velocity(p.direction, size) * t, size)  # each frame's start
    angle = start * 2 * np.pi / size
    mean = np.mod(np.arctan2(np.sin(angle).mean(0), np.cos(angle).mean(0)) * size / (2 * np.pi), size)
    deviation = wrapped(start - mean, size)
    if np.sqrt((deviation**2).sum(1).mean()) * REFERENCE_SIZE / size > MAX_PATH_ERROR:
        return None
    return mean, deviation


def smooth_path(prompt: str, start: np.ndarray, deviation: np.ndarray, size: int,
                smooth: int = SMOOTH_FRAMES) -> np.ndarray:  # fmt: skip
    """Bounding-box centres [F, 2]: the straight path from ``start`` at the prompt's velocity plus ``deviation``
    [F, 2] averaged over ``smooth`` frames (a centred moving average, the ends held); 0 keeps none of the
    deviation, the straight path itself."""
    t = np.arange(len(deviation), dtype=np.float64)[:, None]
    if smooth == 0:
        kept = np.zeros_like(deviation)
    else:
        k = min(smooth, len(deviation))
        padded = np.pad(deviation, ((k // 2, k - 1 - k // 2), (0, 0)), mode="edge")
        kept = np.stack([np.convolve(padded[:, j], np.ones(k) / k, mode="valid") for j in range(2)], 1)
    return np.mod(start + _velocity(parse_prompt(prompt).direction, size) * t + kept, size)


def target_path(video: np.ndarray, prompt: str, smooth: int = SMOOTH_FRAMES) -> np.ndarray | None:
    """Bounding-box centres [F, 2] of the prompt's object along the path a drawn video [F, H, W, 3] shows,
    ``measure_path`` then ``smooth_path``; None where there is no clean target."""
    measured = measure_path(video, prompt)
    return None if measured is None else smooth_path(prompt, *measured, video.shape[2], smooth)


def _velocity(direction: str, size: int) -> np.ndarray:
    """The step per frame [2] (x, y) at ``size`` px of an object moving in ``direction`` (a prompt's word)."""
    return SPEED * size / REFERENCE_SIZE * np.array(DIRECTION_VECTORS[direction], dtype=np.float64)


def render_along(prompt: str, centres: np.ndarray, size: int) -> np.ndarray:
    """uint8 [F, size, size, 3]: the prompt's object drawn exactly (anti-aliased) at bounding-box centres [F, 2]."""
    p = parse_prompt(prompt)
    alpha = _coverage(p.shape, centres, size)[..., None]
    bg, fg = np.array(p.background_rgb, dtype=np.float64), np.array(p.colour_rgb, dtype=np.float64)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


@torch.no_grad()
def steady_targets(x0: Tensor, prompts: list[str], codec: Any) -> tuple[Tensor, list[bool]]:
    """ODE pairs' targets with even steps (``ode-pairs --steady-targets true``): each latent clip of ``x0``
    [N, C, F, h, w] drawn by ``codec`` (``encode`` / ``decode`` in -1..1), the object's path measured
    (``measure_path``), and the prompt's object drawn exactly along the straight path at the prompt's velocity
    through it, encoded back. The teacher's jitter goes, where it put the object stays. A clip whose drawing
    has no clean path keeps its latents. Returns the latents and, per clip, whether it was steadied."""
    from causvid_core.pipeline import to_uint8_frames

    out, done = x0.clone(), []
    frames = 1 + 4 * (x0.shape[2] - 1)
    for i, prompt in enumerate(prompts):
        drawn = to_uint8_frames(codec.decode(x0[i : i + 1]))[:frames].cpu().numpy()  # [T, H, W, 3]
        size = drawn.shape[2]
        measured = measure_path(drawn, prompt)
        if measured is not None:
            clean = render_along(prompt, smooth_path(prompt, *measured, size, 0), size)
            out[i] = codec.encode(to_model_range(clean)[None].to(x0.device))[0].to(out.dtype)
        done.append(measured is not None)
    return out, done


def clip_prompt(seed: int, index: int) -> tuple[str, int]:
    """(prompt, video seed) of student clip ``index``: deterministic, apart from the training clips' stream."""
    rng = np.random.default_rng([seed, 0x57D, index])
    return random_prompt(rng), int(rng.integers(2**31))


def _signature(student: Path, init: Path, frames: int, size: int, seed: int) -> str:
    """What a shard depends on: the two weight files (name, size, first MB) and the settings."""
    h = hashlib.sha256()
    for path in (student, init):
        h.update(str(path.resolve()).encode())
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
    h.update(json.dumps([frames, size, seed, MAX_PATH_ERROR, FORMAT]).encode())
    return h.hexdigest()[:16]


class ClipMaker:
    """The student (with its text encoder) and the init decoder, loaded once, making shards of clips."""

    def __init__(self, student: Path, init: Path, size: int, text: Any = None) -> None:
        from causvid_core.bundle import load_bundle
        from causvid_core.vae import load_wan_vae

        from .data import checkpoint_text_encoder

        self.bundle = load_bundle(str(student), dtype=torch.float32)
        self.encoder = self.bundle.text_encoder or text or checkpoint_text_encoder(student, self.bundle.model.config)
        self.vae = load_wan_vae(init)
        self.size = size

    @torch.no_grad()
    def shard(self, first: int, count: int, frames: int, seed: int) -> dict[str, Any]:
        """Clips [first, first + count): latents [N, C, f, h, w] (normalised, float16), each drawing's measured
        path (``measure_path``: starts [N, 2], deviations [N, frames, 2], float64) and prompts; clips without a
        clean target are left out. The targets are smoothed and drawn when the shard is read."""
        from causvid_core.pipeline import PromptTimeline, RenderRequest, render

        vae, bundle, size = self.vae, self.bundle, self.size

        class Capture:  # the pipeline's decoder: keeps each chunk's latents and draws it with the init decoder
            def __init__(self) -> None:
                self.latents: list[Tensor] = []
                self.inner = vae.stream_decoder()

            def decode(self, z: Tensor) -> Tensor:
                self.latents.append(z.clone())
                return self.inner.decode(z)

            def reset(self) -> None:
                self.inner.reset()

        latents, starts, deviations, prompts = [], [], [], []
        for index in range(first, first + count):
            prompt, video_seed = clip_prompt(seed, index)
            capture, collect = Capture(), FrameCollector()
            render(bundle.model, PromptTimeline.single(self.encoder.encode([prompt])),
                   RenderRequest(size, size, frames, seed=video_seed, fps=bundle.fps), decoder=capture,
                   writer=collect, sampling=bundle.sampling, causal=bundle.causal, keep_latents=False)  # fmt: skip
            drawn = collect.video(frames)
            measured = measure_path(drawn, prompt)
            if measured is None:
                continue
            latents.append(torch.cat(capture.latents, 2)[0].half())
            starts.append(torch.from_numpy(measured[0]))
            deviations.append(torch.from_numpy(measured[1]))
            prompts.append(prompt)
        if not latents:
            return {"latents": None, "starts": None, "deviations": None, "prompts": []}
        return {"latents": torch.stack(latents), "starts": torch.stack(starts), "deviations": torch.stack(deviations),
                "prompts": prompts}  # fmt: skip


_MAKER: ClipMaker | BaseException | None = None  # a worker process's own (or why it could not load), by _start_worker
MAX_DEFAULT_WORKERS = 8  # each worker loads the student and the VAE: more than this seldom pays on a shared host


def _start_worker(student: Path, init: Path, size: int, text: Any) -> None:
    global _MAKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the workers
    torch.set_num_threads(1)  # one thread per process: on a small CPU, N processes make more clips than N threads
    try:
        _MAKER = ClipMaker(student, init, size, text)
    except Exception as e:  # kept, and raised by the first shard: the caller sees it, not a broken pool
        _MAKER = e


def _write_shard(maker: ClipMaker, path: Path, first: int, count: int, frames: int, seed: int, sig: str) -> int:
    """Make one shard and write it atomically (a stopped run never leaves half a shard); the clips kept."""
    shard = maker.shard(first, count, frames, seed)
    shard["signature"], shard["count"] = sig, count
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # a process's own: two runs never share one
    torch.save(shard, tmp)
    tmp.replace(path)
    return len(shard["prompts"])


def _worker_shard(path: Path, first: int, count: int, frames: int, seed: int, sig: str) -> int:
    if isinstance(_MAKER, BaseException):
        raise _MAKER
    assert _MAKER is not None, "_start_worker runs first"
    return _write_shard(_MAKER, path, first, count, frames, seed, sig)


def default_workers() -> int:
    """Processes that make clips: one per core the process may use, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def _read_shard(path: Path) -> dict[str, Any] | None:
    """A kept shard, or None when there is none or it cannot be read (made again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception:  # e.g. a disk that filled up under an older version's writer
        return None


def _make_in_workers(jobs: list[tuple[Path, int, int]], workers: int, args: tuple[Any, ...], frames: int,
                     seed: int, sig: str, report: Callable[[Path, int, int], None]) -> None:  # fmt: skip
    """Make ``jobs`` (path, first clip, count) in ``workers`` spawned processes; on any error or Ctrl-C the
    workers are stopped at once (the shards they finished stay on disk, the ones they were making are lost)."""
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and locks
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=args)
    try:
        futures = {pool.submit(_worker_shard, path, first, n, frames, seed, sig): (path, n)
                   for path, first, n in jobs}  # fmt: skip
        for future in as_completed(futures):
            report(*futures[future], future.result())
    except BaseException as e:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()  # not one more shard: a stopped run must stop
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):  # a worker died before it could say why
            raise RuntimeError(
                f"a process making student clips stopped ({e}): killed (out of memory?), or the caller is a script "
                "that worker processes import again, which then starts the work anew (put its entry under `if "
                "__name__ == \"__main__\":`). Or make the clips in this process: --student-workers 1 (workers=1)"
            ) from e
        raise
    pool.shutdown(wait=True)


def student_clips(folder: Path, student: Path, init: Path, count: int, frames: int, size: int, seed: int,
                  text: Any = None, say: Callable[[str], None] = print, workers: int = 1,
                  smooth: int = SMOOTH_FRAMES) -> tuple[Tensor, Tensor]:  # fmt: skip
    """All ``count`` clips' (latents float32 [N, C, f, h, w], targets float32 [N, 3, F, H, W] in -1..1),
    made shard by shard into ``folder`` (kept: a resumed run reads them back) or read from there. With
    ``workers`` > 1 the missing shards are made by that many one-thread processes at once (the same clips up to
    float rounding; the finished shards are kept whatever stops the rest). Each target is the prompt's object
    drawn along its drawing's path with the deviation from a straight one averaged over ``smooth`` frames
    (``smooth_path``; 0: the straight path), so the same shards serve any ``smooth``."""
    sig = _signature(student, init, frames, size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []  # (path, first, count) of each shard missing or made by another student, init or settings
    kept: dict[int, dict[str, Any]] = {}
    for first in range(0, count, SHARD):
        path = folder / f"shard_{first // SHARD:04d}.pt"
        size_here = min(SHARD, count - first)  # the last shard of a run with fewer clips holds fewer
        shard = _read_shard(path)
        if shard is None or shard.get("signature") != sig or shard.get("count") != size_here:
            jobs.append((path, first, size_here))
        else:
            kept[first] = shard
    done = 0

    def report(path: Path, size_here: int, made: int) -> None:
        nonlocal done
        done += size_here
        say(f"student clips {done}/{sum(j[2] for j in jobs)} made: {made} of {size_here} kept in {path.name}")

    workers = min(workers, len(jobs))
    if workers > 1:
        _make_in_workers(jobs, workers, (student, init, size, text), frames, seed, sig, report)
    elif jobs:
        maker = ClipMaker(student, init, size, text)  # loaded once, for every shard to make
        for path, first, n in jobs:
            report(path, n, _write_shard(maker, path, first, n, frames, seed, sig))
    for path, first, _ in jobs:
        kept[first] = torch.load(path, weights_only=False)
    shards = [kept[first] for first in sorted(kept) if kept[first]["latents"] is not None]
    if not shards:
        raise ValueError(f"none of the {count} clips of {student} drew one object along a path: is it a trained "
                         "student of this run's VAE?")  # fmt: skip
    latents = torch.cat([s["latents"] for s in shards]).float()
    drawn = [render_along(prompt, smooth_path(prompt, start.numpy(), deviation.numpy(), size, smooth), size)
             for shard in shards
             for prompt, start, deviation in zip(shard["prompts"], shard["starts"], shard["deviations"], strict=True)]
    targets = torch.from_numpy(np.stack(drawn)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    return latents, targets
