"""The Shapes figures: ground truth scores near 100, each kind of damage lowers the figure it should."""

from __future__ import annotations

import numpy as np
import pytest

from causvid_core.text import BACKGROUNDS
from training.metrics import (
    count_components,
    drift_windows,
    estimate_background,
    frame_stats,
    score_video,
    wrapped,
)
from training.shapes import object_centres, parse_prompt, prompt_set, render_video

FIGURES = ("text_alignment", "temporal_quality", "frame_quality")
PROMPT = "a green triangle moving up on a gray background"


@pytest.fixture(scope="module")
def gt() -> np.ndarray:
    return render_video(PROMPT, 3, 48)


def test_ground_truth_scores_near_100_for_every_word_of_the_vocabulary() -> None:
    prompts = prompt_set(24, seed=5)  # covers every colour, shape, direction and background
    for i, p in enumerate(prompts):
        scores = score_video(render_video(p, i, 40), p)
        for key in FIGURES:
            assert scores[key] >= 95, (p, key, scores[key])
        assert abs(scores["mean_speed"] - 1.5) < 0.02, (p, scores["mean_speed"])


def test_estimated_background_gives_the_same_figures(gt: np.ndarray) -> None:
    for name, rgb in BACKGROUNDS.items():
        video = render_video(f"a red circle moving left on a {name} background", 0, 8)
        np.testing.assert_allclose(estimate_background(video), rgb, atol=1)
    assert score_video(gt, PROMPT, background="estimate") == pytest.approx(score_video(gt, PROMPT))
    no_prompt = score_video(gt, None)
    assert "text_alignment" not in no_prompt and no_prompt["temporal_quality"] >= 95


def test_wrapped_displacement_takes_the_short_way_round() -> None:
    np.testing.assert_allclose(
        wrapped(np.array([-62.5, 62.5, 1.5, -1.5, 31.0]), 64), [1.5, -1.5, 1.5, -1.5, 31.0]
    )


@pytest.mark.parametrize("direction", ["right", "left", "up", "down"])
def test_object_crossing_the_border_keeps_speed_direction_and_position(direction: str) -> None:
    p = f"a blue square moving {direction} on a white background"
    video = render_video(p, 6, 60)
    axis = 2 if direction in ("left", "right") else 1
    first = np.take(video, 0, axis=axis).astype(int).sum(-1) < 700  # object pixels on the first line
    last = np.take(video, -1, axis=axis).astype(int).sum(-1) < 700
    crossing = np.nonzero(first.any(1) & last.any(1))[0]
    assert len(crossing) >= 5, "the square must straddle the border for several frames"
    window = video[crossing[0] - 1 : crossing[-1] + 2]
    scores = score_video(window, p)
    assert scores["direction_accuracy"] == 100 and scores["temporal_quality"] >= 98
    assert abs(scores["mean_speed"] - 1.5) < 0.02 and scores["single_object"] == 100
    stats = frame_stats(video[crossing], parse_prompt(p).background_rgb)
    truth = object_centres(p, 6, crossing)
    np.testing.assert_allclose(wrapped(stats.centroid - truth, 64), 0, atol=0.05)


def test_components_count_wrap_around_and_diagonals_as_connected() -> None:
    mask = np.zeros((4, 16, 16), dtype=bool)
    mask[0, 2:5, 2:5] = mask[0, 9:12, 9:12] = True  # two blobs
    mask[1, 5:8, 0:2] = mask[1, 5:8, 14:16] = True  # one blob across the left/right border
    mask[2, 0, 3] = mask[2, 15, 4] = True  # diagonal neighbours across the top/bottom border
    mask[3, 0, 0] = mask[3, 15, 15] = True  # corner to corner on the torus
    assert count_components(mask).tolist() == [2, 1, 1, 1]


