"""``vae --student DIT``: a decoder fine-tune on a student's own latents, each with the video it meant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from causvid_core.bundle import embedded_file
from causvid_core.vae import VAE_PRESETS, WanVAE
from training import distill
from training import student_clips as student_clips_module
from training.config import ConfigError, make_config, stage_name
from training.eval import score_video
from training.shapes import object_centres, render_video
from training.student_clips import (
    SHARD,
    measure_path,
    render_along,
    smooth_path,
    steady_targets,
    student_clips,
    target_path,
)
from training.vae_stage import reconstruct, shift_sizes, stream_window

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("a red triangle moving up on a gray background", "a blue square moving left",
           "a green circle moving down on a white background")  # fmt: skip


def wrapped_diff(a: torch.Tensor, b: torch.Tensor, size: int = 64) -> torch.Tensor:
    """a - b on a canvas that wraps around, in -size/2..size/2."""
    return torch.remainder(a - b + size / 2, size) - size / 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_true_video_is_its_own_target(prompt: str) -> None:
    """A video already on a straight path at the prompt's speed gets itself back: the measured path is the
    renderer's to a hundredth of a pixel (the triangle's low centroid accounted for), and so is every pixel."""
    video = render_video(prompt, 3, 33)
    path = target_path(video, prompt)
    assert path is not None
    assert np.abs(path - object_centres(prompt, 3, np.arange(33))).max() < 0.01
    assert np.abs(render_along(prompt, path, 64).astype(int) - video).max() <= 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_jittery_drawing_gets_an_even_target_where_it_was(prompt: str) -> None:
    """The target follows the drawing (within its jitter) but steps evenly: what temporal quality counts."""
    truth = object_centres(prompt, 3, np.arange(33))
    jittered = np.mod(truth + np.random.default_rng(0).normal(0, 0.6, truth.shape), 64)
    drawing = render_along(prompt, jittered, 64)
    path = target_path(drawing, prompt)
    assert path is not None
    assert np.abs(path - truth).max() < 1.0
    before, after = score_video(drawing, prompt), score_video(render_along(prompt, path, 64), prompt)
    assert after["temporal_quality"] > before["temporal_quality"] + 15
    assert after["text_alignment"] == pytest.approx(100.0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smooth_zero_asks_for_the_straight_path_through_the_drawing(prompt: str) -> None:
    """--student-smooth 0: the target keeps where the drawing was on average but none of its wobble, so it
    moves at the prompt's speed in every frame; a longer average lies between that and 5 frames."""
    truth = object_centres(prompt, 3, np.arange(33))
    wobble = np.random.default_rng(2).normal(0, 0.6, truth.shape)
    drawing = render_along(prompt, np.mod(truth + 1.5 + wobble, 64), 64)  # off the truth by 1.5 px and wobbling
    measured = measure_path(drawing, prompt)
    assert measured is not None
    straight = smooth_path(prompt, *measured, 64, smooth=0)
    assert np.abs(np.mod(np.diff(straight, axis=0) - (truth[1] - truth[0]) + 32, 64) - 32).max() < 1e-9
    assert np.abs(np.mod(straight - truth - 1.5 + 32, 64) - 32).max() < 0.5  # where the drawing was
    scores = [score_video(render_along(prompt, smooth_path(prompt, *measured, 64, smooth=k), 64), prompt)
              for k in (5, 13, 0)]  # fmt: skip
    assert scores[0]["temporal_quality"] < scores[1]["temporal_quality"] < scores[2]["temporal_quality"]
    assert scores[2]["temporal_quality"] > 99 and scores[2]["text_alignment"] == pytest.approx(100.0)
    assert np.array_equal(target_path(drawing, prompt, smooth=0), straight)


def test_no_target_for_a_missing_object_or_a_wild_path() -> None:
    prompt = PROMPTS[1]
    video = render_video(prompt, 3, 17)
    gone = video.copy()
    gone[5] = gone[0, 0, 0]  # one frame of plain background
    assert target_path(gone, prompt) is None
    wild = render_along(prompt, np.random.default_rng(1).uniform(0, 64, (17, 2)), 64)  # jumps about
    assert target_path(wild, prompt) is None


