"""The Shapes domain: prompt grammar, the seeded renderer and the training stream (SHAPES.md).

One object (circle, square or triangle) in one palette colour moves at 1.5 px/frame (at 64x64) in a
straight line on a plain background, wrapping around the canvas. Rendering is exact-area
anti-aliasing: each pixel's coverage is the area of the shape inside it, integrated exactly along x
and with the midpoint rule over the shape's own y-range along y. Frames depend only on their index,
so any slice of a video can be rendered on its own, and a (prompt, seed) pair always gives the
same video. The vocabulary and palette come from ``causvid_core.text`` (the single source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from causvid_core.text import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_BACKGROUND,
    DIRECTIONS,
    SHAPE_NAMES,
    SHAPES_GRAMMAR,
)

REFERENCE_SIZE = 64  # SHAPES.md sizes are in pixels of a 64x64 canvas; other sizes scale them
FPS = 16
SPEED = 1.5  # px/frame at 64x64
CIRCLE_DIAMETER = 16.0
SQUARE_SIDE = 14.0
TRIANGLE_BASE, TRIANGLE_HEIGHT = 16.0, 14.0
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
_SUBROWS = 8  # midpoint samples per pixel row inside the shape's y-range
_CHUNK = 256  # frames rendered at once (bounds memory)


@dataclass(frozen=True)
class ShapesPrompt:
    """A parsed Shapes prompt; ``text`` is its canonical spelling (black background left implicit)."""

    colour: str
    shape: str
    direction: str
    background: str = DEFAULT_BACKGROUND

    @property
    def text(self) -> str:
        base = f"a {self.colour} {self.shape} moving {self.direction}"
        return base if self.background == DEFAULT_BACKGROUND else f"{base} on a {self.background} background"

    @property
    def colour_rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUNDS[self.background]

    def __str__(self) -> str:
        return self.text


_SLOTS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("the article", ("a",)),
    1: ("the colour", tuple(COLOURS)),
    2: ("the shape", SHAPE_NAMES),
    3: ("the verb", ("moving",)),
    4: ("the direction", DIRECTIONS),
    5: ("the preposition", ("on",)),
    6: ("the article", ("a",)),
    7: ("the background", tuple(BACKGROUNDS)),
    8: ("the noun", ("background",)),
}


def parse_prompt(prompt: str | ShapesPrompt) -> ShapesPrompt:
    """Parse ``a {colour} {shape} moving {direction}[ on a {background} background]`` (any case)."""
    if isinstance(prompt, ShapesPrompt):
        return prompt
    words = prompt.strip().lower().split()
    if len(words) not in (5, 9):
        raise ValueError(
            f"prompt {prompt!r} has {len(words)} words; a Shapes prompt has 5 or 9: {SHAPES_GRAMMAR!r}, "
            "e.g. 'a red circle moving right on a gray background'"
        )
    for i, word in enumerate(words):
        role, options = _SLOTS[i]
        if word not in options:
            raise ValueError(
                f"unknown word {word!r} at position {i + 1} of prompt {prompt!r}: {role} must be one of "
                f"{', '.join(options)} (grammar: {SHAPES_GRAMMAR!r})"
            )
    background = words[7] if len(words) == 9 else DEFAULT_BACKGROUND
    return ShapesPrompt(words[1], words[2], words[4], background)


def all_prompts() -> list[str]:
    """Every canonical prompt: 6 colours x 3 shapes x 4 directions x 3 backgrounds = 216."""
    return [
        ShapesPrompt(c, s, d, b).text
        for c in COLOURS
        for s in SHAPE_NAMES
        for d in DIRECTIONS
        for b in BACKGROUNDS
    ]


def random_prompt(rng: np.random.Generator) -> str:
    """A uniform prompt; a black background is written out half of the time (both spellings occur)."""
    p = ShapesPrompt(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(list(SHAPE_NAMES))),
        direction=str(rng.choice(list(DIRECTIONS))),
        background=str(rng.choice(list(BACKGROUNDS))),
    )
    if p.background == DEFAULT_BACKGROUND and rng.random() < 0.5:
        return f"{p.text} on a {DEFAULT_BACKGROUND} background"
    return p.text


def _balanced(options: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """n values made of back-to-back random permutations of ``options`` (each appears when n >= len)."""
    out: list[str] = []
    while len(out) < n:
        out.extend(options[i] for i in rng.permutation(len(options)))
    return out[:n]


def _fields(p: ShapesPrompt) -> tuple[tuple[int, str], ...]:
    return ((0, p.colour), (1, p.shape), (2, p.direction), (3, p.background))


def _thinned(order: np.ndarray, n: int) -> list[str]:
    """Drop prompts of the shuffled full set, never the last holder of a word, until n remain."""
    full = [parse_prompt(t) for t in all_prompts()]
    counts: dict[tuple[int, str], int] = {}
    for p in full:
        for key in _fields(p):
            counts[key] = counts.get(key, 0) + 1
    keep = [int(i) for i in order]
    for i in order:  # a set where no prompt can go has at most 16 prompts (one per word), so this reaches n
        if len(keep) == n:
            break
        if all(counts[key] > 1 for key in _fields(full[i])):
            keep.remove(int(i))
            for key in _fields(full[i]):
                counts[key] -= 1
    return [full[i].text for i in keep]


def _small_set(n: int, rng: np.random.Generator) -> list[str]:
    """n <= 16 prompts from balanced slot sequences, slots swapped between rows until all rows differ."""
    slot_words = (tuple(COLOURS), SHAPE_NAMES, DIRECTIONS, tuple(BACKGROUNDS))
    combos = [list(c) for c in zip(*(_balanced(w, n, rng) for w in slot_words), strict=True)]
    for _ in range(1000):
        keys = [tuple(c) for c in combos]
        dup = [i for i, k in enumerate(keys) if keys.index(k) != i]
        if not dup:
            break
        i, j, k = dup[0], int(rng.integers(n)), int(rng.integers(1, 4))
        combos[i][k], combos[j][k] = combos[j][k], combos[i][k]  # swaps keep every slot's coverage
        if len({tuple(c) for c in combos}) <= len(set(keys)):
            combos[i][k], combos[j][k] = combos[j][k], combos[i][k]
    return [ShapesPrompt(*c).text for c in combos]


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """n distinct canonical prompts (all 216, cycled, when n > 216) covering every word of each slot."""
    need = len(COLOURS)
    if n < need:
        raise ValueError(f"prompt_set needs n >= {need} to cover all {need} colours, got n={n}")
    rng = np.random.default_rng(seed)
    total = len(all_prompts())
    order = rng.permutation(total)
    if n >= total:
        return [all_prompts()[order[i % total]] for i in range(n)]
    if n > len(COLOURS) + len(SHAPE_NAMES) + len(DIRECTIONS) + len(BACKGROUNDS):
        return _thinned(order, n)
    return _small_set(n, rng)


def _half_widths(shape: str, u: np.ndarray, scale: float) -> np.ndarray:
    """Half-width of the shape at vertical offset u from its centre (pixels, y down)."""
    if shape == "circle":
        r = CIRCLE_DIAMETER / 2 * scale
        return np.sqrt(np.clip(r * r - u * u, 0.0, None))
    if shape == "square":
        return np.full_like(u, SQUARE_SIDE / 2 * scale)
    # upward triangle: apex at u = -h/2, base (width TRIANGLE_BASE) at u = +h/2
    h = TRIANGLE_HEIGHT * scale
    return np.clip((u + h / 2) / h, 0.0, 1.0) * (TRIANGLE_BASE / 2 * scale)


def _extent(shape: str, scale: float) -> tuple[float, float]:
    """(half-width, half-height) of the shape's bounding box in pixels."""
    w, h = {
        "circle": (CIRCLE_DIAMETER, CIRCLE_DIAMETER),
        "square": (SQUARE_SIDE, SQUARE_SIDE),
        "triangle": (TRIANGLE_BASE, TRIANGLE_HEIGHT),
    }[shape]
    return w / 2 * scale, h / 2 * scale


