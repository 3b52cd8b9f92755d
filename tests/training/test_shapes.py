"""The Shapes renderer and grammar: determinism, geometry, wrap-around, the parser and the data stream."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from causvid_core.text import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPE_NAMES
from training.shapes import (
    ShapesDataset,
    ShapesPrompt,
    all_prompts,
    parse_prompt,
    prompt_set,
    random_prompt,
    render_frames,
    render_video,
)

STEP = {"left": (-1.5, 0.0), "right": (1.5, 0.0), "up": (0.0, -1.5), "down": (0.0, 1.5)}


def coverage(video: np.ndarray, prompt: str) -> np.ndarray:
    """Per-pixel object coverage 0..1 recovered from the colours: (pixel - bg) / (fg - bg)."""
    p = parse_prompt(prompt)
    bg, fg = np.array(p.background_rgb, float), np.array(p.colour_rgb, float)
    diff = fg - bg
    return ((video.astype(float) - bg) @ diff) / (diff @ diff)


def plain_centroid(alpha: np.ndarray) -> np.ndarray:
    """Coverage-weighted (x, y) centroid of one frame, pixel centres at i + 0.5 (no wrap handling)."""
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]] + 0.5
    return np.array([(alpha * xs).sum(), (alpha * ys).sum()]) / alpha.sum()


def touches_border(alpha: np.ndarray) -> bool:
    return bool(alpha[0].max() > 0 or alpha[-1].max() > 0 or alpha[:, 0].max() > 0 or alpha[:, -1].max() > 0)


def test_same_prompt_and_seed_give_the_same_video_and_seeds_differ() -> None:
    p = "a cyan square moving down on a white background"
    a, b = render_video(p, 11, 12), render_video(p, 11, 12)
    assert a.dtype == np.uint8 and a.shape == (12, 64, 64, 3)
    assert np.array_equal(a, b)
    starts = {tuple(np.round(plain_centroid(coverage(render_video(p, s, 1)[0], p)), 3)) for s in range(5)}
    assert len(starts) == 5


@pytest.mark.parametrize("start,count", [(0, 7), (37, 20), (250, 20)])
def test_rendering_a_slice_equals_slicing_the_full_render(start: int, count: int) -> None:
    p = "a yellow triangle moving left on a gray background"
    full = render_video(p, 4, 300)
    assert np.array_equal(render_frames(p, 4, start, count), full[start : start + count])


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_object_moves_1_5_px_per_frame_in_the_named_direction(direction: str) -> None:
    p = f"a blue circle moving {direction}"
    alpha = coverage(render_video(p, 2, 50), p)
    steps = [
        plain_centroid(alpha[f + 1]) - plain_centroid(alpha[f])
        for f in range(49)
        if not touches_border(alpha[f]) and not touches_border(alpha[f + 1])
    ]
    assert len(steps) > 10
    np.testing.assert_allclose(steps, np.tile(STEP[direction], (len(steps), 1)), atol=0.02)


def test_object_crossing_the_border_is_drawn_on_both_sides_whole() -> None:
    p = "a red square moving right on a gray background"
    alpha = coverage(render_video(p, 0, 60), p)
    crossing = [f for f in range(60) if alpha[f, :, 0].max() > 0.5 and alpha[f, :, -1].max() > 0.5]
    assert crossing, "within 60 frames (90 px) the square must cross the right border"
    np.testing.assert_allclose(alpha.sum(axis=(1, 2)), 14 * 14, rtol=0.005)  # nothing lost while wrapping


@pytest.mark.parametrize(
    "shape,area", [("circle", np.pi * 8**2), ("square", 14 * 14), ("triangle", 16 * 14 / 2)]
)
def test_shape_areas_match_the_specified_sizes(shape: str, area: float) -> None:
    p = f"a green {shape} moving up on a white background"
    np.testing.assert_allclose(coverage(render_video(p, 9, 20), p).sum(axis=(1, 2)), area, rtol=0.005)
    small = f"a green {shape} moving up"  # a 32 px canvas scales the object by one half
    np.testing.assert_allclose(
        coverage(render_video(small, 9, 4, size=32), small).sum((1, 2)), area / 4, rtol=0.01
    )


def _extent(alpha: np.ndarray) -> tuple[int, int]:
    """(width, height) in pixels of the region with coverage > 0.5 of an unwrapped frame."""
    rows, cols = np.nonzero(alpha > 0.5)
    return cols.max() - cols.min() + 1, rows.max() - rows.min() + 1


def test_shape_geometry_square_side_circle_diameter_upward_triangle() -> None:
    frames = {}
    for shape in SHAPE_NAMES:
        p = f"a red {shape} moving left"
        alpha = np.concatenate([coverage(render_video(p, seed, 45), p) for seed in range(4)])
        frames[shape] = next(a for a in alpha if not touches_border(a))
    assert _extent(frames["square"]) == (14, 14)
    assert _extent(frames["circle"]) in {(16, 16), (15, 16), (16, 15), (15, 15), (17, 16), (16, 17)}
    tri = frames["triangle"]
    w, h = _extent(tri)
    assert 15 <= w <= 17 and 13 <= h <= 15
    widths = (tri > 0.5).sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[0]] <= 2 and widths[rows[-1]] >= 15  # apex on top, base at the bottom


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_colours_and_background_are_the_palette_values(background: str) -> None:
    for colour, rgb in COLOURS.items():
        p = f"a {colour} square moving right on a {background} background"
        video = render_video(p, 3, 2)
        values, counts = np.unique(video.reshape(-1, 3), axis=0, return_counts=True)
        top = {tuple(int(c) for c in v) for v in values[np.argsort(counts)[-2:]]}
        assert top == {rgb, BACKGROUNDS[background]}


def test_parser_accepts_the_whole_vocabulary_and_round_trips() -> None:
    prompts = all_prompts()
    assert len(prompts) == len(COLOURS) * len(SHAPE_NAMES) * len(DIRECTIONS) * len(BACKGROUNDS)
    for text in prompts:
        p = parse_prompt(text)
        assert parse_prompt(p.text) == p
    assert parse_prompt("  A Red CIRCLE   moving RIGHT  ") == ShapesPrompt("red", "circle", "right", "black")
    assert parse_prompt("a red circle moving right on a black background") == parse_prompt(
        "a red circle moving right"
    )


def test_parser_names_the_bad_word_and_lists_the_options() -> None:
    with pytest.raises(ValueError, match="'purple'") as info:
        parse_prompt("a purple circle moving right")
    assert all(c in str(info.value) for c in COLOURS) and "{colour}" in str(info.value)
    with pytest.raises(ValueError, match="'hexagon'.*circle, square, triangle"):
        parse_prompt("a red hexagon moving right")
    with pytest.raises(ValueError, match="'sideways'.*left, right, up, down"):
        parse_prompt("a red circle moving sideways")
    with pytest.raises(ValueError, match="'pink'.*black, gray, white"):
        parse_prompt("a red circle moving right on a pink background")
    with pytest.raises(ValueError, match="has 3 words; a Shapes prompt has 5 or 9"):
        parse_prompt("a red circle")


def test_prompt_set_covers_the_vocabulary_with_distinct_prompts() -> None:
    prompts = prompt_set(64, seed=0)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert prompt_set(64, seed=0) == prompts and prompt_set(64, seed=1) != prompts
    parsed = [parse_prompt(p) for p in prompts]
    assert {p.colour for p in parsed} == set(COLOURS)
    assert {p.shape for p in parsed} == set(SHAPE_NAMES)
    assert {p.direction for p in parsed} == set(DIRECTIONS)
    assert {p.background for p in parsed} == set(BACKGROUNDS)
    small = [parse_prompt(p) for p in prompt_set(6, seed=3)]
    assert {p.colour for p in small} == set(COLOURS) and {p.background for p in small} == set(BACKGROUNDS)
    with pytest.raises(ValueError, match="n >= 6"):
        prompt_set(5)


def test_random_prompts_parse_and_use_both_spellings_of_black() -> None:
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng) for _ in range(300)]
    parsed = [parse_prompt(p) for p in prompts]
    assert len({p.text for p in parsed}) > 100
    black = [t for t, p in zip(prompts, parsed, strict=True) if p.background == "black"]
    assert any(t.endswith("black background") for t in black) and any(
        t.endswith("moving " + t.split()[-1]) for t in black
    )


def test_dataset_is_deterministic_per_step_and_resumable() -> None:
    ds = ShapesDataset(num_frames=5, size=32, seed=1)
    video, prompt = ds.sample(3)
    assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    again, prompt2 = ShapesDataset(num_frames=5, size=32, seed=1).sample(3)
    assert torch.equal(video, again) and prompt == prompt2
    stream = ds.iterate(batch_size=2)
    batches = [next(stream) for _ in range(3)]
    resumed = next(ShapesDataset(num_frames=5, size=32, seed=1).iterate(batch_size=2, start_step=2))
    assert torch.equal(batches[2][0], resumed[0]) and batches[2][1] == resumed[1]
    assert batches[0][0].shape == (2, 3, 5, 32, 32)
    assert not torch.equal(ShapesDataset(5, 32, seed=2).sample(3)[0], video)


def test_two_minute_video_renders_in_a_few_seconds() -> None:
    t = time.perf_counter()
    video = render_video("a magenta circle moving up on a gray background", 0, 1920)
    assert video.shape == (1920, 64, 64, 3)
    assert time.perf_counter() - t < 5.0


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        render_video("a red circle moving up", -1, 3)
    with pytest.raises(ValueError, match="at least 16 px"):
        render_video("a red circle moving up", 0, 3, size=8)
