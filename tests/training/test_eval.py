"""The evaluator CLI: ground truth scores near 100, mp4 folders are read and scored, drift is plotted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from training.eval import evaluate, main
from training.shapes import render_video

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("text_alignment", "temporal_quality", "frame_quality")


def write_mp4(path: Path, video: np.ndarray, fps: int = 16) -> None:
    """Near-lossless H.264 (yuv444p, crf 0) so the colours survive."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv444p"
        stream.options = {"crf": "0"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_ground_truth_cli_writes_json_with_figures_near_100(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gt.json"
    main(["--ground-truth", "6", "--seconds", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["videos"]) == 6
    for key in FIGURES:
        assert result["summary"][key] >= 95, (key, result["summary"])
    assert "MEAN" in capsys.readouterr().out


def test_an_evaluation_stopped_part_way_keeps_the_videos_it_finished(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long evaluation (2-minute drift videos take minutes each) reports each video as it finishes and
    keeps the finished ones in --json, marked partial, when stopped; a complete run is not marked."""
    import training.eval as ev

    calls = {"n": 0}

    def render_then_stop(prompt: str, seed: int, num_frames: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return render_video(prompt, seed, num_frames)

    monkeypatch.setattr(ev, "render_video", render_then_stop)
    out = tmp_path / "gt.json"
    out.write_text('{"summary": {"text_alignment": 1.0}, "videos": []}')  # an earlier complete result
    with pytest.raises(KeyboardInterrupt):
        main(["--ground-truth", "4", "--seconds", "1", "--json", str(out)])
    kept = json.loads((tmp_path / "gt.partial.json").read_text())
    assert kept["partial"] is True and [v["name"] for v in kept["videos"]] == ["000_seed0", "001_seed1"]
    assert kept["summary"]["text_alignment"] >= 95
    assert json.loads(out.read_text())["summary"]["text_alignment"] == 1.0  # not replaced by a partial run
    err = capsys.readouterr().err
    assert "[1/4] 000_seed0" in err and "[2/4] 001_seed1" in err

    monkeypatch.setattr(ev, "render_video", render_video)
    main(["--ground-truth", "2", "--seconds", "1", "--json", str(out)])
    assert "partial" not in json.loads(out.read_text()) and not (tmp_path / "gt.partial.json").exists()
    with pytest.raises(ValueError, match=r"--drift .*plot.txt: the plot is a PNG"):
        main(["--ground-truth", "1", "--seconds", "1", "--drift", str(tmp_path / "plot.txt")])
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match=r"bad.json is not a JSON file of training.eval"):
        main(["--paired", str(out), str(tmp_path / "bad.json")])


def test_compare_draws_each_runs_drift_curves_and_names_a_missing_drift(tmp_path: Path) -> None:
    """Figure 8 in miniature: --compare draws the per-window curves of earlier --drift runs, one line per
    run in each of the three panels; a run scored without --drift is refused with the fix."""
    from PIL import Image

    from training.eval import MODEL_COLOURS

    for name, seed in (("a", "0"), ("b", "5")):
        main(["--ground-truth", "2", "--seconds", "10", "--seed", seed, "--json", str(tmp_path / f"{name}.json"),
              "--drift", str(tmp_path / f"{name}.png")])  # fmt: skip
    out = tmp_path / "cmp.png"
    result = main(["--compare", f"{tmp_path / 'a.json'}=first", str(tmp_path / "b.json"), "--drift", str(out)])
    assert list(result["compare"]) == ["first", "b"] and len(result["compare"]["b"]) == 2
    img = np.asarray(Image.open(out).convert("RGB"))
    third = img.shape[1] // 3
    for panel in range(3):  # every panel holds both runs' lines
        part = img[:, panel * third : (panel + 1) * third].reshape(-1, 3)
        for colour in MODEL_COLOURS[:2]:
            assert (np.abs(part.astype(int) - colour).sum(1) == 0).any(), (panel, colour)
    main(["--ground-truth", "1", "--seconds", "2", "--json", str(tmp_path / "flat.json")])
    with pytest.raises(SystemExit, match="no per-window figures; evaluate with --drift"):
        main(["--compare", str(tmp_path / "flat.json"), "--drift", str(out)])
    with pytest.raises(SystemExit, match="--compare needs --drift PNG"):
        main(["--compare", str(tmp_path / "a.json")])


def test_paired_differences_of_two_runs_on_the_same_prompts(tmp_path: Path, capsys) -> None:
    """--paired BASE NEW: per figure both means over the shared videos, new - base and its standard error;
    runs on other prompts are refused with the fix."""
    from training.eval import evaluate, paired_difference

    prompts = ["a red circle moving right", "a blue square moving up", "a green triangle moving left"]

    def frozen(prompt: str, seed: int, frames: int) -> np.ndarray:  # squares and triangles never move
        video = render_video(prompt, seed, frames)
        return video if "circle" in prompt else np.repeat(video[:1], frames, axis=0)

    base = evaluate(render_video, prompts, [0, 1, 2], 1.0)
    new = evaluate(frozen, prompts, [0, 1, 2], 1.0)
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = main(["--paired", str(tmp_path / "base.json"), str(tmp_path / "new.json"),
                   "--json", str(tmp_path / "paired.json")])["paired"]  # fmt: skip
    temporal = result["temporal_quality"]
    assert temporal["videos"] == 3 and temporal["base"] > 90 and temporal["new"] < 60
    pairs = zip(base["videos"], new["videos"], strict=True)
    want = np.array([n["temporal_quality"] - b["temporal_quality"] for b, n in pairs])
    assert want[0] == 0 and want[1] < -50  # the circle is unchanged; the square frozen
    assert temporal["difference"] == pytest.approx(want.mean())
    assert temporal["standard_error"] == pytest.approx(want.std(ddof=1) / np.sqrt(3)) and temporal["standard_error"] > 10
    assert result["colour_accuracy"]["difference"] == pytest.approx(0.0, abs=1e-9)  # the frames are right
    assert json.loads((tmp_path / "paired.json").read_text())["paired"]["temporal_quality"] == temporal
    assert "temporal_quality" in capsys.readouterr().out
    other = evaluate(render_video, ["a red circle moving down"], [0], 1.0)
    with pytest.raises(ValueError, match="different prompts in the two runs.*same --seed"):
        paired_difference(base, other)
    with pytest.raises(ValueError, match="share no video"):
        paired_difference(base, {"videos": [{**other["videos"][0], "name": "999_seed9"}]})
    with pytest.raises(FileNotFoundError, match="write it with python -m training.eval"):
        main(["--paired", str(tmp_path / "base.json"), str(tmp_path / "missing.json")])


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "gt.json"
    cmd = [sys.executable, "-m", "training.eval", "--ground-truth", "2", "--seconds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["summary"]["temporal_quality"] >= 95


def test_videos_folder_with_csv_prompts_is_scored_and_drift_plotted(tmp_path: Path) -> None:
    prompts = {
        "a.mp4": "a red circle moving right",
        "b.mp4": "a blue triangle moving up on a white background",
    }
    for i, (name, prompt) in enumerate(prompts.items()):
        write_mp4(tmp_path / name, render_video(prompt, i, 160))
    (tmp_path / "prompts.csv").write_text("file,prompt\n" + "".join(f"{k},{v}\n" for k, v in prompts.items()))
    png = tmp_path / "drift.png"
    result = main(["--videos", str(tmp_path), "--drift", str(png), "--json", str(tmp_path / "r.json")])
    assert [v["name"] for v in result["videos"]] == ["a.mp4", "b.mp4"]
    for key in FIGURES:
        assert result["summary"][key] >= 90, (key, result["summary"])
    assert len(result["drift"]) == 2 and result["drift"][1]["start_s"] == 5.0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_videos_folder_errors_name_the_missing_piece(tmp_path: Path) -> None:
    write_mp4(tmp_path / "a.mp4", render_video("a red circle moving right", 0, 4))
    with pytest.raises(FileNotFoundError, match="no prompts.json or prompts.csv"):
        main(["--videos", str(tmp_path)])
    (tmp_path / "prompts.json").write_text(json.dumps({"b.mp4": "a red circle moving right"}))
    with pytest.raises(FileNotFoundError, match="b.mp4"):
        main(["--videos", str(tmp_path)])
    (tmp_path / "prompts.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="without a prompt.*a.mp4"):
        main(["--videos", str(tmp_path)])
    # on the command line the same mistakes are one line, not a traceback
    cmd = [sys.executable, "-m", "training.eval", "--videos", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --videos ") and "missing: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_calls_the_generator_per_prompt_and_seed() -> None:
    calls = []

    def blank(prompt: str, seed: int, num_frames: int) -> np.ndarray:
        calls.append((prompt, seed, num_frames))
        return np.zeros((num_frames, 64, 64, 3), dtype=np.uint8)

    prompts = ["a red circle moving right", "a cyan square moving down"]
    result = evaluate(blank, prompts, [3, 4], seconds=1.5)
    assert calls == [(prompts[0], 3, 24), (prompts[1], 4, 24)]
    assert result["summary"]["temporal_quality"] == 0 and result["summary"]["text_alignment"] == 0
    with pytest.raises(ValueError, match="one seed per prompt"):
        evaluate(blank, prompts, [3], seconds=1)
