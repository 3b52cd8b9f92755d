"""``python -m causvid_core render`` / ``generate``: a file with every frame, SIGKILL + --resume, guards."""

from __future__ import annotations

import errno
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.bundle import embedded_file, load_bundle
from causvid_core.checkpoint import load_model
from causvid_core.cli import main
from causvid_core.kv_cache import KVCache, format_bytes
from causvid_core.resume import load_sidecar, sidecar_path
from causvid_core.video_io import VideoWriter, probe_video, psnr, read_video
from tests.helpers import vae_round_trip

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle moving right"


pytestmark = pytest.mark.usefixtures("one_thread")


class FullDisk(VideoWriter):
    """A disk that fills up after 21 frames: chunk 2 on."""

    def write(self, frames):
        if self.frames_written >= 21:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(frames)


def stop_on_full_disk(monkeypatch, env: dict[str, str], argv: list[str]) -> None:
    """Run a render that a full disk stops after two chunks (exit 2), then give the real writer back."""
    monkeypatch.setattr("causvid_core.resume.VideoWriter", FullDisk)
    assert main(argv) == 2
    monkeypatch.undo()
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", env["CAUSVID_EMBEDDED_PATH"])


def render_args(out: Path, *extra: str, frames: int = 33) -> list[str]:
    return ["render", "--model", "embedded:shapes", "--prompt", PROMPT, "--frames", str(frames), "--seed", "0",
            "--out", str(out), "--width", "32", "--height", "32", "--device", "cpu", *extra]  # fmt: skip


