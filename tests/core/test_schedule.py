"""Prompt schedules: the accepted line formats, errors that name the line, times rounded to chunks."""

from __future__ import annotations

import pytest

from causvid_core.schedule import (
    ScheduleError,
    chunk_starts,
    entry_chunk,
    parse_schedule,
    schedule_by_chunk,
)


def test_line_formats_and_comments() -> None:
    text = """
    # opening
    0: a red circle moving right
    4 - a blue square moving left   # a change
    9 a green triangle moving up
    """
    entries = parse_schedule(text, "chunk")
    assert [(e.at, e.prompt, e.line) for e in entries] == [
        (0, "a red circle moving right", 3),
        (4, "a blue square moving left", 4),
        (9, "a green triangle moving up", 5),
    ]


def test_timestamps_are_seconds() -> None:
    entries = parse_schedule(
        "0:00 a red circle moving right\n0:10: a blue square moving left\n1:02.5 x", "second"
    )
    assert [e.at for e in entries] == [0, 10, 62.5]
    with pytest.raises(ScheduleError, match=r"line 2: .*need the schedule unit 'second'"):
        parse_schedule("0: a\n0:10 b", "chunk")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0: a\nred circle", r"line 2: 'red circle' is not 'TIME: prompt'"),
        ("0: a\n5: b\n3: c", r"line 3: .*times must increase"),
        ("2: a", r"line 1: the first prompt must start at 0"),
        ("# nothing", "the schedule is empty"),
        ("0: a\n1.5: b", r"line 2: .*whole number"),
    ],
)
def test_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(text, "chunk")


def test_seconds_round_to_the_nearest_chunk_start() -> None:
    """At 16 fps, chunks of 3 latent frames (12 pixel frames, 0.75 s): a change lands within half a chunk
    plus one frame (0.4375 s; a time is first rounded to a latent frame, whose first pixel frame is 4L - 3)."""
    fps, k = 16, 3
    starts = chunk_starts(200, k)
    for tenth in range(0, 600, 7):
        seconds = tenth / 10
        entry = parse_schedule(f"0: a\n{seconds}: b", "second")[1] if seconds else None
        if entry is None:
            continue
        c = entry_chunk(entry, "second", fps=fps, chunk_frames=k)
        start_s = max(0, 4 * starts[c] - 3) / fps  # first pixel frame of the chunk
        assert abs(start_s - seconds) <= 0.75 / 2 + 1 / fps + 1e-9, (seconds, c, start_s)


def test_frames_and_image_first_chunk() -> None:
    entries = parse_schedule("0: a\n48: b\n96: c", "frame")
    # [1, 3, 3, ...]: pixel frame 48 is latent 12, chunk 1 + (12 - 1) / 3 -> nearest start 13 = chunk 5
    assert schedule_by_chunk(entries, "frame", chunk_frames=3, first_chunk_frames=1) == {
        0: "a",
        5: "b",
        9: "c",
    }
    assert chunk_starts(4, 3, 1) == [0, 1, 4, 7]
