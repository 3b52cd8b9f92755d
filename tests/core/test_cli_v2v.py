"""``python -m causvid_core v2v``: restyle a video file or a live source (a device, here FFmpeg's lavfi test
source) chunk by chunk into an mp4, with errors before any output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from causvid_core.cli import main
from causvid_core.video_io import VideoWriter, probe_video, psnr, read_video
from tests.helpers import vae_round_trip

PROMPT = "a red circle moving right"
pytestmark = pytest.mark.usefixtures("one_thread")


def v2v_args(source: str, out: Path, *extra: str) -> list[str]:
    return ["v2v", "--source", source, "--prompt", PROMPT, "--out", str(out), "--width", "32", "--height", "32",
            "--device", "cpu", "--quiet", *extra]  # fmt: skip


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 2-second 48x40 clip of moving noise blocks at 16 fps (cover-resized and cropped to 32x32 by v2v)."""
    rng = np.random.default_rng(3)
    base = (rng.random((5, 6, 3)) * 255).astype(np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # [40, 48, 3]
    frames = np.stack([np.roll(base, 2 * t, axis=1) for t in range(32)])
    path = tmp_path / "source.mp4"
    with VideoWriter(path, fps=16, crf=10) as writer:
        writer.write(frames)
    return path


def test_a_file_is_restyled_frame_for_frame_and_a_low_strength_keeps_it(env, source: Path, tmp_path: Path, capsys) -> None:
    from causvid_core.video_io import fit_frames

    out = tmp_path / "styled.mp4"
    assert main(v2v_args(str(source), out)) == 0
    printed = capsys.readouterr().out
    assert re.search(r"wrote .*styled.mp4: 32 frames \(2.0 s at 16 fps\)", printed)
    assert re.search(r"time to first frame: \d+\.\d\d s", printed)
    info = probe_video(out)
    assert (info.frames, info.width, info.height) == (32, 32, 32)
    kept = tmp_path / "kept.mp4"
    assert main(v2v_args(str(source), kept, "--strength", "0.01")) == 0
    # a low strength: each chunk barely re-noised: close to the source through the VAE and H.264 (the first
    # two chunks, 9 + 12 frames, are a causal VAE's round trip of the source's first 21 frames)
    expected = vae_round_trip(fit_frames(read_video(source)[:21], 32, 32))
    with VideoWriter(tmp_path / "expected.mp4", fps=16, crf=18) as writer:
        writer.write(expected)
    coded = read_video(tmp_path / "expected.mp4")
    assert psnr(read_video(kept)[:21], coded) > 28
    assert psnr(read_video(out)[:21], coded) < psnr(read_video(kept)[:21], coded) - 5  # the default 0.6 changes it


def test_a_live_source_is_read_through_its_input_format(env, tmp_path: Path, capsys) -> None:
    """A device is read with --source-format (v4l2 for a webcam); FFmpeg's lavfi test pattern stands in for one,
    at 30 fps read at the model's 16, for --seconds."""
    out = tmp_path / "live.mp4"
    args = [a for a in v2v_args("testsrc=size=320x240:rate=30", out, "--source-format", "lavfi", "--seconds", "2")
            if a != "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert probe_video(out).frames == 32
    assert re.search(r"3 chunks +\d+\.\d fps", capsys.readouterr().err)  # no end to count down to: no eta


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--source", "missing.mp4"], r"--source .*missing\.mp4 not found \(a device needs --source-format"),
        (["--source", "/dev/no-such-camera", "--source-format", "v4l2"], r"cannot open /dev/no-such-camera as v4l2"),
        (["--strength", "1.5"], r"--strength must be above 0 and at most 1, got 1.5"),
        (["--strength", "0"], r"--strength must be above 0 and at most 1, got 0.0"),
        (["--width", "40"], r"multiples of 16, got 40x32"),
        (["--frames", "0"], r"the length must be at least 1 frame, got 0"),
        (["--seconds", "0"], r"length must be positive, got 0.0 s"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_before_any_output(env, source: Path, tmp_path, capsys, change, message) -> None:
    out = tmp_path / "sub" / "out.mp4"
    args = v2v_args(str(source), out)
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "sub").exists()


def test_an_existing_output_needs_overwrite(env, source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    assert main(v2v_args(str(source), out)) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(v2v_args(str(source), out, "--overwrite")) == 0 and probe_video(out).frames == 32
    assert os.path.getsize(out) > 100
