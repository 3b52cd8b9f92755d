"""Streaming video files (PyAV): a writer that takes frames as they come, a chunked reader, tensor conversions.

Layouts: ComfyUI IMAGE = float [F, H, W, 3] in 0..1; VAE input/output = [B, 3, F, H, W] in -1..1;
file frames = uint8 [F, H, W, 3].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from torch import Tensor

FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof"
LOW_LATENCY = FRAGMENTED + "+frag_every_frame"  # with x264's zerolatency: every frame is on disk once written


def _check_image(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (drop alpha with image[..., :3])" if images.ndim == 4 and images.shape[-1] == 4 else ""
        raise ValueError(f"expected IMAGE frames [F, H, W, 3], got shape {list(images.shape)}{hint}")
    lo, hi = images.aminmax()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"IMAGE values must lie in 0..1, got {lo.item():.3g}..{hi.item():.3g}")


def image_to_vae(images: Tensor) -> Tensor:
    """ComfyUI IMAGE [F, H, W, 3] in 0..1 -> VAE input [1, 3, F, H, W] in -1..1 (x * 2 - 1)."""
    _check_image(images)
    return (images.float() * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def vae_to_image(video: Tensor) -> Tensor:
    """VAE output [B, 3, F, H, W] in -1..1 -> IMAGE [B*F, H, W, 3] in 0..1 ((x + 1) / 2, clamped)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected VAE video [B, 3, F, H, W], got shape {list(video.shape)}")
    x = ((video.float() + 1) / 2).clamp(0, 1)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, *x.shape[3:], 3)


