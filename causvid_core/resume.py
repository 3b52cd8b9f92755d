"""Resumable renders to a file: a sidecar kept beside the mp4 lets an interrupted render continue exactly.

While ``render_to_file`` writes ``FILE.mp4`` it keeps, after every chunk:

- ``FILE.mp4.resume`` (safetensors, replaced atomically: tmp + ``os.replace``): the latents of the
  chunks the KV cache holds (sink + window, with start frames and sizes), the chunk index, the
  frames written, the streaming decoder's causal-conv caches when they are small (at most
  ``DECODER_STATE_LIMIT`` bytes), the mp4 segments and their committed frame counts, and the
  settings as JSON (model, prompts, size, length, seed, sampling and chunk settings, VAE);
- ``FILE.mp4.resume.latents``: the clean latents of every finished chunk, appended (float32, raw).

Why the whole history: the keys/values of a cached chunk at every layer past the first depend on what
that chunk attended to when it was written, i.e. on chunks that have since left the window. Replaying
every chunk's cache write (one model pass per chunk, a quarter of a 3-step chunk's cost) rebuilds the
cache bit for bit, so the resumed latents are byte-identical to an uninterrupted render. If the
history is missing the cache is rebuilt from the window latents alone: exact while no chunk has left
the window, close but not identical after.

Decoded frames: with the decoder caches stored, the frames after the resume point equal the
uninterrupted render's. Caches grow with the frame area (2 MB for the tiny VAE at 64x64; the Wan2.1
VAE holds about 39 MB at 64x64, so about 3.8 GB at 832x480), so above the limit the decoder is
re-warmed instead by decoding the newest contiguous cached latents: exact when they reach back to
the first frame, otherwise the first frames after the resume point differ slightly.

The mp4: every render writes with ``VideoWriter(low_latency=True)`` (no frame held in the encoder, a
fragment per frame, flushed), so a killed render leaves a playable file with every finished chunk,
except that the mp4 muxer writes each fragment when the next frame arrives: the very last frame
written can be missing after a SIGKILL (an interrupt or an error closes the file with it). So the
sidecar counts a segment's frames as committed up to the one before the last, and keeps the last
frame's pixels; a resumed run writes that frame first. A resumed run never touches the interrupted file: it writes the remaining frames into a new segment
``FILE.mp4.partN.mp4``; when the render completes, the committed frames of all segments are joined
without re-encoding into ``FILE.mp4`` (tmp + ``os.replace``) and the segments, the history and
the sidecar are deleted. So ``FILE.mp4`` stays playable at every moment, and the finished file holds
every frame exactly once.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import CausalConfig, SamplingConfig, to_dict
from .drift import ChunkDrift, ColourTracker
from .model import CausalWanModel
from .pipeline import (
    ChunkEvent,
    PromptTimeline,
    RenderRequest,
    RenderState,
    ResumePoint,
    check_length,
    render,
)
from .pipeline import num_chunks as count_chunks
from .vae_stream import Tiling, VAEStreamState
from .video_io import CODECS, VideoWriter, concat_copy

SIDECAR_SUFFIX = ".resume"
HISTORY_SUFFIX = ".resume.latents"
SIDECAR_META = "causvid_resume"
SIDECAR_VERSION = 1
DECODER_STATE_LIMIT = 64 << 20  # bytes of decoder caches stored in the sidecar; above: re-warm


class DiskFullError(RuntimeError):
    """The disk filled up mid-render: the partial file and the sidecar are kept for ``--resume``."""


@dataclass
class RenderJob:
    """One render to a file: the model, its VAE, what to render, where, and the settings to record."""

    model: CausalWanModel
    vae: Any  # causvid_core.vae.WanVAE
    timeline: PromptTimeline
    request: RenderRequest
    out: Path
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    settings: dict[str, Any] = field(default_factory=dict)  # JSON: how to rebuild this job (CLI resume)
    context_latents: Tensor | None = None
    tiling: Tiling | None = None
    crf: int = 18
    codec: str = "h264"  # video_io.CODECS
    colour_anchor: float = 0.0  # 0..1: hold each chunk's colours to the start's (drift.ColourTracker)


def sidecar_path(out: str | Path) -> Path:
    """``FILE.mp4`` -> ``FILE.mp4.resume``."""
    return Path(f"{out}{SIDECAR_SUFFIX}")


def resolve_resume(path: str | Path) -> tuple[Path, Path]:
    """(mp4, sidecar) from either path, with an error that says what was looked for."""
    path = Path(path)
    out = Path(str(path)[: -len(SIDECAR_SUFFIX)]) if path.name.endswith(SIDECAR_SUFFIX) else path
    sidecar = sidecar_path(out)
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"nothing to resume: {sidecar} does not exist (it is deleted when a render completes; give the "
            "interrupted .mp4 or its .resume file)"
        )
    return out, sidecar


def checks_of(job: RenderJob) -> dict[str, Any]:
    """What must be equal for a resumed render to continue the interrupted one (JSON)."""
    digest = hashlib.sha256()
    for k in sorted(job.timeline.changes):
        digest.update(str(k).encode() + job.timeline.changes[k].detach().float().cpu().numpy().tobytes())
    r = job.request
    checks = {
        "width": r.width, "height": r.height, "frames": r.num_frames, "fps": r.fps, "seed": r.seed,
        "blend_chunks": r.blend_chunks, "recache_on_switch": r.recache_on_switch,
        "sampling": to_dict(job.sampling), "causal": to_dict(job.causal), "prompts": digest.hexdigest()[:16],
        "model": str(job.settings.get("model", "")),
        "colour_anchor": job.colour_anchor,
        "codec": job.codec,  # the parts of a resumed file are joined without re-encoding: one codec
        "context": None,  # the image seed / video continued: its own entry, named when it differs
    }  # fmt: skip
    if job.context_latents is not None:
        latents = job.context_latents.detach().float().cpu().numpy()
        checks["context"] = hashlib.sha256(latents.tobytes()).hexdigest()[:16]
    return json.loads(json.dumps(checks))  # tuples -> lists, as read back from the sidecar


# what a sidecar written before a check existed held for it (those renders had no such option)
_CHECK_DEFAULTS = {"colour_anchor": 0.0, "codec": "h264", "context": None}


def check_job(job: RenderJob) -> None:
    """Guards every render to a file runs before creating anything: channels, length, output folder."""
    cfg = job.model.config
    z_dim = getattr(job.vae, "z_dim", cfg.in_dim)
    if z_dim != cfg.in_dim or z_dim != cfg.out_dim:
        raise ValueError(
            f"the VAE makes {z_dim}-channel latents but the model works on {cfg.in_dim}: use the VAE the "
            "model was trained with (Wan2.1_VAE for Wan2.1 checkpoints, embedded:NAME for embedded:NAME)"
        )
    check_length(job.request, job.causal, 0 if job.context_latents is None else job.context_latents.shape[2])
    if job.codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {job.codec!r}")
    if not 0.0 <= job.colour_anchor <= 1.0:
        raise ValueError(f"the colour anchor strength must be between 0 (off) and 1 (matched), got {job.colour_anchor}")
    ctx = job.context_latents
    h, w = job.request.latent_size
    if ctx is not None and (ctx.ndim != 5 or ctx.shape[1] != cfg.in_dim or tuple(ctx.shape[3:]) != (h, w)):
        raise ValueError(
            f"the image seed / context latents are {list(ctx.shape)}, but a {job.request.width}x"
            f"{job.request.height} video needs [1, {cfg.in_dim}, F, {h}, {w}]: encode the image or video at the "
            "render's size"
        )
    if job.out.suffix.lower() != ".mp4":
        raise ValueError(f"the output {job.out} must end in .mp4")
    if job.out.parent.exists() and not job.out.parent.is_dir():
        raise ValueError(f"cannot write {job.out}: {job.out.parent} is a file, not a folder")


# -- the sidecar -----------------------------------------------------------------------------------
@dataclass
class Sidecar:
    """What ``FILE.mp4.resume`` holds (see the module docstring)."""

    settings: dict[str, Any]
    checks: dict[str, Any]
    total_chunks: int
    chunks_done: int = 0
    frames_written: int = 0
    window: list[tuple[int, Tensor]] = field(default_factory=list)
    history_sizes: list[int] = field(default_factory=list)  # latent frames of each chunk in the history
    history_shape: list[int] = field(default_factory=list)  # [B, C, h, w] of every history record
    segments: list[list[Any]] = field(default_factory=list)  # [file name, committed frames]
    decoder: VAEStreamState | None = None
    pending: Tensor | None = None  # uint8 [H, W, 3]: the last frame written, maybe not yet on disk
    colour_reference: list[list[float]] | None = None  # drift.ColourTracker's reference [2][3]
    colour_drift: list[list[float]] = field(default_factory=list)  # [chunk, shift, contrast] of chunks done


def _state_parts(state: VAEStreamState, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    meta = {"frames_in": state.frames_in, "frames_out": state.frames_out, "started": sorted(state.started),
            "spatial_size": state.spatial_size, "caches": list(state.caches), "tiles": {}}  # fmt: skip
    tensors = {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.caches.items()}
    for (i, j), sub in state.tiles.items():
        meta["tiles"][f"{i},{j}"], sub_tensors = _state_parts(sub, f"{prefix}{i},{j}/")
        tensors.update(sub_tensors)
    return meta, tensors


def _state_from(meta: dict[str, Any], f: Any, prefix: str, device: torch.device) -> VAEStreamState:
    state = VAEStreamState("decode", frames_in=meta["frames_in"], frames_out=meta["frames_out"])
    state.started = set(meta["started"])
    state.spatial_size = tuple(meta["spatial_size"]) if meta["spatial_size"] else None
    state.caches = {k: f.get_tensor(f"{prefix}{k}").to(device) for k in meta["caches"]}
    for key, sub in meta["tiles"].items():
        i, j = (int(x) for x in key.split(","))
        state.tiles[(i, j)] = _state_from(sub, f, f"{prefix}{key}/", device)
    return state


def save_sidecar(path: Path, sc: Sidecar) -> None:
    """Write the sidecar atomically (a crash leaves the previous one or the new one, never half of one)."""
    tensors = {f"window.{i}": lat.contiguous() for i, (_, lat) in enumerate(sc.window)}
    if sc.pending is not None:
        tensors["pending"] = sc.pending.contiguous()
    decoder = None
    if sc.decoder is not None:
        decoder, parts = _state_parts(sc.decoder, "decoder/")
        tensors.update(parts)
    meta = {
        "version": SIDECAR_VERSION, "settings": sc.settings, "checks": sc.checks, "total_chunks": sc.total_chunks,
        "chunks_done": sc.chunks_done, "frames_written": sc.frames_written,
        "window": [[s, lat.shape[2]] for s, lat in sc.window], "history_sizes": sc.history_sizes,
        "history_shape": sc.history_shape, "segments": sc.segments, "decoder": decoder,
        "colour_reference": sc.colour_reference, "colour_drift": sc.colour_drift,
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={SIDECAR_META: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_sidecar(path: str | Path, device: torch.device | str = "cpu") -> Sidecar:
    """Read a sidecar written by ``save_sidecar``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[SIDECAR_META])
            window = [(s, f.get_tensor(f"window.{i}")) for i, (s, _) in enumerate(meta["window"])]
            pending = f.get_tensor("pending") if "pending" in f.keys() else None
            decoder = None if meta["decoder"] is None else _state_from(meta["decoder"], f, "decoder/",
                                                                         torch.device(device))  # fmt: skip
    except (OSError, KeyError, ValueError, json.JSONDecodeError, SafetensorError) as err:
        raise ValueError(f"{path} is not a resume file of this package, or it is damaged ({err})") from err
    if meta.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{path} was written by another version (format {meta.get('version')})")
    keys = ("settings", "checks", "total_chunks", "chunks_done", "frames_written", "history_sizes",
            "history_shape", "segments")  # fmt: skip
    return Sidecar(**{k: meta[k] for k in keys}, window=window, decoder=decoder, pending=pending,
                   colour_reference=meta.get("colour_reference"), colour_drift=meta.get("colour_drift") or [])  # fmt: skip