def test_generate_writes_every_frame_and_prints_its_speed(env, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.mp4"
    argv = [
        "generate",
        "--prompt",
        PROMPT,
        "--seconds",
        "2",
        "--seed",
        "0",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    info = probe_video(out)
    assert info.frames == 32 and (info.width, info.height) == (64, 64)  # 2 s at 16 fps; the model's size
    assert re.search(r"time to first frame: \d+\.\d\d s", printed.out)
    assert re.search(r"frames per second: \d+\.\d", printed.out)
    assert re.search(r"3/3 chunks +\d+\.\d fps +eta +0 s", printed.err)  # 9 latent frames = 3 chunks
    assert not sidecar_path(out).exists()
    # before it starts, the render says what it will hold: the model's weights and its KV cache
    model, _ = load_model(embedded_file("shapes", "dit"), dtype="float32")
    cache = KVCache.estimate_bytes(model.config, load_bundle("embedded:shapes").causal, 1, 8, 8, torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert f"memory: weights {format_bytes(weights)} on cpu; KV cache {format_bytes(cache)}: " in printed.out


def test_a_kv_cache_larger_than_the_free_memory_stops_before_any_file(env, tmp_path, capsys, monkeypatch) -> None:
    """Where the device can tell its free memory (CUDA), a cache that would not fit stops the render with its
    size, the per-chunk cost of the window and the fixes, before a file is written (faked here on the CPU)."""
    import causvid_core.kv_cache as kv

    monkeypatch.setattr(kv, "free_bytes", lambda device: 10_000)  # the tiny model's cache is 36 KB
    out = tmp_path / "sub" / "out.mp4"
    assert main(render_args(out)) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: KV cache 36.0 KB: 1 sink \+ 2 window chunks of 3 latent frames at 4x4 latents, "
                     r"2 layers, float32, but 9.8 KB of cpu is free\. Lower the window \(each window chunk holds "
                     r"12.0 KB; the sink stays\)", err), err  # fmt: skip
    assert not (tmp_path / "sub").exists()


def test_the_readme_command_writes_where_it_is_run(env, tmp_path: Path) -> None:
    """The README's main command, ``bash scripts/generate.sh ... --out out.mp4``, run from another folder: the
    file lands in that folder (a relative --out is the caller's, not the checkout's) and the script reuses the
    environment it finds in $CAUSVID_CACHE (here the one running the tests)."""
    prefix = Path(sys.prefix)
    if prefix.name != "venv":
        pytest.skip("the suite runs outside scripts/test.sh's environment ($CAUSVID_CACHE/venv)")
    run = tmp_path / "elsewhere"
    run.mkdir()
    cmd = ["bash", str(REPO / "scripts" / "generate.sh"), "--model", "embedded:shapes", "--prompt", PROMPT,
           "--seconds", "1", "--seed", "0", "--out", "clips/out.mp4", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, cwd=run, env={**env, "CAUSVID_CACHE": str(prefix.parent)}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert probe_video(run / "clips" / "out.mp4").frames == 16  # 1 s at 16 fps, in the caller's folder
    assert not (REPO / "clips").exists()
    assert re.search(r"time to first frame: \d+\.\d\d s", done.stdout)


def test_sigkill_mid_render_leaves_finished_chunks_and_resume_finishes(env, tmp_path: Path, capsys) -> None:
    frames = 1 + 4 * (3 * 40 - 1)  # 40 chunks: 9 frames, then 12 per chunk
    assert main(render_args(tmp_path / "ref.mp4", "--quiet", frames=frames)) == 0
    out = tmp_path / "killed.mp4"
    cmd = [sys.executable, "-m", "causvid_core", *render_args(out, "--quiet", frames=frames)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if load_sidecar(sidecar_path(out)).chunks_done >= 2:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = load_sidecar(sidecar_path(out))
    assert 2 <= done.chunks_done < 40
    kept = read_video(out)  # opens with PyAV
    # every finished chunk but the very last frame, which the mp4 muxer writes when the next frame comes
    # (the sidecar keeps its pixels); plus a whole chunk if the kill fell between its write and its commit
    committed = done.segments[0][1]
    assert committed == done.frames_written - 1 and done.pending is not None
    assert len(kept) in (committed, committed + 12)
    ref = read_video(tmp_path / "ref.mp4")
    assert np.array_equal(kept, ref[: len(kept)])

    assert main(["render", "--resume", str(out), "--device", "cpu", "--quiet"]) == 0
    final = read_video(out)
    assert len(final) == frames and not sidecar_path(out).exists()
    assert np.array_equal(final[:committed], ref[:committed])
    assert psnr(final, ref) > 35  # the resumed segment is encoded afresh (it starts on a keyframe)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--width", "40"], r"width 40 is not a multiple of 16; use 32 or 48"),
        (["--frames", "5"], r"length \(5 frames\) is below one chunk.*at least 9 frames"),
        (["--model", "missing/dit.safetensors"], r"model missing/dit\.safetensors not found \(known: embedded:shapes"),
        (["--vae", "missing/vae.pth"], r"VAE file missing/vae\.pth not found"),
        (["--prompt", "a purple circle"], r"unknown word 'purple'"),
        (["--speed", "ring,turbo"], r"unknown speed options \['turbo'\]: choose from ring, fused_qkv"),
        (["--frames", "0"], r"length must be at least 1 frame, got 0"),
        (["--fps", "0"], r"--fps must be a positive number"),
        (["--device", "foo"], r"--device 'foo' is not a device: use auto, cpu, cuda or cuda:N"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_its_message_and_no_file(env, tmp_path, capsys, change, message) -> None:
    out = tmp_path / "sub" / "out.mp4"
    args = render_args(out)
    for i in range(0, len(change), 2):  # replace the option's value
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "sub").exists()


def test_existing_output_needs_overwrite_and_parents_are_created(env, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a" / "b" / "out.mp4"
    assert main(render_args(out, "--quiet")) == 0 and probe_video(out).frames == 33
    stamp = out.stat().st_mtime_ns
    assert main(render_args(out, "--quiet")) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert main(render_args(out, "--quiet", "--overwrite", frames=21)) == 0 and probe_video(out).frames == 21


def test_resume_needs_an_interrupted_render(env, tmp_path: Path, capsys) -> None:
    assert main(["render", "--resume", str(tmp_path / "none.mp4")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["render", "--prompt", PROMPT, "--seconds", "1"]) == 2
    assert "render needs --model, --out" in capsys.readouterr().err


def test_full_disk_exits_2_and_resume_finishes(env, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out.mp4"
    stop_on_full_disk(monkeypatch, env, render_args(out, "--quiet"))
    assert re.search(
        r"error: the disk holding .* is full: stopped after 2 of 3 chunks \(21 frames",
        capsys.readouterr().err,
    )
    assert probe_video(out).frames == 21 and sidecar_path(out).exists()
    assert main(["render", "--resume", str(sidecar_path(out)), "--device", "cpu", "--quiet"]) == 0
    assert probe_video(out).frames == 33


def test_h265_render_stopped_and_resumed_is_one_hevc_file(env, tmp_path: Path, capsys, monkeypatch) -> None:
    import av

    out = tmp_path / "out.mp4"
    stop_on_full_disk(monkeypatch, env, render_args(out, "--quiet", "--codec", "h265"))
    assert main(["render", "--resume", str(out), "--device", "cpu", "--quiet"]) == 0
    with av.open(str(out)) as f:  # joined from two parts, still HEVC tagged for Apple's players
        assert f.streams.video[0].codec_context.name == "hevc" and f.streams.video[0].codec_tag == "hvc1"
    assert probe_video(out).frames == 33
    straight = tmp_path / "straight.mp4"
    assert main(render_args(straight, "--quiet", "--codec", "h265")) == 0
    assert psnr(read_video(out), read_video(straight)) > 35  # the same frames; the second part coded apart


def test_speed_options_render_the_reference_video(env, tmp_path: Path) -> None:
    """``--speed ring,fused_qkv`` writes the video the reference path writes, past the first eviction
    (5 chunks, sink 1 + window 2): fp32 differences of 1e-6 leave the encoded pixels the same up to a
    rare rounding step (measured: identical; another seed scores ~18 dB)."""
    ref, fast = tmp_path / "ref.mp4", tmp_path / "fast.mp4"
    assert main(render_args(ref, "--quiet", frames=57)) == 0
    assert main(render_args(fast, "--quiet", "--speed", "ring,fused_qkv", frames=57)) == 0
    a, b = read_video(ref), read_video(fast)
    assert len(a) == len(b) and psnr(a, b) > 45


def test_a_training_checkpoint_renders_with_its_shapes_text_encoder(env, embedded_root: Path, tmp_path: Path,
                                                                   capsys) -> None:  # fmt: skip
    """A Shapes student straight from training/ (a bare checkpoint, no text encoder of its own) renders with
    the embedded model's text.safetensors as --text-encoder; without one the error names both kinds."""
    folder = embedded_root / "shapes"
    out = tmp_path / "ckpt.mp4"
    base = ["render", "--model", str(folder / "dit.safetensors"), "--vae", str(folder / "vae.safetensors"),
            "--prompt", PROMPT, "--frames", "9", "--out", str(out), "--width", "32", "--height", "32",
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(base) == 2
    assert re.search(r"no text encoder of its own: pass --text-encoder umt5\.safetensors.*text\.safetensors",
                     capsys.readouterr().err)  # fmt: skip
    assert not out.exists()
    assert main([*base, "--text-encoder", str(folder / "text.safetensors")]) == 0
    same = tmp_path / "embedded.mp4"  # the same weights named as embedded:shapes: the same video
    assert main(render_args(same, "--quiet", frames=9)) == 0
    assert probe_video(out).frames == 9 and np.array_equal(read_video(out), read_video(same))


def test_a_schedule_file_changes_the_prompt_at_its_chunk(env, tmp_path: Path) -> None:
    """README's long-video command: ``render --schedule FILE``. Until the change the video is the first
    prompt's own; after it, another; ``--blend`` fades the change in instead of cutting."""
    schedule = tmp_path / "prompts.txt"
    schedule.write_text(f"0: {PROMPT}\n1: a blue square moving left on a white background\n")
    plain, cut, blended = tmp_path / "plain.mp4", tmp_path / "cut.mp4", tmp_path / "blend.mp4"
    assert main(render_args(plain, "--quiet")) == 0
    args = ["render", "--model", "embedded:shapes", "--schedule", str(schedule), "--schedule-unit", "chunk",
            "--frames", "33", "--seed", "0", "--width", "32", "--height", "32", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(cut)]) == 0
    assert main([*args, "--blend", "2", "--out", str(blended)]) == 0
    a, b, c = read_video(plain), read_video(cut), read_video(blended)
    assert len(a) == len(b) == len(c) == 33
    assert psnr(a[:9], b[:9]) > 45  # chunk 0 (9 frames): the first prompt's video
    assert psnr(a[9:], b[9:]) < 40  # chunks 1-2: the second prompt's
    assert psnr(b[:9], c[:9]) > 45 and psnr(b[9:], c[9:]) < 40  # blended over two chunks, not cut


def test_a_render_started_with_relative_paths_resumes_from_any_folder(env, embedded_root: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:  # fmt: skip
    """--resume ignores every other option, so the sidecar must name the model and VAE files absolutely."""
    from causvid_core import cli

    monkeypatch.chdir(embedded_root)
    out = tmp_path / "rel.mp4"
    args = ["render", "--model", "shapes/dit.safetensors", "--vae", "shapes/vae.safetensors", "--text-encoder",
            "shapes/text.safetensors", "--prompt", PROMPT, "--frames", "33", "--out", str(out), "--width", "32",
            "--height", "32", "--device", "cpu", "--quiet"]  # fmt: skip
    update = cli._ProgressBar.update

    def stop_after_first(self, done, frames):
        update(self, done, frames)
        if done >= 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli._ProgressBar, "update", stop_after_first)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    settings = load_sidecar(sidecar_path(out)).settings
    assert all(Path(settings[k]).is_absolute() for k in ("model", "vae", "text_encoder"))
    monkeypatch.undo()
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(embedded_root))
    monkeypatch.chdir(tmp_path)
    assert main(["render", "--resume", str(out), "--device", "cpu", "--quiet"]) == 0
    assert probe_video(out).frames == 33 and not sidecar_path(out).exists()


def test_image_to_video_starts_from_the_picture_and_resumes(env, tmp_path: Path, capsys, monkeypatch) -> None:
    """--image: the video's first frame is the picture (cover-resized and centre-cropped to 32x32, through the
    VAE); the length counts it. A render stopped by a full disk resumes to the frames of one that was not."""
    from PIL import Image

    from causvid_core.video_io import fit_frames

    rng = np.random.default_rng(0)
    picture = (rng.random((24, 48, 3)) * 255).astype(np.uint8)  # 2:1, so the sides are cropped
    Image.fromarray(picture).save(tmp_path / "first.png")
    straight = tmp_path / "straight.mp4"
    assert main(render_args(straight, "--quiet", "--image", str(tmp_path / "first.png"))) == 0
    video = read_video(straight)
    assert video.shape == (33, 32, 32, 3)
    expected = vae_round_trip(fit_frames(picture[None], 32, 32))[0]
    assert psnr(video[0], expected) > 30 and psnr(video[0], video[5]) < psnr(video[0], expected) - 5

    stopped = tmp_path / "stopped.mp4"
    stop_on_full_disk(monkeypatch, env, render_args(stopped, "--quiet", "--image", str(tmp_path / "first.png")))
    Image.fromarray(picture[::-1].copy()).save(tmp_path / "first.png")  # another picture under the same name
    capsys.readouterr()
    assert main(["render", "--resume", str(stopped), "--device", "cpu", "--quiet"]) == 2
    assert re.search(r"stopped.mp4 was started with other settings \(context '\w+' -> '\w+'\)", capsys.readouterr().err)
    Image.fromarray(picture).save(tmp_path / "first.png")
    assert main(["render", "--resume", str(stopped), "--device", "cpu", "--quiet"]) == 0
    assert psnr(read_video(stopped), video) > 40


def test_extend_continues_a_video_from_its_last_frames(env, tmp_path: Path, capsys) -> None:
    """--extend: the new file opens with the source's last frames that the KV cache holds (the test model:
    sink 1 + window 2 chunks of 3 latent frames = 9 latent frames = 33 video frames), re-decoded, and goes on
    for --frames more."""
    source = tmp_path / "source.mp4"
    assert main(render_args(source, "--quiet", "--seed", "5", frames=45)) == 0
    out = tmp_path / "longer.mp4"
    assert main(render_args(out, "--extend", str(source), frames=24)) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "57 frames" in printed  # 33 continued + 24 new
    video, src = read_video(out), read_video(source)
    assert video.shape[0] == 57
    # the context is the source's tail, encoded: exactly what the job holds, and what opens the file
    from causvid_core.cli import _render_settings, build_job, build_parser
    from causvid_core.vae import load_wan_vae

    args = build_parser().parse_args(render_args(tmp_path / "again.mp4", "--extend", str(source), frames=24))
    job = build_job(_render_settings(args), tmp_path / "again.mp4", device="cpu")
    vae = load_wan_vae(embedded_file("shapes", "vae"))

    def encoded(frames: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)

    assert torch.equal(job.context_latents, encoded(src[-33:]))
    assert not torch.allclose(job.context_latents, encoded(src[:33]), atol=1e-3)
    with VideoWriter(tmp_path / "round_trip.mp4", fps=16, crf=18) as writer:  # the same H.264 coding
        writer.write(vae_round_trip(src[-33:]))
    assert psnr(video[:33], read_video(tmp_path / "round_trip.mp4")) > 28
    capsys.readouterr()
    assert main(render_args(tmp_path / "short.mp4", "--extend", str(source), frames=5)) == 2
    assert "the continuation (5 frames) is below one chunk: ask for at least 12 frames" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "file", "message"),
    [
        ("--image", "missing.png", r"--image file .*missing\.png not found"),
        ("--extend", "missing.mp4", r"--extend file .*missing\.mp4 not found"),
        ("--image", "notes.png", r"cannot decode notes\.png"),
    ],
)  # fmt: skip
def test_bad_start_files_exit_2_before_any_output(env, tmp_path, capsys, option, file, message) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    out = tmp_path / "sub" / "out.mp4"
    assert main(render_args(out, option, str(tmp_path / file))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "sub").exists()


def test_colour_anchor_holds_the_colours_to_the_start_and_resumes(env, tmp_path: Path, capsys, monkeypatch) -> None:
    """Every render reports its colour drift; --colour-anchor 1 writes chunks whose mean colours are those of
    the first chunk (the test model drifts freely), and a stopped anchored render resumes to the same frames."""

    def chunk_means(video: np.ndarray) -> np.ndarray:  # mean colour of each chunk: 9 frames, then 12 each
        bounds = [0, 9, 21, 33, 45, 57, 65]
        return np.stack([video[a:b].reshape(-1, 3).mean(0) for a, b in zip(bounds, bounds[1:], strict=False)])

    free, held = tmp_path / "free.mp4", tmp_path / "held.mp4"
    assert main(render_args(free, "--quiet", frames=65)) == 0
    assert re.search(r"colour drift against the start \(0-255\): largest shift [\d.]+ \(chunk \d\)", capsys.readouterr().out)
    assert main(render_args(held, "--quiet", "--colour-anchor", "1", frames=65)) == 0
    assert "anchored at strength 1" in capsys.readouterr().out
    drift_free = np.abs(chunk_means(read_video(free))[1:] - chunk_means(read_video(free))[0]).max()
    drift_held = np.abs(chunk_means(read_video(held))[1:] - chunk_means(read_video(held))[0]).max()
    assert drift_free > 3 and drift_held < 2.0, (drift_free, drift_held)

    stopped = tmp_path / "stopped.mp4"
    stop_on_full_disk(monkeypatch, env, render_args(stopped, "--quiet", "--colour-anchor", "1", frames=65))
    assert main(["render", "--resume", str(stopped), "--device", "cpu", "--quiet"]) == 0
    assert psnr(read_video(stopped), read_video(held)) > 40
    assert main(render_args(tmp_path / "bad.mp4", "--colour-anchor", "2")) == 2
    assert "colour anchor strength must be between 0 (off) and 1 (matched), got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad.mp4").exists()


def test_extend_at_rerenders_from_a_time_of_the_video(env, tmp_path: Path, capsys) -> None:
    """--extend-at T continues from the frames before T (re-rendering the rest with another seed or prompt):
    the context is the 1 + 4k frames before T that the cache holds; errors for a time past the end, or
    without --extend."""
    from causvid_core.cli import _render_settings, build_job, build_parser

    source = tmp_path / "source.mp4"
    assert main(render_args(source, "--quiet", frames=65)) == 0  # 4.06 s at 16 fps
    args = build_parser().parse_args(render_args(tmp_path / "x.mp4", "--extend", str(source), "--extend-at", "3"))
    job = build_job(_render_settings(args), tmp_path / "x.mp4", device="cpu")
    src = read_video(source)
    from causvid_core.vae import load_wan_vae

    vae = load_wan_vae(embedded_file("shapes", "vae"))
    with torch.no_grad():  # frames 15..47: the 33 before 3 s (48 frames at 16 fps)
        want = vae.encode(torch.from_numpy(src[15:48]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    assert torch.equal(job.context_latents, want)
    out = tmp_path / "again.mp4"
    assert main(render_args(out, "--quiet", "--extend", str(source), "--extend-at", "3", "--seed", "9", frames=24)) == 0
    assert probe_video(out).frames == 57
    assert main(render_args(tmp_path / "late.mp4", "--extend", str(source), "--extend-at", "9")) == 2
    assert re.search(r"--extend-at 9.0: source.mp4 ends before that \(4.06 s at 16 fps\)", capsys.readouterr().err)
    assert main(render_args(tmp_path / "alone.mp4", "--extend-at", "2")) == 2
    assert "--extend-at needs --extend VIDEO" in capsys.readouterr().err
    assert not (tmp_path / "late.mp4").exists() and not (tmp_path / "alone.mp4").exists()


def test_a_schedule_counts_its_times_from_the_image_seed_as_the_nodes_do(env, tmp_path: Path) -> None:
    """With --image, schedule times count from the picture (frame 0): a switch at 2 s lands on chunk 2, as in the
    Render Video node, not chunk 3 as it would with nothing before the first generated chunk."""
    from PIL import Image

    from causvid_core.cli import _render_settings, build_job, build_parser

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "first.png")
    (tmp_path / "s.txt").write_text(f"0: {PROMPT}\n2: a blue square moving left\n")
    argv = render_args(tmp_path / "x.mp4", "--image", str(tmp_path / "first.png"), frames=65)
    argv[argv.index("--prompt") : argv.index("--prompt") + 2] = ["--schedule", str(tmp_path / "s.txt")]
    job = build_job(_render_settings(build_parser().parse_args(argv)), tmp_path / "x.mp4", device="cpu")
    assert sorted(job.timeline.changes) == [0, 2]
