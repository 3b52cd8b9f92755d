"""The Shapes figures (SHAPES.md): text alignment, temporal quality, frame quality, long-video drift.

Every figure is 0-100, higher is better. A frame is segmented against the background colour (the
prompt's, an explicit RGB, or the dominant border colour): object pixels are farther than 80 (RGB
Euclidean) from it. Positions live on the torus, because objects wrap around the canvas:

- centroid: circular mean per axis, weighted by soft coverage ``clip(dist / dist_interior, 0, 1)``
  on the object's 2-px neighbourhood, so anti-aliased edges give sub-pixel positions;
- displacement: wrapped, ``((d + W/2) mod W) - W/2``;
- fill ratio: each frame is rolled so the object's centroid sits at the canvas centre, then
  area / bbox is taken on the frames whose bbox does not touch the border (an object crossing the
  border is thus measured whole, not cut);
- connectivity: 8-connected components with wrap-around.

Figures (absent object = no object pixel cluster of at least 16 px at 64x64):
- text alignment = 100 * mean(colour acc., shape acc., direction acc.): colour = share of frames
  whose object colour (mean of its interior pixels) is nearest the prompt's palette colour; shape =
  share of measurable frames whose fill ratio falls in the prompt shape's band (>0.9 square,
  0.65-0.9 circle, <0.65 triangle); direction = share of consecutive-frame pairs whose displacement
  lies within 45 degrees of the prompt's direction (along > |across|);
- temporal quality = 100 * mean over consecutive pairs of exp(-|speed - 1.5 * W / 64|), a pair with
  an absent object counting 0;
- frame quality = 100 * mean over frames of purity * (1 if exactly one connected object else 0.5),
  purity = share of pixels within 40 of the background or of the palette colour nearest the
  object's colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from causvid_core.text import COLOURS, SHAPE_NAMES

from .shapes import DIRECTION_VECTORS, REFERENCE_SIZE, SPEED, ShapesPrompt, parse_prompt

SEGMENT_DISTANCE = 80.0
PURITY_DISTANCE = 40.0
MIN_AREA = 16  # object pixels at 64x64 for the object to count as present
FILL_SQUARE, FILL_CIRCLE = 0.9, 0.65  # fill ratio bands: > 0.9 square, 0.65-0.9 circle, < 0.65 triangle
PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # [6, 3]
_CHUNK = 480


@dataclass
class FrameStats:
    """Per-frame measurements of one video (length F)."""

    present: np.ndarray  # [F] bool
    centroid: np.ndarray  # [F, 2] (x, y) on the torus, nan when absent
    colour: np.ndarray  # [F, 3] mean RGB of the object's interior, nan when absent
    fill: np.ndarray  # [F] area / bbox after centring, nan when not measurable
    components: np.ndarray  # [F] int, 8-connected with wrap-around
    purity: np.ndarray  # [F] share of pixels within 40 of the background or the object palette colour
    width: int

    def window(self, start: int, stop: int) -> FrameStats:
        """The stats of frames [start, stop)."""
        s = slice(start, stop)
        arrays = (self.present, self.centroid, self.colour, self.fill, self.components, self.purity)
        return FrameStats(*(a[s] for a in arrays), width=self.width)


def estimate_background(video: np.ndarray) -> np.ndarray:
    """Dominant border colour: the most common 32-level RGB bin of border pixels, averaged in the bin."""
    border = np.concatenate(
        [video[:, 0], video[:, -1], video[:, 1:-1, 0], video[:, 1:-1, -1]], axis=1
    ).reshape(-1, 3)
    bins = border.astype(np.int64) // 32
    keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    dominant = np.bincount(keys, minlength=512).argmax()
    return border[keys == dominant].astype(np.float64).mean(axis=0)


def _roll_or(mask: np.ndarray, radius: int) -> np.ndarray:
    """Torus dilation of [F, H, W] by a (2r+1)^2 square."""
    out = mask.copy()
    for axis in (1, 2):
        base = out.copy()
        for r in range(1, radius + 1):
            out |= np.roll(base, r, axis) | np.roll(base, -r, axis)
    return out


def count_components(mask: np.ndarray) -> np.ndarray:
    """Number of 8-connected components per frame of [F, H, W] on the torus (label propagation)."""
    n_frames, h, w = mask.shape
    big = h * w
    index = np.arange(big, dtype=np.int32).reshape(h, w)
    labels = np.where(mask, index, big).astype(np.int32)
    while True:
        m = np.minimum(labels, np.minimum(np.roll(labels, 1, 1), np.roll(labels, -1, 1)))
        m = np.minimum(m, np.minimum(np.roll(m, 1, 2), np.roll(m, -1, 2)))  # 3x3 minimum
        flat = np.where(mask, m, big).reshape(n_frames, big)
        jumped = np.take_along_axis(flat, np.minimum(flat, big - 1), axis=1)  # pointer jumping
        new = np.where(flat < big, np.minimum(flat, jumped), big).reshape(n_frames, h, w)
        if np.array_equal(new, labels):
            break
        labels = new
    roots = (labels == index) & mask
    return roots.sum(axis=(1, 2))


def _circular_mean(weights: np.ndarray, axis: int) -> np.ndarray:
    """Circular mean along an axis of [F, H, W] weights, in pixel units (pixel i spans [i, i + 1])."""
    n = weights.shape[axis]
    marginal = weights.sum(axis=3 - axis)  # [F, n]
    theta = 2 * np.pi * (np.arange(n) + 0.5) / n
    angle = np.arctan2(marginal @ np.sin(theta), marginal @ np.cos(theta))
    return np.mod(angle * n / (2 * np.pi), n)


def _fill_ratio(mask: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """area / bbox of each frame rolled so the centroid is central; nan when the bbox touches the border."""
    n_frames, h, w = mask.shape
    safe = np.nan_to_num(centroid)
    sx = w // 2 - np.floor(safe[:, 0]).astype(np.int64)
    sy = h // 2 - np.floor(safe[:, 1]).astype(np.int64)
    rows = np.mod(np.arange(h)[None, :] - sy[:, None], h)  # [F, H]
    cols = np.mod(np.arange(w)[None, :] - sx[:, None], w)
    centred = mask[np.arange(n_frames)[:, None, None], rows[:, :, None], cols[:, None, :]]
    r_any, c_any = centred.any(axis=2), centred.any(axis=1)  # [F, H], [F, W]
    height = h - r_any.argmax(1) - r_any[:, ::-1].argmax(1)
    width = w - c_any.argmax(1) - c_any[:, ::-1].argmax(1)
    touches = r_any[:, 0] | r_any[:, -1] | c_any[:, 0] | c_any[:, -1] | ~r_any.any(1)
    fill = centred.sum(axis=(1, 2)) / np.maximum(height * width, 1)
    return np.where(touches, np.nan, fill)


def _stats_chunk(video: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-frame stats of a chunk [F, H, W, 3] against one background RGB."""
    pix = video.astype(np.float32)
    dist = np.linalg.norm(pix - background.astype(np.float32), axis=-1)  # [F, H, W]
    mask = dist > SEGMENT_DISTANCE
    area = mask.sum(axis=(1, 2))
    present = area >= MIN_AREA * (video.shape[2] / REFERENCE_SIZE) ** 2
    interior = ~_roll_or(~mask, 1)
    core = np.where(interior.sum(axis=(1, 2), keepdims=True) > 0, interior, mask)
    n_core = np.maximum(core.sum(axis=(1, 2)), 1)
    colour = np.einsum("fhw,fhwc->fc", core, pix, dtype=np.float64) / n_core[:, None]
    ref = np.maximum((dist * core).sum(axis=(1, 2)) / n_core, 1.0)
    soft = np.clip(dist / ref[:, None, None], 0.0, 1.0) * _roll_or(mask, 2)
    centroid = np.stack([_circular_mean(soft, 2), _circular_mean(soft, 1)], axis=1)
    centroid[~present] = np.nan
    colour[~present] = np.nan
    nearest = PALETTE[np.argmin(((np.nan_to_num(colour)[:, None] - PALETTE) ** 2).sum(-1), axis=1)]
    near_bg = dist <= PURITY_DISTANCE
    near_obj = np.linalg.norm(pix - nearest[:, None, None].astype(np.float32), axis=-1) <= PURITY_DISTANCE
    pure = near_bg | (near_obj & present[:, None, None])
    fill = np.where(present, _fill_ratio(mask, centroid), np.nan)
    return present, centroid, colour, fill, count_components(mask), pure.mean((1, 2))