def test_shuffling_frames_in_time_drops_temporal_and_direction(gt: np.ndarray) -> None:
    base = score_video(gt, PROMPT)
    shuffled = score_video(gt[np.random.default_rng(0).permutation(len(gt))], PROMPT)
    assert shuffled["temporal_quality"] < 30 <= base["temporal_quality"] - 60
    assert shuffled["direction_accuracy"] < 75 and base["direction_accuracy"] == 100
    assert shuffled["frame_quality"] == pytest.approx(base["frame_quality"])  # frames themselves are fine


def test_shuffling_pixels_within_frames_drops_frame_quality(gt: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    flat = gt.reshape(len(gt), -1, 3)
    scrambled = np.stack([f[rng.permutation(len(f))] for f in flat]).reshape(gt.shape)
    scores = score_video(scrambled, PROMPT)
    assert scores["frame_quality"] <= 55 and scores["single_object"] < 10
    assert scores["temporal_quality"] < 30 and scores["shape_accuracy"] < 50


@pytest.mark.parametrize(
    "wrong,part",
    [
        ("a red triangle moving up on a gray background", "colour_accuracy"),
        ("a green circle moving up on a gray background", "shape_accuracy"),
        ("a green square moving up on a gray background", "shape_accuracy"),
        ("a green triangle moving down on a gray background", "direction_accuracy"),
        ("a green triangle moving left on a gray background", "direction_accuracy"),
    ],
)
def test_a_wrong_prompt_drops_text_alignment(gt: np.ndarray, wrong: str, part: str) -> None:
    scores = score_video(gt, wrong)
    assert scores[part] == 0 and scores["text_alignment"] <= 67
    assert scores["temporal_quality"] >= 95  # motion quality does not depend on the prompt's words


def test_blank_frames_and_a_frozen_object_score_low_temporal(gt: np.ndarray) -> None:
    blank = score_video(np.full_like(gt, 128), PROMPT)
    assert blank["temporal_quality"] == 0 and blank["text_alignment"] == 0 and blank["presence"] == 0
    half = gt.copy()
    half[::2] = 128  # the object vanishes every other frame
    assert score_video(half, PROMPT)["temporal_quality"] == 0
    frozen = score_video(np.repeat(gt[:1], len(gt), axis=0), PROMPT)
    assert frozen["temporal_quality"] < 30 and frozen["direction_accuracy"] == 0


def test_two_minute_ground_truth_gives_24_windows_near_100() -> None:
    p = "a yellow circle moving left on a white background"
    windows = drift_windows(render_video(p, 1, 1920), p, fps=16, window_s=5)
    assert len(windows) == 24
    assert [w["start_s"] for w in windows] == [5.0 * k for k in range(24)]
    for w in windows:
        assert min(w[k] for k in FIGURES) >= 95, w


def test_a_degrading_video_gives_falling_drift_figures() -> None:
    p = "a cyan square moving right"
    video = render_video(p, 2, 480).astype(float)
    sigma = np.linspace(0, 70, len(video))[:, None, None, None]  # noise grows over 30 s
    noisy = np.clip(video + sigma * np.random.default_rng(0).standard_normal(video.shape), 0, 255)
    windows = drift_windows(noisy.astype(np.uint8), p, fps=16, window_s=5)
    assert len(windows) == 6
    curves = {key: [w[key] for w in windows] for key in FIGURES}
    for key, curve in curves.items():
        assert curve[0] >= 95 and curve[-1] < curve[0] - 25, (key, curve)
    frame = curves["frame_quality"]
    assert all(b < a for a, b in zip(frame, frame[1:], strict=False)), frame


def test_bad_video_input_is_refused_clearly(gt: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 video \\[F, H, W, 3\\]"):
        score_video(gt.astype(np.float32), PROMPT)
    with pytest.raises(ValueError, match="at least 2 frames"):
        score_video(gt[:1], PROMPT)
    with pytest.raises(ValueError, match="'estimate' or an RGB triple"):
        score_video(gt, PROMPT, background="border")
