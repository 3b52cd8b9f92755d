"""The render pipeline every front end calls: prompts on a timeline -> latent chunks -> frames -> file.

Each chunk is generated, decoded and written the moment it exists, so memory stays flat however
long the video is, the first frames can play while the rest is being made, and an interrupt
(an exception from ``on_chunk``, Ctrl-C) leaves a playable file holding every finished chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from .config import CausalConfig, SamplingConfig, chunk_layout
from .model import CausalWanModel
from .schedule import ScheduleEntry, Unit, parse_schedule, schedule_by_chunk
from .stream import StreamingGenerator


class StreamingDecoder(Protocol):
    """Decodes latent chunks in order, carrying causal state: [B, C, f, h, w] -> [B, 3, T, H, W] in -1..1."""

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class RenderRequest:
    """What to render; sizes in pixels, length in pixel frames."""

    width: int
    height: int
    num_frames: int
    seed: int = 0
    fps: int = 16
    blend_chunks: int = 0
    recache_on_switch: bool = True
    size_multiple: int = 16
    temporal_stride: int = 4
    spatial_stride: int = 8

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value <= 0 or value % self.size_multiple:
                lo = max(self.size_multiple, value - value % self.size_multiple)
                raise ValueError(
                    f"{name} {value} is not a multiple of {self.size_multiple}; use {lo} or {lo + self.size_multiple}"
                )
        if self.num_frames < 1:
            raise ValueError(f"length must be at least 1 frame, got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.spatial_stride, self.width // self.spatial_stride

    @property
    def latent_frames(self) -> int:
        """Latent frames covering num_frames pixel frames: 1 + ceil((T - 1) / 4)."""
        return 1 + math.ceil((self.num_frames - 1) / self.temporal_stride)


def seconds_to_frames(seconds: float, fps: int) -> int:
    """Pixel frames of a duration (at least one)."""
    if seconds <= 0:
        raise ValueError(f"length must be positive, got {seconds} s")
    return max(1, round(seconds * fps))


@dataclass
class PromptTimeline:
    """Conditioning per chunk: ``changes[k]`` takes effect at chunk k (k = 0 must exist)."""

    changes: dict[int, Tensor]

    def __post_init__(self) -> None:
        if 0 not in self.changes:
            raise ValueError("the prompt timeline needs a prompt at chunk 0")

    @classmethod
    def single(cls, conditioning: Tensor) -> PromptTimeline:
        return cls({0: conditioning})

    @classmethod
    def from_schedule(
        cls,
        entries: list[ScheduleEntry],
        conditioning: list[Tensor],
        unit: Unit,
        *,
        fps: float,
        causal: CausalConfig,
        context_frames: int = 0,
    ) -> PromptTimeline:
        """Place encoded schedule entries on generated chunks (times count from the video's start)."""
        by_entry = dict(zip([e.prompt for e in entries], conditioning, strict=True))
        first = context_frames or causal.first_chunk_frames
        chunks = schedule_by_chunk(
            entries, unit, fps=fps, chunk_frames=causal.chunk_frames, first_chunk_frames=first
        )
        if context_frames and unit != "chunk":  # times count the context as chunk 0 of the video
            chunks = {max(0, k - 1): p for k, p in chunks.items()}
        return cls({k: by_entry[p] for k, p in chunks.items()})


@dataclass
class EncodedSchedule:
    """Prompts on a timeline with their text features: what a prompt-schedule node hands a sampler."""

    entries: list[ScheduleEntry]
    conditioning: list[Tensor]  # [B, L, text_dim] per entry
    unit: Unit = "chunk"
    blend_chunks: int = 0

    def timeline(self, fps: float, causal: CausalConfig, context_frames: int = 0) -> PromptTimeline:
        return PromptTimeline.from_schedule(
            self.entries, self.conditioning, self.unit, fps=fps, causal=causal, context_frames=context_frames
        )


def encode_schedule(
    text: str, unit: Unit, encode: Callable[[str], Tensor], blend_chunks: int = 0
) -> EncodedSchedule:
    """Parse a schedule and encode each distinct prompt once."""
    entries = parse_schedule(text, unit)
    cache: dict[str, Tensor] = {}
    for e in entries:
        if e.prompt not in cache:
            try:
                cache[e.prompt] = encode(e.prompt)
            except ValueError as err:
                raise ValueError(f"line {e.line}: {err}") from err
    return EncodedSchedule(entries, [cache[e.prompt] for e in entries], unit, blend_chunks)


@dataclass
class ChunkEvent:
    """What ``on_chunk`` receives after each chunk: progress, the chunk's latents and decoded frames."""

    index: int
    total: int
    start_frame: int  # first latent frame of the chunk
    latents: Tensor  # [B, C, f, h, w]
    frames: Tensor | None  # [B, 3, T, H, W] in -1..1, when a decoder is given
    window: list[tuple[int, Tensor]] = field(default_factory=list)  # (start frame, latents) the cache holds


class NonFiniteLatentsError(ValueError):
    """A chunk came out with NaN or Inf: the render stopped before writing it."""


@dataclass
class ResumePoint:
    """Where a resumed render picks up: the chunks already done and how to rebuild the KV cache.

    ``history`` (the clean latents of every finished chunk, in order) replays each chunk's cache
    write exactly as the first run did: the continuation is byte-identical. Without it the cache
    is re-computed from ``window`` (sink + window chunks) alone, which equals the first run's cache
    only while no chunk has left the window (the keys of deeper layers depend on what each chunk
    attended to when it was written).
    """

    chunks_done: int
    history: Iterator[Tensor] | None = None
    window: list[tuple[int, Tensor]] = field(default_factory=list)


@dataclass
class RenderState:
    """What a render produced so far (also what survives an interrupt)."""

    chunks_done: int = 0
    frames_written: int = 0
    latents: list[Tensor] = field(default_factory=list)
    colours: Any = None  # drift.ColourTracker of a render to a file: each chunk's colour drift


def stream_chunks(
    model: CausalWanModel,
    timeline: PromptTimeline,
    request: RenderRequest,
    *,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
    context_latents: Tensor | None = None,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    resume: ResumePoint | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield (chunk index, first latent frame, latents) for the request, switching prompts on the timeline.

    With ``context_latents`` (an image latent for image-to-video, or a video to continue) those
    frames are written into the cache first and count toward the length. With ``resume`` the
    first ``resume.chunks_done`` chunks are not generated but restored (see ``ResumePoint``).
    """
    for index, start, latents, _ in _chunks(model, timeline, request, sampling, causal, context_latents,
                                            on_step, resume):  # fmt: skip
        yield index, start, latents


def _chunks(
    model: CausalWanModel,
    timeline: PromptTimeline,
    request: RenderRequest,
    sampling: SamplingConfig | None,
    causal: CausalConfig | None,
    context_latents: Tensor | None,
    on_step: Callable[[int, int, Tensor], None] | None,
    resume: ResumePoint | None,
) -> Iterator[tuple[int, int, Tensor, StreamingGenerator]]:
    causal = causal or CausalConfig()
    context_frames = 0 if context_latents is None else context_latents.shape[2]
    if context_frames and causal.first_chunk_frames is not None:
        causal = replace(causal, first_chunk_frames=None)  # the context is the first chunk
    remaining = frames_to_generate(request, context_frames)
    gen = StreamingGenerator(
        model, timeline.changes[0], latent_size=request.latent_size, seed=request.seed,
        batch=timeline.changes[0].shape[0], sampling=sampling or SamplingConfig(), causal=causal,
        recache_on_switch=request.recache_on_switch, callback=on_step,
    )  # fmt: skip
    if context_latents is not None:
        gen.prefill(context_latents)
    first = causal.first_chunk_frames if not context_frames else None
    done = 0 if resume is None else resume.chunks_done
    for index, frames in enumerate(chunk_layout(remaining, causal.chunk_frames, first)):
        if index > 0 and index in timeline.changes:
            gen.set_prompt(timeline.changes[index], blend_chunks=request.blend_chunks)
        start = gen.next_frame
        if index < done:
            _restore_chunk(gen, frames, resume, last=index == done - 1)
            continue
        yield index, start, gen.next_chunk(frames), gen


def _restore_chunk(gen: StreamingGenerator, frames: int, resume: ResumePoint, *, last: bool) -> None:
    """Advance the generator over a finished chunk: replay its cache write, or only its prompt state."""
    if resume.history is not None:
        latents = next(resume.history, None)
        if latents is None or latents.shape[2] != frames:
            raise ValueError(f"the resume history ends before chunk {gen.chunk_index}: it is incomplete")
        gen.replay_chunk(latents)
        return
    gen.skip_chunk(frames)
    if last:
        gen.restore_window(resume.window)


def frames_to_generate(request: RenderRequest, context_frames: int = 0) -> int:
    """Latent frames left to generate after the context, with an error when there are none."""
    remaining = request.latent_frames - context_frames
    if remaining < 1:
        raise ValueError(
            f"the length ({request.num_frames} frames) is covered by the {context_frames} context latent "
            "frames: ask for more frames"
        )
    return remaining


def num_chunks(request: RenderRequest, causal: CausalConfig, context_frames: int = 0) -> int:
    """How many chunks a request takes."""
    first = causal.first_chunk_frames if not context_frames else None
    return len(chunk_layout(frames_to_generate(request, context_frames), causal.chunk_frames, first))


def check_length(request: RenderRequest, causal: CausalConfig, context_frames: int = 0) -> None:
    """Refuse a length below one chunk, naming the shortest length that works."""
    frames_to_generate(request, context_frames)  # a length the context already covers has its own message
    first = causal.first_chunk_frames if not context_frames else None
    need = context_frames + (first or causal.chunk_frames)
    if request.latent_frames < need:
        frames = 1 + request.temporal_stride * (need - 1)
        raise ValueError(
            f"the length ({request.num_frames} frames) is below one chunk: a chunk is {need - context_frames} "
            f"latent frames, so ask for at least {frames} frames ({frames / request.fps:.2f} s at "
            f"{request.fps} fps)"
        )


def render(
    model: CausalWanModel,
    timeline: PromptTimeline,
    request: RenderRequest,
    *,
    decoder: StreamingDecoder | None = None,
    writer: Any = None,
    on_chunk: Callable[[ChunkEvent], None] | None = None,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
    context_latents: Tensor | None = None,
    keep_latents: bool = True,
    state: RenderState | None = None,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    resume: ResumePoint | None = None,
    frame_filter: Callable[[int, Tensor], Tensor] | None = None,
) -> RenderState:
    """Generate, decode and write chunk by chunk; returns what was produced.

    ``writer`` is anything with ``write(frames uint8 [T, H, W, 3])`` (see ``video_io``); frames past
    ``request.num_frames`` are cut. If ``on_chunk`` or ``on_step`` (chunk, step, x0) raises (the
    host's interrupt), everything finished before stays written and in ``state``; the exception
    propagates. A chunk with NaN/Inf latents stops the render before it is decoded or written
    (``NonFiniteLatentsError`` names it). With ``resume``, the chunks before ``resume.chunks_done``
    are restored, not generated or written again (``state`` should carry their counts). ``frame_filter``
    (chunk index, frames) -> frames sees each chunk's decoded frames (the context's as chunk -1) before they
    are written and passed on (``drift.ColourTracker``).
    """
    causal = causal or CausalConfig()
    state = state if state is not None else RenderState()
    context_frames = 0 if context_latents is None else context_latents.shape[2]
    check_length(request, causal, context_frames)
    total = num_chunks(request, causal, context_frames)
    if context_latents is not None and decoder is not None and resume is None:
        frames = decoder.decode(context_latents)
        _emit_frames(frame_filter(-1, frames) if frame_filter else frames, request, writer, state)
    chunks = _chunks(model, timeline, request, sampling, causal, context_latents, on_step, resume)
    for index, start, latents, gen in chunks:
        if not torch.isfinite(latents).all():
            raise NonFiniteLatentsError(
                f"chunk {index} came out with NaN/Inf latents: stopped before writing it; the "
                f"{index} chunks before it ({state.frames_written} frames) are kept. Check the model weights "
                "and precision (try float32 or bfloat16 instead of float16)"
            )
        frames = decoder.decode(latents) if decoder is not None else None
        if frames is not None:
            if frame_filter is not None:
                frames = frame_filter(index, frames)
            _emit_frames(frames, request, writer, state)
        if keep_latents:
            state.latents.append(latents.detach().cpu())
        state.chunks_done = index + 1
        if on_chunk is not None:
            on_chunk(ChunkEvent(index, total, start, latents, frames, gen.window_latents))
    return state


def to_uint8_frames(frames: Tensor) -> Tensor:
    """[B, 3, T, H, W] in -1..1 (first sample) -> uint8 [T, H, W, 3]."""
    x = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def _emit_frames(frames: Tensor, request: RenderRequest, writer: Any, state: RenderState) -> None:
    room = request.num_frames - state.frames_written
    if room <= 0:
        return
    frames = frames[:, :, :room]
    if writer is not None:
        writer.write(to_uint8_frames(frames))
    state.frames_written += frames.shape[2]


def _pad_to(frames: Tensor, length: int) -> Tensor:
    """Repeat the last frame of [T, H, W, 3] up to ``length`` frames."""
    if frames.shape[0] >= length:
        return frames
    return torch.cat([frames, frames[-1:].expand(length - frames.shape[0], *frames.shape[1:])], dim=0)


def restyle(
    model: CausalWanModel,
    vae: Any,
    chunks: Iterable[Tensor],
    timeline: PromptTimeline,
    *,
    strength: float,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
    recache_on_switch: bool = True,
    blend_chunks: int = 0,
    writer: Any = None,
    on_chunk: Callable[[ChunkEvent], None] | None = None,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    state: RenderState | None = None,
) -> RenderState:
    """Stream video-to-video: encode each source chunk (uint8 [t, H, W, 3]), denoise it from ``strength``
    under the prompts with the causal model, decode and write it.

    Source chunks should be 1 + 4(k - 1) frames first and 4k after (k = chunk_frames, as
    ``video_io.read_video_chunks`` yields them); a short last chunk is padded and cut again.
    """
    from .video_io import uint8_to_vae

    causal = causal or CausalConfig()
    state = state if state is not None else RenderState()
    encoder, decoder = vae.stream_encoder(), vae.stream_decoder()
    gen = None
    stride = 4
    for index, chunk in enumerate(chunks):
        t = chunk.shape[0]
        need = t if (index == 0 and (t - 1) % stride == 0) or (index > 0 and t % stride == 0) else None
        if need is None:
            need = 1 + stride * math.ceil((t - 1) / stride) if index == 0 else stride * math.ceil(t / stride)
        video = uint8_to_vae(_pad_to(torch.as_tensor(chunk), need)).to(next(model.parameters()).device)
        latents = encoder.encode(video)
        if gen is None:
            gen = StreamingGenerator(
                model, timeline.changes[0], latent_size=tuple(latents.shape[3:]), seed=seed,
                sampling=sampling or SamplingConfig(), causal=causal, recache_on_switch=recache_on_switch,
                callback=on_step,
            )  # fmt: skip
        elif index in timeline.changes:
            gen.set_prompt(timeline.changes[index], blend_chunks=blend_chunks)
        start = gen.next_frame
        out = gen.next_chunk(init=latents, strength=strength)
        frames = decoder.decode(out)[:, :, :t]
        if writer is not None:
            writer.write(to_uint8_frames(frames))
        state.frames_written += frames.shape[2]
        state.chunks_done = index + 1
        if on_chunk is not None:
            on_chunk(ChunkEvent(index, -1, start, out, frames))
    return state