def test_steady_targets_give_ode_pairs_even_steps_where_the_teacher_put_the_object() -> None:
    """ode-pairs --steady-targets: a jittery clip's latents come back as the latents of the object moving evenly
    along the path it took on average; a clip with no object to follow keeps its latents untouched."""
    from causvid_core.vae import load_wan_vae
    from training.data import CoreVAECodec

    codec = CoreVAECodec(load_wan_vae(embedded_file("shapes", "vae")))

    def latents(video: np.ndarray) -> torch.Tensor:
        return codec.encode(torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)

    def drawn(z: torch.Tensor) -> np.ndarray:
        video = codec.decode(z)[0, :, :33]
        return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    prompt = "a red circle moving right"  # a shape the shipped decoder draws evenly from clean latents
    truth = object_centres(prompt, 3, np.arange(33))
    jittery = latents(render_along(prompt, np.mod(truth + np.random.default_rng(0).normal(0, 0.8, truth.shape), 64), 64))
    empty = latents(np.broadcast_to(render_video(PROMPTS[1], 3, 33)[:1, :1, :1], (33, 64, 64, 3)).copy())
    out, done = steady_targets(torch.cat([jittery, empty]), [prompt, PROMPTS[1]], codec)
    assert done == [True, False] and torch.equal(out[1], empty[0])

    def wobble(z: torch.Tensor) -> float:
        """rms px off the straight path at the prompt's velocity, as the object is drawn from ``z``."""
        return float(np.sqrt((measure_path(drawn(z), prompt)[1] ** 2).sum(1).mean()))

    assert wobble(out[:1]) < 0.3 < 0.6 < wobble(jittery)
    before, after = score_video(drawn(jittery), prompt), score_video(drawn(out[:1]), prompt)
    assert after["temporal_quality"] > before["temporal_quality"] + 5
    assert after["text_alignment"] >= before["text_alignment"] - 1
    start = measure_path(drawn(out[:1]), prompt)[0]
    assert np.abs(np.mod(start - truth[0] + 32, 64) - 32).max() < 1.0  # where the jittery object ran


def test_student_clips_are_made_once_and_kept(tmp_path) -> None:
    """The shipped student's clips: latents as the decoder gets them, targets in the video range; a second call
    reads the shards back instead of rendering again, and a changed setting makes them anew."""
    student, vae = embedded_file("shapes", "dit"), embedded_file("shapes", "vae")
    said: list[str] = []
    latents, targets = student_clips(tmp_path, student, vae, 3, 9, 64, 0, say=said.append)
    assert latents.shape[1:] == (16, 3, 8, 8) and targets.shape[1:] == (3, 9, 64, 64)
    assert 1 <= len(latents) == len(targets) <= 3
    assert targets.min() >= -1 and targets.max() <= 1
    assert len(said) == 1 and (tmp_path / "shard_0000.pt").is_file()
    again = student_clips(tmp_path, student, vae, 3, 9, 64, 0, say=said.append)
    assert len(said) == 1 and torch.equal(again[0], latents)
    straight = student_clips(tmp_path, student, vae, 3, 9, 64, 0, say=said.append, smooth=0)
    assert len(said) == 1 and torch.equal(straight[0], latents)  # another smoothing reads the same shards
    assert not torch.equal(straight[1], targets)  # and draws other targets from them
    student_clips(tmp_path, student, vae, 3, 9, 64, 1, say=said.append)  # another seed: other clips
    assert len(said) == 2
    assert SHARD >= 3


def test_worker_processes_make_the_same_clips(tmp_path, monkeypatch) -> None:
    """Shards made by two one-thread processes at once hold the clips one process makes (prompts, paths to
    a hundredth of a pixel, latents to float16's rounding), each shard written whole."""
    monkeypatch.setattr(student_clips_module, "SHARD", 2)
    student, vae = embedded_file("shapes", "dit"), embedded_file("shapes", "vae")
    said: list[str] = []
    one = student_clips(tmp_path / "one", student, vae, 4, 9, 64, 0, say=said.append, workers=1)
    two = student_clips(tmp_path / "two", student, vae, 4, 9, 64, 0, say=said.append, workers=2)
    assert len(said) == 4 and said[-1].startswith("student clips 4/4 made")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["shard_0000.pt", "shard_0001.pt"]
    for a, b in zip(sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir()), strict=True):
        x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        assert x["prompts"] == y["prompts"] and x["signature"] == y["signature"]
        assert torch.allclose(wrapped_diff(x["starts"], y["starts"]), torch.zeros(1, dtype=torch.float64), atol=0.01)
        assert torch.allclose(x["deviations"], y["deviations"], atol=0.01)
    assert torch.allclose(one[0], two[0], atol=2e-2)
    assert torch.allclose(one[1], two[1], atol=2.5 / 127.5)  # targets drawn along those paths: a level or two
    student_clips(tmp_path / "two", student, vae, 4, 9, 64, 0, say=said.append, workers=2)
    assert len(said) == 4  # all kept: nothing made again