def object_centres(prompt: str | ShapesPrompt, seed: int, frames: np.ndarray, size: int = 64) -> np.ndarray:
    """Bounding-box centres [F, 2] (x, y) at the given frame indices: (p0 + v f) mod size."""
    p = parse_prompt(prompt)
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    start = np.random.default_rng(int(seed)).uniform(0.0, size, 2)
    vx, vy = DIRECTION_VECTORS[p.direction]
    speed = SPEED * size / REFERENCE_SIZE
    f = np.asarray(frames, dtype=np.float64)[:, None]
    return np.mod(start + speed * f * np.array([vx, vy], dtype=np.float64), size)


def _coverage(shape: str, centres: np.ndarray, size: int) -> np.ndarray:
    """Exact-area coverage [F, size, size] in 0..1 of the shape at each centre, wrapped on the torus."""
    scale = size / REFERENCE_SIZE
    hw, hh = _extent(shape, scale)
    n_frames = centres.shape[0]
    patch = int(np.ceil(2 * max(hh, hw))) + 2
    cx, cy = centres[:, 0, None], centres[:, 1, None]  # [F, 1]
    x0, y0 = np.floor(cx - hw), np.floor(cy - hh)
    cols = x0 + np.arange(patch)  # [F, P] left edges
    rows = y0 + np.arange(patch)  # [F, P] top edges
    y_lo = np.maximum(rows, cy - hh)  # [F, P] part of each pixel row inside the shape's y-range
    length = np.clip(np.minimum(rows + 1, cy + hh) - y_lo, 0.0, None)
    t = (np.arange(_SUBROWS) + 0.5) / _SUBROWS
    ys = y_lo[:, :, None] + length[:, :, None] * t  # [F, P, S]
    half = _half_widths(shape, ys - cy[:, :, None], scale)  # [F, P, S]
    left, right = (cx[:, :, None] - half)[..., None], (cx[:, :, None] + half)[..., None]  # [F, P, S, 1]
    c = cols[:, None, None, :]  # [F, 1, 1, P]
    overlap = np.clip(np.minimum(c + 1, right) - np.maximum(c, left), 0.0, 1.0)  # [F, P, S, P]
    cov = overlap.mean(axis=2) * length[:, :, None]  # [F, P, P]
    alpha = np.zeros((n_frames, size, size), dtype=np.float64)
    fi = np.arange(n_frames)[:, None, None]
    ri = np.mod(rows.astype(np.int64), size)[:, :, None]
    ci = np.mod(cols.astype(np.int64), size)[:, None, :]
    alpha[fi, ri, ci] = cov
    return alpha