def image_to_uint8(images: Tensor) -> Tensor:
    """IMAGE [F, H, W, 3] in 0..1 -> uint8 [F, H, W, 3] (rounded)."""
    _check_image(images)
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def uint8_to_image(frames: Tensor | np.ndarray) -> Tensor:
    """uint8 [F, H, W, 3] -> IMAGE [F, H, W, 3] float in 0..1."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames.float() / 255


def vae_to_uint8(video: Tensor) -> Tensor:
    """VAE output [B, 3, F, H, W] in -1..1 -> uint8 [B*F, H, W, 3]."""
    return (vae_to_image(video) * 255).round().to(torch.uint8)


def uint8_to_vae(frames: Tensor | np.ndarray) -> Tensor:
    """uint8 [F, H, W, 3] -> VAE input [1, 3, F, H, W] in -1..1."""
    return image_to_vae(uint8_to_image(frames))


def _as_uint8_frames(frames: Tensor | np.ndarray) -> np.ndarray:
    """uint8 or 0..1 float frames, [T, H, W, 3] or [H, W, 3] -> a uint8 numpy array [T, H, W, 3]."""
    t = torch.as_tensor(frames).detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise ValueError(f"frames must be uint8 or float in 0..1, got {t.dtype}")
        t = image_to_uint8(t)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3] (RGB), got shape {list(t.shape)}")
    return t.numpy()


CODECS = {"h264": "libx264", "h265": "libx265"}  # --codec name -> FFmpeg encoder (both take crf and preset)


class VideoWriter:
    """H.264 (libx264) or H.265 (libx265, ``codec="h265"``), yuv420p MP4
    writer that takes frames as they come and never holds a whole video.

    yuv420p needs an even width and height: odd sizes are padded by repeating the last row/column
    (``odd_size="pad"``, the default) or cropped by one pixel (``"crop"``). Fragmented MP4 (the
    default) writes a playable fragment at every keyframe (one per second by default) and flushes it
    to disk, so even a killed process leaves a file holding the fragments written so far. Used as a
    context manager, the encoder is flushed and the file closed when the producer raises, so every
    frame written before is kept. ``low_latency`` (resumable renders) encodes with x264's zerolatency
    tune (no B-frames, no lookahead) and writes a fragment per frame: when ``write`` returns, every
    frame given so far is on disk, at a slightly larger file.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 16,
        crf: int = 18,
        *,
        preset: str = "medium",
        keyframe_interval: int | None = None,
        odd_size: Literal["pad", "crop"] = "pad",
        fragmented: bool = True,
        low_latency: bool = False,
        codec: str = "h264",
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality), got {crf}")
        if odd_size not in ("pad", "crop"):
            raise ValueError(f"odd_size must be 'pad' or 'crop', got {odd_size!r}")
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf, self.preset, self.odd_size, self.codec = crf, preset, odd_size, codec
        self.keyframe_interval = keyframe_interval or max(1, round(float(fps)))
        self.low_latency = low_latency
        flags = LOW_LATENCY if low_latency else FRAGMENTED
        options = {"movflags": flags, "flush_packets": "1"} if fragmented or low_latency else {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4", options=options)
        self._stream = None
        self.input_size: tuple[int, int] | None = None  # (H, W) of the frames given
        self.frames_written = 0

    @property
    def size(self) -> tuple[int, int] | None:
        """(H, W) stored in the file (even), once the first frame is known."""
        return None if self._stream is None else (self._stream.height, self._stream.width)

    def _open_stream(self, h: int, w: int) -> None:
        even = (h + h % 2, w + w % 2) if self.odd_size == "pad" else (h - h % 2, w - w % 2)
        if min(even) < 2:
            raise ValueError(f"frames of {h}x{w} are too small to encode")
        stream = self._container.add_stream(CODECS[self.codec], rate=self.fps)
        stream.height, stream.width = even
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = self.keyframe_interval
        options = {"crf": str(self.crf), "preset": self.preset}
        if self.low_latency:  # no B-frames or lookahead: a packet per frame, in order (concat_copy needs it)
            options["tune"] = "zerolatency"
        if self.codec == "h265":
            stream.codec_context.codec_tag = "hvc1"  # what Apple's players need to play HEVC in MP4
            options["x265-params"] = "log-level=error"
        stream.options = options
        self._stream, self.input_size = stream, (h, w)

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        eh, ew = self.size
        frame = frame[:eh, :ew]
        if frame.shape[0] < eh or frame.shape[1] < ew:
            frame = np.pad(frame, ((0, eh - frame.shape[0]), (0, ew - frame.shape[1]), (0, 0)), mode="edge")
        return np.ascontiguousarray(frame)

    def write(self, frames: Tensor | np.ndarray) -> None:
        """Encode frames: uint8 (or 0..1 float) [T, H, W, 3] or one [H, W, 3]."""
        if self._container is None:
            raise RuntimeError(f"the writer of {self.path} is closed")
        arr = _as_uint8_frames(frames)
        h, w = arr.shape[1:3]
        if self._stream is None:
            self._open_stream(h, w)
        elif (h, w) != self.input_size:
            raise ValueError(f"frame size changed from {self.input_size[0]}x{self.input_size[1]} to {h}x{w}")
        for frame in arr:
            vf = av.VideoFrame.from_ndarray(self._fit(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (safe to call twice)."""
        if self._container is None:
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a writer dropped without close() still finishes its file
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def concat_copy(parts: list[tuple[str | Path, int]], out: str | Path, fps: float) -> int:
    """Join the first ``frames`` frames of each (file, frames) part into ``out`` without re-encoding.

    Parts must come from ``VideoWriter(low_latency=True)`` with the same size and settings (no
    B-frames, so packet order is frame order). Returns the frames written.
    """
    rate = Fraction(fps).limit_denominator(1001)
    extradata, written = None, 0
    with av.open(str(out), mode="w", format="mp4") as dst:
        target = None
        for path, frames in parts:
            with _open(path) as src:
                stream = src.streams.video[0]
                if target is None:
                    target, extradata = dst.add_stream_from_template(stream), stream.codec_context.extradata
                    if stream.codec_tag == "hvc1":  # keep HEVC playable in Apple's players (the default is hev1)
                        target.codec_context.codec_tag = "hvc1"
                elif stream.codec_context.extradata != extradata:
                    raise ValueError(f"{Path(path).name} was encoded with other settings: cannot join it")
                for k, packet in enumerate(p for p in src.demux(stream) if p.size):
                    if k >= frames:
                        break
                    packet.stream, packet.time_base = target, 1 / rate
                    packet.pts = packet.dts = written
                    packet.duration = 1
                    dst.mux(packet)
                    written += 1
    return written


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds: size, frame rate, frame count (decoded count when the header has none)."""

    width: int
    height: int
    fps: float
    frames: int
    duration: float


def _open(path: str | Path, input_format: str | None = None) -> av.container.InputContainer:
    """A video file, or with ``input_format`` a capture device or FFmpeg source (``v4l2`` and /dev/video0,
    ``avfoundation``, ``dshow``, ``lavfi`` and a filter graph)."""
    if input_format:
        name = f"{path} ({input_format})"
        try:
            container = av.open(str(path), format=input_format)
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot open {path} as {input_format} ({err}): is the device there and free?") from err
    else:
        path = Path(path)
        name = path.name
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        try:
            container = av.open(str(path))
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot read {name} as a video ({err}); is it a complete video file?") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name} has no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Size, fps and frame count of a video file."""
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 16.0
        frames = stream.frames or sum(1 for _ in container.decode(stream))
        return VideoInfo(stream.width, stream.height, fps, frames, frames / fps)


def _frames(
    path: str | Path, fps: float | None, size: tuple[int, int] | None, input_format: str | None = None
) -> Iterator[np.ndarray]:
    """Decoded RGB frames [H, W, 3]; with ``fps``, each output time k / fps takes the latest source frame."""
    with _open(path, input_format) as container:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 16.0
        width, height = size if size is not None else (None, None)
        try:
            decoded = container.decode(stream)
            t0, k, prev, last_t = None, 0, None, 0.0
            for frame in decoded:
                rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
                if fps is None:
                    yield rgb
                    continue
                t = float(frame.time if frame.time is not None else k / src_fps)
                t0 = t if t0 is None else t0
                last_t = t - t0
                while prev is not None and k / fps < last_t - 1e-9:
                    yield prev
                    k += 1
                prev = rgb
            while prev is not None and k / fps < last_t + 1 / src_fps - 1e-9:
                yield prev
                k += 1
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode {Path(path).name}: {err}") from err


def read_video_chunks(
    path: str | Path,
    chunk_frames: int,
    *,
    first_chunk_frames: int | None = None,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    input_format: str | None = None,
) -> Iterator[np.ndarray]:
    """Yield uint8 [t, H, W, 3] chunks (the first of ``first_chunk_frames``, the last may be short).

    ``input_format`` reads a capture device or FFmpeg source instead of a file (see ``_open``): a webcam is
    ``read_video_chunks("/dev/video0", ..., input_format="v4l2")`` on Linux.

    ``fps`` resamples in time (a frame is repeated or skipped), ``size`` = (width, height) resizes;
    for streaming video-to-video use ``first_chunk_frames = 1 + 4k`` and ``chunk_frames = 4k``.
    """
    if chunk_frames < 1 or (first_chunk_frames is not None and first_chunk_frames < 1):
        raise ValueError(f"chunk sizes must be at least 1, got {first_chunk_frames}, {chunk_frames}")
    want = first_chunk_frames or chunk_frames
    buf: list[np.ndarray] = []
    for i, frame in enumerate(_frames(path, fps, size, input_format)):
        if max_frames is not None and i >= max_frames:
            break
        buf.append(frame)
        if len(buf) == want:
            yield np.stack(buf)
            buf, want = [], chunk_frames
    if buf:
        yield np.stack(buf)


def read_video(path: str | Path, **kwargs) -> np.ndarray:
    """All frames of a file as uint8 [F, H, W, 3] (same options as ``read_video_chunks``)."""
    chunks = list(read_video_chunks(path, 64, **kwargs))
    if not chunks:
        raise ValueError(f"{Path(path).name} holds no frames")
    return np.concatenate(chunks)


def fit_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [T, H, W, 3] frames resized to cover ``width`` x ``height`` (aspect kept), then centre-cropped."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    scale = max(width / w, height / h)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 frame stacks: 10 log10(255^2 / MSE)."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