def test_a_worker_that_cannot_load_the_student_says_why(tmp_path, monkeypatch) -> None:
    """A --student that is a file but no checkpoint fails in the worker processes as it fails in this one:
    the caller sees the loader's own error, not a broken pool or advice about scripts."""
    monkeypatch.setattr(student_clips_module, "SHARD", 2)
    bad = tmp_path / "not-a-dit.safetensors"
    bad.write_bytes(b"not a checkpoint" * 64)
    vae = embedded_file("shapes", "vae")
    errors = []
    for workers in (1, 2):
        with pytest.raises(Exception) as caught:
            student_clips(tmp_path / f"w{workers}", bad, vae, 4, 9, 64, 0, say=lambda m: None, workers=workers)
        errors.append(caught.value)
    assert type(errors[1]) is type(errors[0]) and str(errors[1]) == str(errors[0])
    assert "__main__" not in str(errors[1])
    assert not list((tmp_path / "w2").glob("shard_*"))  # nothing half made


def test_a_script_without_a_main_guard_gets_told_the_fix(tmp_path) -> None:
    """Worker processes import the calling script again; one that starts the work at import kills them. The
    caller gets an error naming both ways out, not a bare BrokenProcessPool."""
    script = tmp_path / "make.py"
    script.write_text(  # shards of 2, so that 4 clips make two shards for two workers
        "from pathlib import Path\n"
        "from causvid_core.bundle import embedded_file\n"
        "import training.student_clips as m\n"
        "m.SHARD = 2\n"
        f"m.student_clips(Path({str(tmp_path / 'clips')!r}), embedded_file('shapes', 'dit'), "
        "embedded_file('shapes', 'vae'), 4, 9, 64, 0, workers=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode != 0
    assert "__main__" in done.stderr and "--student-workers 1" in done.stderr, done.stderr[-2000:]


def test_stage_fine_tunes_the_decoder_on_the_student(tmp_path) -> None:
    """``vae --decoder-only true --student embedded:shapes``: writes vae-student/final with the init's encoder
    and latent statistics, a changed decoder, and the student's loss in its log."""
    init = embedded_file("shapes", "vae")
    cfg = make_config("vae", "shapes", {
        "runs_dir": str(tmp_path), "decoder_only": "true", "init": str(init), "student": "embedded:shapes",
        "student_clips": "2", "student_batch": "1", "num_frames": "9", "clip_frames": "5", "batch_size": "1",
        "steps": "2", "lr_warmup": "1", "save_every": "2", "log_every": "1", "sample_every": "0",
        "skip_grad_norm": "1000", "mask_weight": "1"})  # fmt: skip
    assert stage_name(cfg) == "vae-student"
    rows = distill.run("vae", cfg)["rows"]
    assert all(r["student"] > 0 for r in rows)
    folder = tmp_path / "shapes" / "vae-student"
    before, after = load_file(str(init)), load_file(str(folder / "final.safetensors"))
    encoder = [k for k in before if k.startswith(("encoder.", "conv1."))]
    assert all(torch.equal(before[k].float(), after[k].float()) for k in encoder)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before if k.startswith("decoder."))
    assert (folder / "student-clips" / "shard_0000.pt").is_file()