def frame_stats(video: np.ndarray, background: Sequence[float] | np.ndarray) -> FrameStats:
    """Measure every frame of uint8 [F, H, W, 3] against a background RGB."""
    bg = np.asarray(background, dtype=np.float64)
    parts = [_stats_chunk(video[a : a + _CHUNK], bg) for a in range(0, len(video), _CHUNK)]
    return FrameStats(*(np.concatenate(p) for p in zip(*parts, strict=True)), width=video.shape[2])


def wrapped(d: np.ndarray, period: int) -> np.ndarray:
    """Shortest displacement on a circle: ((d + W/2) mod W) - W/2."""
    return np.mod(d + period / 2, period) - period / 2


def _classify_shape(fill: np.ndarray) -> np.ndarray:
    """Shape index per fill ratio: > 0.9 square, 0.65-0.9 circle, < 0.65 triangle."""
    idx = np.where(fill > FILL_SQUARE, "square", np.where(fill >= FILL_CIRCLE, "circle", "triangle"))
    return np.array([SHAPE_NAMES.index(s) for s in idx.ravel()], dtype=np.int64)


def _figures(stats: FrameStats, prompt: ShapesPrompt | None) -> dict[str, float]:
    """Aggregate per-frame stats into the figures (0-100) and their parts."""
    w = stats.width
    pair = stats.present[1:] & stats.present[:-1]
    d = wrapped(np.diff(stats.centroid, axis=0), w)  # [F-1, 2]
    speed = np.hypot(d[:, 0], d[:, 1])
    target = SPEED * w / REFERENCE_SIZE
    temporal = np.where(pair, np.exp(-np.abs(np.nan_to_num(speed, nan=1e9) - target)), 0.0)
    single = stats.components == 1
    out = {
        "temporal_quality": 100 * float(temporal.mean()),
        "frame_quality": 100 * float(np.mean(stats.purity * np.where(single, 1.0, 0.5))),
        "presence": 100 * float(stats.present.mean()),
        "purity": 100 * float(stats.purity.mean()),
        "single_object": 100 * float(single.mean()),
        "mean_speed": float(np.nanmean(speed[pair])) if pair.any() else 0.0,
        "frames": float(len(stats.present)),
    }
    if prompt is None:
        return out
    colour_ok = np.zeros(len(stats.present), dtype=bool)
    has = stats.present
    nearest = np.argmin(((stats.colour[has][:, None] - PALETTE) ** 2).sum(-1), axis=1)
    colour_ok[has] = nearest == list(COLOURS).index(prompt.colour)
    measurable = ~np.isnan(stats.fill)
    shape_ok = _classify_shape(stats.fill[measurable]) == SHAPE_NAMES.index(prompt.shape)
    u = np.array(DIRECTION_VECTORS[prompt.direction], dtype=np.float64)
    along = np.nan_to_num(d @ u)
    across = np.abs(np.nan_to_num(d @ np.array([-u[1], u[0]])))
    direction_ok = pair & (along > across)
    out["colour_accuracy"] = 100 * float(colour_ok.mean())
    out["shape_accuracy"] = 100 * float(shape_ok.mean()) if measurable.any() else 0.0
    out["direction_accuracy"] = 100 * float(direction_ok.mean())
    parts = (out["colour_accuracy"], out["shape_accuracy"], out["direction_accuracy"])
    out["text_alignment"] = float(np.mean(parts))
    return out


