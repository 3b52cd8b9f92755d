"""Streaming video files: what is written reads back, interrupts keep frames, chunked reading, conversions."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.video_io import (
    VideoWriter,
    image_to_uint8,
    image_to_vae,
    probe_video,
    psnr,
    read_video,
    read_video_chunks,
    uint8_to_image,
    uint8_to_vae,
    vae_to_image,
    vae_to_uint8,
)

REPO = Path(__file__).resolve().parents[2]


def smooth_pattern(frames: int, h: int, w: int) -> np.ndarray:
    """Slowly moving gradients: easy for H.264, so the round trip should be near lossless."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for t in range(frames):
        r = 128 + 80 * np.sin(x / 13 + t / 6)
        g = 128 + 80 * np.cos(y / 17 - t / 8)
        b = 100 + 60 * np.sin((x + y) / 23 + t / 10)
        out.append(np.stack([r, g, b], -1))
    return np.stack(out).round().astype(np.uint8)


def write(path: Path, frames: np.ndarray, chunk: int = 7, **kwargs) -> None:
    with VideoWriter(path, **kwargs) as writer:
        for i in range(0, len(frames), chunk):
            writer.write(frames[i : i + chunk])


@pytest.mark.parametrize("fragmented", [True, False], ids=["fragmented", "plain"])
def test_round_trip_keeps_count_size_fps_and_pixels(tmp_path: Path, fragmented: bool) -> None:
    video = smooth_pattern(30, 48, 64)
    write(tmp_path / "a.mp4", video, fps=12, crf=18, fragmented=fragmented)
    info = probe_video(tmp_path / "a.mp4")
    assert (info.frames, info.height, info.width, info.fps) == (30, 48, 64, 12.0)
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == video.shape
    assert psnr(back, video) > 35


def test_h265_writes_hevc_that_apple_players_accept_and_joins_without_reencoding(tmp_path: Path) -> None:
    """codec="h265": an HEVC stream tagged hvc1 (QuickTime refuses hev1), read back as written; two
    low-latency parts join by stream copy (resumed renders)."""
    import av

    from causvid_core.video_io import concat_copy

    video = smooth_pattern(40, 64, 96)
    write(tmp_path / "a.mp4", video, fps=16, crf=23, codec="h265")
    with av.open(str(tmp_path / "a.mp4")) as f:
        stream = f.streams.video[0]
        assert stream.codec_context.name == "hevc" and stream.codec_tag == "hvc1"
    assert psnr(read_video(tmp_path / "a.mp4"), video) > 35
    write(tmp_path / "p1.mp4", video[:20], fps=16, codec="h265", low_latency=True)
    write(tmp_path / "p2.mp4", video[20:], fps=16, codec="h265", low_latency=True)
    assert concat_copy([(tmp_path / "p1.mp4", 20), (tmp_path / "p2.mp4", 20)], tmp_path / "j.mp4", 16) == 40
    assert psnr(read_video(tmp_path / "j.mp4"), video) > 35
    with av.open(str(tmp_path / "j.mp4")) as f:  # the joined file keeps the tag
        assert f.streams.video[0].codec_tag == "hvc1"


def test_writer_takes_torch_uint8_and_image_floats(tmp_path: Path) -> None:
    video = smooth_pattern(6, 32, 32)
    with VideoWriter(tmp_path / "t.mp4", crf=10) as writer:
        writer.write(torch.from_numpy(video[:3]))  # uint8 tensor, as the render pipeline hands it
        writer.write(uint8_to_image(video[3:]))  # ComfyUI IMAGE floats
    assert psnr(read_video(tmp_path / "t.mp4"), video) > 35


@pytest.mark.parametrize(("mode", "size"), [("pad", (48, 64)), ("crop", (46, 62))])
def test_odd_sizes_are_padded_or_cropped(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    video = smooth_pattern(5, 47, 63)
    write(tmp_path / "odd.mp4", video, odd_size=mode, crf=10)
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (5, *size, 3)
    common = (slice(None), slice(0, 46), slice(0, 62))
    assert psnr(back[common], video[common]) > 35


def test_exception_mid_stream_leaves_every_frame_written(tmp_path: Path) -> None:
    video = smooth_pattern(40, 32, 48)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "cut.mp4") as writer:
            writer.write(video[:12])
            writer.write(video[12:23])
            raise KeyboardInterrupt  # the host's interrupt while the next chunk is being made
    back = read_video(tmp_path / "cut.mp4")
    assert back.shape == (23, 32, 48, 3)
    assert psnr(back, video[:23]) > 35