def test_student_needs_a_decoder_fine_tune_and_a_real_file(tmp_path) -> None:
    base = {"runs_dir": str(tmp_path), "steps": "1"}
    with pytest.raises(ConfigError, match="--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {**base, "student": "embedded:shapes"}))
    init = str(embedded_file("shapes", "vae"))
    with pytest.raises(ConfigError, match="not found"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(ConfigError, match="--student-shift 0.3.*with --student"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student_shift": "0.3"}))
    with pytest.raises(ConfigError, match="--student-shift-channels '8-10:0.3'.*with --student"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student_shift_channels": "8-10:0.3"}))
    with pytest.raises(ConfigError, match="--student-shift-channels '8-10'.*CHANNELS:STD"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student": "embedded:shapes", "student_shift_channels": "8-10"}))
    with pytest.raises(ConfigError, match="--student-workers -1"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student": "embedded:shapes", "student_workers": "-1"}))
    with pytest.raises(ConfigError, match="--student-smooth -1"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student": "embedded:shapes", "student_smooth": "-1"}))
    for frames, why in (("8", "1 \\+ 4k"), ("-1", "1 \\+ 4k"), ("37", "up to the clip's --num-frames 33")):
        with pytest.raises(ConfigError, match=f"--student-frames {frames}: .*{why}"):
            distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                             "student": "embedded:shapes", "student_frames": frames}))
    with pytest.raises(ConfigError, match="--student-frames 17: .*with --student"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student_frames": "17"}))
    with pytest.raises(ConfigError, match="--student-clips 0"):
        distill.run("vae", make_config("vae", "shapes", {**base, "decoder_only": "true", "init": init,
                                                         "student": "embedded:shapes", "student_clips": "0"}))


def test_student_shift_channels_give_the_colour_channels_their_own_offsets() -> None:
    """'0-2:0.3,8-10:0.3' over --student-shift 0: offsets on the colour channels only, none on the shape code."""
    sizes = shift_sizes("0-2:0.3,8-10:0.3", 0.0, 16, "--student-shift-channels")
    assert [i for i, s in enumerate(sizes) if s] == [0, 1, 2, 8, 9, 10] and max(sizes) == 0.3
    assert shift_sizes("", 0.1, 16, "--student-shift-channels") == [0.1] * 16


def test_student_offsets_reach_the_stage_channel_by_channel(tmp_path) -> None:
    """The stage offsets the student's latents as asked: '0-15:0' over --student-shift 0.5 is no offset at all
    (the step's student loss is the unshifted one, bit for bit), --student-shift 0.5 alone changes it."""
    init = str(embedded_file("shapes", "vae"))

    def student_loss(name: str, extra: dict[str, str]) -> float:
        cfg = make_config("vae", "shapes", {
            "runs_dir": str(tmp_path), "name": name, "decoder_only": "true", "init": init,
            "student": "embedded:shapes", "student_clips": "1", "student_batch": "1", "num_frames": "9",
            "clip_frames": "5", "batch_size": "1", "steps": "1", "lr_warmup": "1", "save_every": "1",
            "log_every": "1", "sample_every": "0", "skip_grad_norm": "1000", "mask_weight": "1", **extra})  # fmt: skip
        return distill.run("vae", cfg)["rows"][0]["student"]

    plain = student_loss("plain", {})
    assert student_loss("spared", {"student_shift": "0.5", "student_shift_channels": "0-15:0"}) == plain
    assert student_loss("shifted", {"student_shift": "0.5"}) != plain
    # --student-frames: a window of the clip; all 9 frames of a 9-frame clip is the whole clip, bit for bit
    assert student_loss("all", {"student_frames": "9"}) == plain
    assert student_loss("start", {"student_frames": "5"}) != plain


@pytest.mark.parametrize("start", [0, 1, 3])
def test_a_student_window_is_drawn_as_the_whole_clip_draws_it(start: int) -> None:
    """--student-frames: a window of latent frames, the decoder primed on the ones before it, gives the frames of
    the whole clip's decode at that place (the first latent frame gives one frame, the others four each) and the
    target frames that match them, so a window anywhere teaches what the whole clip would."""
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    z = torch.randn(1, vae.z_dim, 6, 4, 4)
    video = torch.arange(21, dtype=torch.float32).view(1, 1, 21, 1, 1).expand(1, 3, 21, 32, 32)
    with torch.no_grad():
        whole = reconstruct(vae, z)
        drawn, target = stream_window(vae, z, video, start, 2)
    first = 0 if start == 0 else 1 + 4 * (start - 1)
    assert drawn.shape[2] == (5 if start == 0 else 8) == target.shape[2]
    torch.testing.assert_close(drawn, whole[:, :, first : first + drawn.shape[2]], atol=1e-5, rtol=1e-4)
    assert target[0, 0, :, 0, 0].tolist() == list(range(first, first + drawn.shape[2]))