def _mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every check that differs, in either direction (a key one side lacks counts as its default)."""
    keys = list(now) + [k for k in saved if k not in now]
    was = {k: saved.get(k, _CHECK_DEFAULTS.get(k)) for k in keys}
    is_ = {k: now.get(k, _CHECK_DEFAULTS.get(k)) for k in keys}
    return [f"{k} {was[k]!r} -> {is_[k]!r}" for k in keys if was[k] != is_[k]]


# -- the latent history ----------------------------------------------------------------------------
def _record_bytes(shape: list[int], frames: int) -> int:
    b, c, h, w = shape
    return b * c * frames * h * w * 4


def _read_history(path: Path, sc: Sidecar) -> Iterator[Tensor] | None:
    """Chunk latents of the history, or None when the file is missing or shorter than the sidecar says."""
    need = sum(_record_bytes(sc.history_shape, n) for n in sc.history_sizes)
    if not path.is_file() or path.stat().st_size < need:
        return None
    if path.stat().st_size > need:  # written after the sidecar's last update: not committed
        os.truncate(path, need)

    def records() -> Iterator[Tensor]:
        b, c, h, w = sc.history_shape
        with path.open("rb") as f:
            for n in sc.history_sizes:
                data = bytearray(f.read(_record_bytes(sc.history_shape, n)))
                yield torch.frombuffer(data, dtype=torch.float32).view(b, c, n, h, w)

    return records()


# -- rendering -------------------------------------------------------------------------------------
def _contiguous_tail(window: list[tuple[int, Tensor]]) -> list[Tensor]:
    """The newest cached chunks that follow each other in time (the sink may stand apart)."""
    tail = [window[-1]] if window else []
    for item in reversed(window[:-1]):
        if item[0] + item[1].shape[2] != tail[0][0]:
            break
        tail.insert(0, item)
    return [lat for _, lat in tail]


class _TrackingWriter:
    """A ``VideoWriter`` that remembers the last frame it was given."""

    def __init__(self, writer: VideoWriter) -> None:
        self.writer, self.last = writer, None

    def write(self, frames: Tensor) -> None:
        self.writer.write(frames)
        self.last = torch.as_tensor(frames)[-1].clone()


class _FileRender:
    """One run of ``render_to_file``: writer, history and sidecar kept in step chunk by chunk."""

    def __init__(self, job: RenderJob, sc: Sidecar, resumed: bool, decoder_state_limit: int) -> None:
        self.job, self.sc, self.limit = job, sc, decoder_state_limit
        self.sidecar, self.history = sidecar_path(job.out), Path(f"{job.out}{HISTORY_SUFFIX}")
        self.decoder = job.vae.stream_decoder(job.tiling)
        self.resume = None
        if resumed:
            self.resume = ResumePoint(sc.chunks_done, _read_history(self.history, sc), sc.window)
            self._restore_decoder()
            if self.resume.history is None:  # rebuilt from the window: start a fresh history from here
                self.history.unlink(missing_ok=True)
                sc.history_sizes = []
        segment = job.out if not sc.segments else Path(f"{job.out}.part{len(sc.segments)}.mp4")
        sc.segments.append([segment.name, 0])
        self.segment = segment
        ref = None if sc.colour_reference is None else torch.tensor(sc.colour_reference)
        self.colours = ColourTracker.for_timeline(job.timeline.changes, job.request.blend_chunks,
                                                  job.colour_anchor, reference=ref)  # fmt: skip
        self.colours.history = [ChunkDrift(int(i), s, c) for i, s, c in sc.colour_drift]  # before a resume

    def _restore_decoder(self) -> None:
        if self.sc.decoder is not None:
            self.decoder.state = self.sc.decoder
            return
        with torch.no_grad():  # re-warm the causal caches on the newest contiguous cached latents
            for lat in _contiguous_tail(self.sc.window):
                self.decoder.decode(lat.to(next(self.job.model.parameters()).device))

    def on_chunk(self, event: ChunkEvent, state: RenderState) -> None:
        """Commit a finished chunk: its latents to the history, then the sidecar."""
        lat = event.latents.detach().to("cpu", torch.float32).contiguous()
        with self.history.open("ab") as f:
            f.write(lat.numpy().tobytes())
        sc = self.sc
        sc.history_sizes.append(lat.shape[2])
        sc.history_shape = [lat.shape[0], lat.shape[1], lat.shape[3], lat.shape[4]]
        sc.chunks_done, sc.frames_written, sc.window = state.chunks_done, state.frames_written, event.window
        sc.segments[-1][1] = max(
            0, self.writer.writer.frames_written - 1
        )  # the last may still be in the muxer
        sc.pending = self.writer.last
        sc.colour_reference = None if self.colours.reference is None else self.colours.reference.tolist()
        sc.colour_drift = [[d.index, d.mean_shift, d.contrast] for d in self.colours.history]
        small = self.decoder.state.nbytes() <= self.limit
        sc.decoder = self.decoder.state if small else None
        save_sidecar(self.sidecar, sc)

    def run(self, on_chunk: Callable[[ChunkEvent], None] | None, on_step: Any) -> RenderState:
        job, sc = self.job, self.sc
        state = RenderState(sc.chunks_done, sc.frames_written, colours=self.colours)

        def commit(event: ChunkEvent) -> None:
            self.on_chunk(event, state)
            if on_chunk is not None:
                on_chunk(event)

        with VideoWriter(self.segment, fps=job.request.fps, crf=job.crf, low_latency=True, codec=job.codec) as video:
            self.writer = _TrackingWriter(video)
            if sc.pending is not None:  # the frame the interrupted segment may not hold
                self.writer.write(sc.pending[None])
            save_sidecar(self.sidecar, sc)  # the new segment is known before it holds any frame
            if sc.chunks_done < sc.total_chunks:
                render(
                    job.model, job.timeline, job.request, decoder=self.decoder, writer=self.writer,
                    on_chunk=commit, sampling=job.sampling, causal=job.causal, context_latents=job.context_latents,
                    keep_latents=False, state=state, on_step=on_step, resume=self.resume, frame_filter=self.colours,
                )  # fmt: skip
        sc.segments[-1][1] = video.frames_written  # closed: every frame is in the file
        self.finish()
        return state

    def finish(self) -> None:
        """Join the segments into the output (when resumed) and delete the resume files."""
        out = self.job.out
        parts = [(out.with_name(name), n) for name, n in self.sc.segments if n > 0]
        if len(self.sc.segments) > 1:
            tmp = out.with_name(out.name + ".joining.mp4")
            try:
                concat_copy(parts, tmp, self.job.request.fps)
            except BaseException:
                tmp.unlink(missing_ok=True)  # the parts and the sidecar stay: nothing finished is lost
                raise
            os.replace(tmp, out)
            for name, _ in self.sc.segments[1:]:
                out.with_name(name).unlink(missing_ok=True)
        self.history.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def interrupted_message(out: Path) -> str | None:
    """What to say when a new render would overwrite ``out`` while it is an interrupted one; else None."""
    if not sidecar_path(out).exists():
        return None
    return (f"{out} is an interrupted render: continue it with `python -m causvid_core render --resume {out}` "
            "(or the node's resume input); overwriting it starts again and drops its finished frames")  # fmt: skip


def render_to_file(
    job: RenderJob,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_chunk: Callable[[ChunkEvent], None] | None = None,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    decoder_state_limit: int = DECODER_STATE_LIMIT,
) -> RenderState:
    """Render ``job`` to ``job.out`` chunk by chunk with a sidecar, or continue it with ``resume=True``.

    Bad input fails before any file is created. An interrupt (an exception from ``on_chunk`` or
    ``on_step``), a crash, a full disk (``DiskFullError``) or a NaN chunk keeps a playable file with
    every finished chunk and the sidecar; ``resume=True`` then finishes the same video.
    """
    check_job(job)
    context_frames = 0 if job.context_latents is None else job.context_latents.shape[2]
    checks = checks_of(job)
    if resume:
        sc = load_sidecar(resolve_resume(job.out)[1], next(job.model.parameters()).device)
        wrong = _mismatches(sc.checks, checks)
        if wrong:
            raise ValueError(
                f"{job.out.name} was started with other settings ({'; '.join(wrong)}): resume with the same "
                "settings, or start a new render"
            )
        gone = [name for name, n in sc.segments if n > 0 and not job.out.with_name(name).is_file()]
        if gone:  # found now, not after rendering every remaining chunk
            raise ValueError(
                f"{job.out.name} is an interrupted render, but its finished part {gone[0]} is not in "
                f"{job.out.parent} any more: put it back there (beside the .resume file) to continue"
            )
    else:
        if job.out.exists() and not overwrite:
            raise ValueError(interrupted_message(job.out) or f"{job.out} already exists: choose another name, or "
                             "overwrite it explicitly")  # fmt: skip
        for stale in (sidecar_path(job.out), Path(f"{job.out}{HISTORY_SUFFIX}")):
            stale.unlink(missing_ok=True)
        total = count_chunks(job.request, job.causal, context_frames)
        sc = Sidecar(job.settings, checks, total)
        job.out.parent.mkdir(parents=True, exist_ok=True)
    run = _FileRender(job, sc, resume, decoder_state_limit)
    try:
        return run.run(on_chunk, on_step)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskFullError(
            f"the disk holding {job.out} is full: stopped after {sc.chunks_done} of {sc.total_chunks} chunks "
            f"({sc.frames_written} frames kept in the file); free some space, then resume with "
            f"`python -m causvid_core render --resume {job.out}` (or the node's resume input)"
        ) from err


def settings_dict(**values: Any) -> dict[str, Any]:
    """JSON-safe settings (dataclass configs become dicts)."""
    return {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