def test_sigkill_leaves_a_readable_file(tmp_path: Path) -> None:
    """Fragmented MP4: a writer killed outright still leaves the fragments it finished."""
    child = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from causvid_core.video_io import VideoWriter
        writer = VideoWriter(sys.argv[1], fps=16)  # a keyframe, and so a fragment, every 16 frames
        for t in range(int(sys.argv[2])):
            writer.write(np.full((32, 48, 3), (t * 5) % 256, np.uint8))
        print("written", flush=True)
        time.sleep(120)
        """
    )
    path, frames = tmp_path / "killed.mp4", 120
    proc = subprocess.Popen([sys.executable, "-c", child, str(path), str(frames)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    back = read_video(path)
    assert 16 <= len(back) <= frames  # whole fragments; the last ones were still in the encoder
    expected = np.array([(t * 5) % 256 for t in range(len(back))])
    assert np.abs(back.mean(axis=(1, 2, 3)) - expected).max() < 3  # frames in order, none lost in between


def test_chunked_reading_equals_reading_everything(tmp_path: Path) -> None:
    write(tmp_path / "v.mp4", smooth_pattern(21, 32, 32))
    whole = read_video(tmp_path / "v.mp4")
    chunks = list(read_video_chunks(tmp_path / "v.mp4", 8, first_chunk_frames=5))
    assert [len(c) for c in chunks] == [5, 8, 8]
    assert np.array_equal(np.concatenate(chunks), whole)


@pytest.mark.parametrize(("fps", "expected"), [(8, 16), (24, 48), (16, 32)])
def test_fps_resampling_gives_the_expected_count(tmp_path: Path, fps: int, expected: int) -> None:
    video = np.stack([np.full((16, 16, 3), 7 * t, np.uint8) for t in range(32)])  # 2 s at 16 fps
    write(tmp_path / "r.mp4", video, fps=16, crf=0)
    back = read_video(tmp_path / "r.mp4", fps=fps)
    assert len(back) == expected
    # output frame k shows the source frame on screen at k / fps
    src = [min(31, int(k * 16 / fps + 1e-9)) for k in range(expected)]
    assert np.abs(back.mean(axis=(1, 2, 3)) - 7 * np.array(src)).max() < 2


def test_resize_on_read(tmp_path: Path) -> None:
    write(tmp_path / "s.mp4", smooth_pattern(4, 48, 64))
    small = read_video(tmp_path / "s.mp4", size=(32, 24))
    assert small.shape == (4, 24, 32, 3)
    assert abs(float(small.mean()) - float(read_video(tmp_path / "s.mp4").mean())) < 3


def test_unreadable_files_have_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 20)
    with pytest.raises(ValueError, match=r"cannot read junk.mp4 as a video .*complete video file"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(FileNotFoundError, match="video file not found"):
        list(read_video_chunks(tmp_path / "absent.mp4", 4))


def test_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crf must be in 0..51"):
        VideoWriter(tmp_path / "x.mp4", crf=70)
    with pytest.raises(ValueError, match="codec must be one of h264, h265, got 'vp8'"):
        VideoWriter(tmp_path / "x.mp4", codec="vp8")
    with VideoWriter(tmp_path / "x.mp4") as writer:
        with pytest.raises(
            ValueError, match=r"expected frames \[T, H, W, 3\] \(RGB\), got shape \[2, 3, 16, 16\]"
        ):
            writer.write(np.zeros((2, 3, 16, 16), np.uint8))
        writer.write(np.zeros((2, 16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="frame size changed from 16x16 to 16x32"):
            writer.write(np.zeros((1, 16, 32, 3), np.uint8))
        with pytest.raises(ValueError, match=r"IMAGE values must lie in 0..1, got 0.*2"):
            writer.write(torch.rand(1, 16, 16, 3) * 2)


def test_conversions_round_trip() -> None:
    images = torch.rand(5, 8, 12, 3)
    vae_in = image_to_vae(images)
    assert vae_in.shape == (1, 3, 5, 8, 12) and vae_in.min() >= -1 and vae_in.max() <= 1
    torch.testing.assert_close(vae_to_image(vae_in), images)
    u8 = image_to_uint8(images)
    assert u8.dtype == torch.uint8 and (uint8_to_image(u8) - images).abs().max() <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(vae_to_uint8(uint8_to_vae(u8)), u8)
    assert vae_to_image(torch.full((1, 3, 2, 4, 4), 3.0)).max() == 1.0  # out-of-range decodes are clamped


def test_conversion_errors() -> None:
    with pytest.raises(ValueError, match=r"expected IMAGE frames \[F, H, W, 3\].*drop alpha"):
        image_to_vae(torch.rand(2, 8, 8, 4))
    with pytest.raises(ValueError, match=r"IMAGE values must lie in 0..1, got -1"):
        image_to_vae(torch.rand(2, 8, 8, 3) * 2 - 1)
    with pytest.raises(ValueError, match=r"expected VAE video \[B, 3, F, H, W\]"):
        vae_to_image(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"expected uint8 frames \[F, H, W, 3\], got torch.float32"):
        uint8_to_image(torch.rand(2, 8, 8, 3))