def _background_of(
    video: np.ndarray, prompt: ShapesPrompt | None, background: Sequence[float] | str | None
) -> np.ndarray:
    if isinstance(background, str):
        if background != "estimate":
            raise ValueError(f"background must be None, 'estimate' or an RGB triple, got {background!r}")
        return estimate_background(video)
    if background is not None:
        return np.asarray(background, dtype=np.float64)
    return estimate_background(video) if prompt is None else np.asarray(prompt.background_rgb, np.float64)


def _check_video(video: np.ndarray) -> None:
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 video [F, H, W, 3], got {video.dtype} {tuple(video.shape)}; "
            "convert with (x.clamp(-1, 1) + 1) * 127.5 rounded to uint8, channels last"
        )
    if video.shape[0] < 2:
        raise ValueError(f"need at least 2 frames to measure motion, got {video.shape[0]}")


def score_video(
    video: np.ndarray,
    prompt: str | ShapesPrompt | None,
    background: Sequence[float] | str | None = None,
) -> dict[str, float]:
    """All figures of one video; background: None (the prompt's), 'estimate' (border) or an RGB triple.

    Without a prompt the background is estimated and text alignment is not computed.
    """
    _check_video(video)
    p = None if prompt is None else parse_prompt(prompt)
    stats = frame_stats(video, _background_of(video, p, background))
    return _figures(stats, p)


def _windows(stats: FrameStats, p: ShapesPrompt | None, fps: int, window_s: float) -> list[dict[str, float]]:
    size = max(int(round(fps * window_s)), 2)
    total = len(stats.present)
    windows = []
    for k, a in enumerate(range(0, total, size)):
        b = min(a + size, total)
        if b - a < 2 or (b - a < size / 2 and k > 0):
            continue
        windows.append(
            {"window": float(k), "start_s": a / fps, "end_s": b / fps, **_figures(stats.window(a, b), p)}
        )
    return windows


def drift_windows(
    video: np.ndarray,
    prompt: str | ShapesPrompt | None,
    fps: int = 16,
    window_s: float = 5.0,
    background: Sequence[float] | str | None = None,
) -> list[dict[str, float]]:
    """The figures per window of ``window_s`` seconds (a trailing part counts if at least half a window)."""
    return score_with_drift(video, prompt, fps, window_s, background)[1]


def score_with_drift(
    video: np.ndarray,
    prompt: str | ShapesPrompt | None,
    fps: int = 16,
    window_s: float = 5.0,
    background: Sequence[float] | str | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``score_video`` and ``drift_windows`` from one pass over the frames."""
    _check_video(video)
    p = None if prompt is None else parse_prompt(prompt)
    stats = frame_stats(video, _background_of(video, p, background))
    return _figures(stats, p), _windows(stats, p, fps, window_s)