def render_frames(
    prompt: str | ShapesPrompt, seed: int, start: int, count: int, size: int = 64
) -> np.ndarray:
    """Frames [start, start + count) of the video of (prompt, seed): uint8 [count, size, size, 3]."""
    p = parse_prompt(prompt)
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got start={start}, count={count}")
    if size < 16:
        raise ValueError(f"size must be at least 16 px for the object to fit, got {size}")
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    bg = np.array(p.background_rgb, dtype=np.float64)
    fg = np.array(p.colour_rgb, dtype=np.float64)
    for a in range(0, count, _CHUNK):
        idx = np.arange(start + a, start + min(a + _CHUNK, count))
        alpha = _coverage(p.shape, object_centres(p, seed, idx, size), size)[..., None]
        out[a : a + len(idx)] = np.rint(bg + alpha * (fg - bg)).astype(np.uint8)
    return out


def render_video(prompt: str | ShapesPrompt, seed: int, num_frames: int, size: int = 64) -> np.ndarray:
    """The whole video of (prompt, seed): uint8 [num_frames, size, size, 3]."""
    return render_frames(prompt, seed, 0, num_frames, size)


def to_model_range(video: np.ndarray) -> Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in -1..1 (x / 127.5 - 1)."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


class ShapesDataset:
    """Deterministic stream of training clips: sample i depends only on (seed, i), so runs resume exactly."""

    def __init__(self, num_frames: int, size: int = 64, seed: int = 0) -> None:
        self.num_frames, self.size, self.seed = num_frames, size, seed

    def _draw(self, index: int) -> tuple[str, int]:
        """(prompt, video seed) of clip ``index``."""
        rng = np.random.default_rng([self.seed, index])
        prompt = random_prompt(rng)
        return prompt, int(rng.integers(2**31))

    def sample(self, index: int) -> tuple[Tensor, str]:
        """Clip ``index``: (float32 [3, F, H, W] in -1..1, prompt)."""
        prompt, video_seed = self._draw(index)
        return to_model_range(render_video(prompt, video_seed, self.num_frames, self.size)), prompt

    def sample_as(self, index: int, shape: str) -> tuple[Tensor, str]:
        """Clip ``index`` with its object drawn as ``shape``: the same colour, background, start, direction
        and speed (the position depends only on the video seed), so only the shape differs."""
        prompt, video_seed = self._draw(index)
        twin = dataclasses.replace(parse_prompt(prompt), shape=shape)
        return to_model_range(render_video(twin, video_seed, self.num_frames, self.size)), twin.text

    def batch(self, step: int, batch_size: int) -> tuple[Tensor, list[str]]:
        """Batch of training step ``step``: samples [step * B, (step + 1) * B) -> ([B, 3, F, H, W], prompts)."""
        items = [self.sample(step * batch_size + k) for k in range(batch_size)]
        return torch.stack([v for v, _ in items]), [p for _, p in items]

    def iterate(self, batch_size: int, start_step: int = 0) -> Iterator[tuple[Tensor, list[str]]]:
        """Endless batches from ``start_step`` on (resume by passing the next step)."""
        step = start_step
        while True:
            yield self.batch(step, batch_size)
            step += 1

    def __iter__(self) -> Iterator[tuple[Tensor, str]]:
        index = 0
        while True:
            yield self.sample(index)
            index += 1
