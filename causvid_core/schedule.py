"""Prompt schedules: prompts on a timeline, keyed by chunk, second or frame, applied at chunk boundaries.

Text format, one change per line (blank lines and ``#`` comments are ignored)::

    0: a red circle moving right
    0:10 a blue square moving left      # timestamps (m:ss or h:mm:ss) are seconds
    12.5 - a green triangle moving up

Prompts change only at chunk boundaries, so a time or frame is rounded to the nearest chunk start:
at 16 fps with chunks of 3 latent frames one chunk is 12 pixel frames (0.75 s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Unit = Literal["chunk", "second", "frame"]
UNITS: tuple[str, ...] = ("chunk", "second", "frame")

_LINE = re.compile(r"^(?P<key>\d+(?::\d{1,2}){0,2}(?:\.\d+)?)\s*(?:[:=|-]\s*|\s+)(?P<prompt>\S.*)$")


@dataclass(frozen=True)
class ScheduleEntry:
    """One prompt change: ``at`` in the schedule's unit, the prompt, and its line number (1-based)."""

    at: float
    prompt: str
    line: int


class ScheduleError(ValueError):
    """A schedule line that cannot be read; the message names the line."""


def _key_value(key: str, unit: Unit, lineno: int, line: str) -> float:
    if ":" not in key:
        value = float(key)
        if unit != "second" and not value.is_integer():
            raise ScheduleError(f"line {lineno}: '{line}': a {unit} index must be a whole number")
        return value
    if unit != "second":
        raise ScheduleError(
            f"line {lineno}: '{line}': timestamps like {key} need the schedule unit 'second' (unit is '{unit}')"
        )
    total = 0.0
    for part in key.split(":"):
        total = total * 60 + float(part)
    return total


def parse_schedule(text: str, unit: Unit = "chunk") -> list[ScheduleEntry]:
    """Parse schedule text into entries sorted by time; errors name the offending line."""
    if unit not in UNITS:
        raise ScheduleError(f"unknown schedule unit {unit!r}; use one of {', '.join(UNITS)}")
    entries: list[ScheduleEntry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ScheduleError(
                f"line {lineno}: '{line}' is not 'TIME: prompt' (for example '0: a red circle moving right' "
                "or '0:10 a blue square moving left')"
            )
        at = _key_value(m.group("key"), unit, lineno, line)
        if entries and at <= entries[-1].at:
            raise ScheduleError(
                f"line {lineno}: '{line}': times must increase, but {m.group('key')} does not come after "
                f"line {entries[-1].line}"
            )
        entries.append(ScheduleEntry(at, m.group("prompt").strip(), lineno))
    if not entries:
        raise ScheduleError(
            "the schedule is empty: write at least one line like '0: a red circle moving right'"
        )
    if entries[0].at != 0:
        raise ScheduleError(
            f"line {entries[0].line}: the first prompt must start at 0 so the video has a prompt"
        )
    return entries


def chunk_starts(num_chunks: int, chunk_frames: int, first_chunk_frames: int | None = None) -> list[int]:
    """Latent-frame index at which each chunk starts."""
    starts, frame = [], 0
    for i in range(num_chunks):
        starts.append(frame)
        frame += first_chunk_frames if (i == 0 and first_chunk_frames) else chunk_frames
    return starts


def latent_frame_of_pixel(pixel_frame: float, temporal_stride: int = 4) -> float:
    """Latent frame holding a pixel frame: 0 -> 0, 1..4 -> 1, 5..8 -> 2 (causal VAE, first frame alone)."""
    return 0.0 if pixel_frame <= 0 else math.ceil(pixel_frame / temporal_stride)


def entry_chunk(
    entry: ScheduleEntry,
    unit: Unit,
    *,
    fps: float,
    chunk_frames: int,
    first_chunk_frames: int | None = None,
    temporal_stride: int = 4,
) -> int:
    """The chunk at which an entry takes effect: the chunk whose start is nearest to its time."""
    if unit == "chunk":
        return int(entry.at)
    pixel = entry.at * fps if unit == "second" else entry.at
    latent = latent_frame_of_pixel(pixel, temporal_stride)
    first = first_chunk_frames or chunk_frames
    if latent <= first / 2:
        return 0
    return 1 + max(0, math.floor((latent - first) / chunk_frames + 0.5))  # ties go to the later chunk


def schedule_by_chunk(
    entries: list[ScheduleEntry],
    unit: Unit,
    *,
    fps: float = 16,
    chunk_frames: int = 3,
    first_chunk_frames: int | None = None,
    temporal_stride: int = 4,
) -> dict[int, str]:
    """Map chunk index -> prompt that starts there; entries rounding to the same chunk keep the last."""
    out: dict[int, str] = {}
    for e in entries:
        k = entry_chunk(
            e, unit, fps=fps, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames,
            temporal_stride=temporal_stride,
        )  # fmt: skip
        out[k] = e.prompt
    return dict(sorted(out.items()))
