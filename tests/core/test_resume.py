"""Resumable renders: interrupt, resume, identical latents and frames; guards; flat memory on a long render."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.bundle import embedded_file, load_bundle
from causvid_core.pipeline import (
    NonFiniteLatentsError,
    PromptTimeline,
    RenderRequest,
    encode_schedule,
    to_uint8_frames,
)
from causvid_core.resume import (
    HISTORY_SUFFIX,
    DiskFullError,
    RenderJob,
    load_sidecar,
    render_to_file,
    sidecar_path,
)
from causvid_core.vae import VAEConfig, WanVAE, load_wan_vae
from causvid_core.video_io import VideoWriter, probe_video, read_video
from tests.helpers import make_embedded

SIZE = 32
PROMPT = "a red circle moving right"
SWITCH = "0: a red circle moving right\n5: a blue square moving left"  # unit chunk: switches at chunk 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    make_embedded(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAUSVID_EMBEDDED_PATH", str(root))
        bundle = load_bundle("embedded:testshapes")
        vae = load_wan_vae(embedded_file("testshapes", "vae"))
    return bundle, vae


def make_job(parts, out: Path, *, frames: int = 81, seed: int = 0, schedule: str | None = None) -> RenderJob:
    """A fresh job (new decoder, new timeline objects) as a new process would build it."""
    bundle, vae = parts
    request = RenderRequest(SIZE, SIZE, frames, seed=seed, fps=bundle.fps)
    encode = lambda p: bundle.text_encoder.encode([p])  # noqa: E731
    if schedule:
        timeline = encode_schedule(schedule, "chunk", encode).timeline(bundle.fps, bundle.causal)
    else:
        timeline = PromptTimeline.single(encode(PROMPT))
    return RenderJob(bundle.model, vae, timeline, request, out, sampling=bundle.sampling, causal=bundle.causal,
                     settings={"model": "embedded:testshapes"})  # fmt: skip


class Recorder:
    """on_chunk that keeps each chunk's latents and uint8 frames, and can stop after chunk ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.latents, self.frames = stop, [], []

    def __call__(self, event) -> None:
        self.latents.append(event.latents.detach().cpu().clone())
        self.frames.append(to_uint8_frames(event.frames))
        if event.index == self.stop:
            raise KeyboardInterrupt


def reference(parts, tmp_path: Path, **kw) -> Recorder:
    rec = Recorder()
    render_to_file(make_job(parts, tmp_path / "ref.mp4", **kw), on_chunk=rec)
    return rec


def interrupted(parts, out: Path, stop: int, **kw) -> Recorder:
    rec = Recorder(stop)
    with pytest.raises(KeyboardInterrupt):
        render_to_file(make_job(parts, out, **kw), on_chunk=rec)
    return rec


@pytest.mark.parametrize(
    ("stop", "schedule", "limit"),
    [
        (1, None, None),  # before any chunk left the window (sink 1 + window 2)
        (4, None, None),  # after eviction: chunks 1 and 2 have left the cache
        (3, SWITCH, None),  # the prompt switches at chunk 5, after the interrupt
        (4, SWITCH, 0),  # decoder caches not stored: latents still exact
    ],
    ids=["early", "evicted", "schedule-switch-after", "decoder-rewarm"],
)
def test_resume_continues_byte_identically(parts, tmp_path: Path, stop, schedule, limit) -> None:
    ref = reference(parts, tmp_path, schedule=schedule)
    out = tmp_path / "video.mp4"
    first = interrupted(parts, out, stop, schedule=schedule)
    assert sidecar_path(out).is_file() and load_sidecar(sidecar_path(out)).chunks_done == stop + 1
    assert probe_video(out).frames == sum(f.shape[0] for f in first.frames)  # playable, finished chunks only

    rest = Recorder()
    kw = {} if limit is None else {"decoder_state_limit": limit}
    state = render_to_file(make_job(parts, out, schedule=schedule), resume=True, on_chunk=rest, **kw)
    latents = first.latents + rest.latents
    assert len(latents) == len(ref.latents) == 7
    assert all(torch.equal(a, b) for a, b in zip(latents, ref.latents, strict=True))
    frames = torch.cat(first.frames + rest.frames)
    if limit is None or stop < 2:
        assert torch.equal(frames, torch.cat(ref.frames))
    else:  # re-warmed decoder: the frames right after the resume point are close, later ones equal
        assert (frames.float() - torch.cat(ref.frames).float()).abs().mean() < 2.0
        later = sum(f.shape[0] for f in first.frames + rest.frames[:1])  # from the second resumed chunk on
        assert torch.equal(frames[later:], torch.cat(ref.frames)[later:])
    assert state.frames_written == 81 and probe_video(out).frames == 81
    assert not sidecar_path(out).exists() and not Path(f"{out}{HISTORY_SUFFIX}").exists()
    assert not list(tmp_path.glob("video.mp4.part*"))
    # the interrupted part is copied, not re-encoded: the finished file starts with its exact frames (all
    # but its last, which a killed muxer may not have written: the resumed segment starts with it)
    n = sum(f.shape[0] for f in first.frames) - 1
    assert np.array_equal(read_video(out)[:n], read_video(tmp_path / "ref.mp4")[:n])


def test_resume_twice_keeps_every_frame_once(parts, tmp_path: Path) -> None:
    ref = reference(parts, tmp_path)
    out = tmp_path / "video.mp4"
    first = interrupted(parts, out, 1)
    second = Recorder(3)
    with pytest.raises(KeyboardInterrupt):
        render_to_file(make_job(parts, out), resume=True, on_chunk=second)
    rest = Recorder()
    render_to_file(make_job(parts, out), resume=True, on_chunk=rest)
    latents = first.latents + second.latents + rest.latents
    assert all(torch.equal(a, b) for a, b in zip(latents, ref.latents, strict=True)) and len(latents) == 7
    assert probe_video(out).frames == 81


def test_without_history_the_window_alone_resumes_before_eviction(parts, tmp_path: Path) -> None:
    ref = reference(parts, tmp_path)
    out = tmp_path / "video.mp4"
    first = interrupted(parts, out, 1)
    Path(f"{out}{HISTORY_SUFFIX}").unlink()
    rest = Recorder()
    render_to_file(make_job(parts, out), resume=True, on_chunk=rest)
    assert all(torch.equal(a, b) for a, b in zip(first.latents + rest.latents, ref.latents, strict=True))


def test_resume_with_other_settings_is_refused(parts, tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    interrupted(parts, out, 1)
    with pytest.raises(ValueError, match=r"started with other settings \(seed 0 -> 1\)"):
        render_to_file(make_job(parts, out, seed=1), resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        render_to_file(make_job(parts, tmp_path / "other.mp4"), resume=True)


def test_a_setting_dropped_on_resume_is_refused_too(parts, tmp_path: Path) -> None:
    """A node rebuilds the job from its inputs: a render started with h265 and a colour anchor cannot be
    resumed as h264 without one (its parts could never be joined), and an old sidecar that predates those
    checks still resumes with the defaults."""
    import dataclasses

    from causvid_core.resume import load_sidecar, save_sidecar, sidecar_path

    out = tmp_path / "video.mp4"
    rec = Recorder(1)
    with pytest.raises(KeyboardInterrupt):
        render_to_file(dataclasses.replace(make_job(parts, out), codec="h265", colour_anchor=0.5), on_chunk=rec)
    with pytest.raises(ValueError, match=r"other settings \(colour_anchor 0.5 -> 0.0; codec 'h265' -> 'h264'\)"):
        render_to_file(make_job(parts, out), resume=True)
    assert not out.with_name("video.mp4.joining.mp4").exists() and sidecar_path(out).exists()
    assert [row[0] for row in load_sidecar(sidecar_path(out)).colour_drift] == [0, 1]  # the drift so far is kept
    state = render_to_file(dataclasses.replace(make_job(parts, out), codec="h265", colour_anchor=0.5), resume=True)
    assert [d.index for d in state.colours.history] == list(range(state.chunks_done))  # the report covers all
    # a sidecar written before the codec / anchor / context checks existed: its render had the defaults
    old = tmp_path / "old.mp4"
    interrupted(parts, old, 1)
    sc = load_sidecar(sidecar_path(old))
    for key in ("codec", "colour_anchor", "context"):
        del sc.checks[key]
    save_sidecar(sidecar_path(old), sc)
    render_to_file(make_job(parts, old), resume=True)
    assert not sidecar_path(old).exists()


def test_an_interrupted_render_is_not_lost_to_a_new_one_or_a_moved_part(parts, tmp_path: Path) -> None:
    """Starting the same output again points at --resume (overwriting would drop the finished frames); a
    resume whose finished part was moved away says so before rendering anything, and resumes once it is back."""
    out = tmp_path / "video.mp4"
    interrupted(parts, out, 2)
    kept = out.read_bytes()
    with pytest.raises(ValueError, match=r"video.mp4 is an interrupted render: continue it with .*--resume"):
        render_to_file(make_job(parts, out))
    assert out.read_bytes() == kept and sidecar_path(out).exists()
    moved = tmp_path / "elsewhere.mp4"
    out.rename(moved)
    rest = Recorder()
    with pytest.raises(ValueError, match=r"its finished part video.mp4 is not in .* any more: put it back"):
        render_to_file(make_job(parts, out), resume=True, on_chunk=rest)
    assert rest.latents == []  # refused before any chunk was rendered
    moved.rename(out)
    render_to_file(make_job(parts, out), resume=True)
    assert probe_video(out).frames == 81


def test_full_disk_keeps_the_partial_file_and_resumes(parts, tmp_path: Path, monkeypatch) -> None:
    ref = reference(parts, tmp_path)
    calls = []

    class FullDisk(VideoWriter):
        def write(self, frames):
            calls.append(1)
            if len(calls) == 4:  # chunk 3
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write(frames)

    out = tmp_path / "video.mp4"
    first = Recorder()
    monkeypatch.setattr("causvid_core.resume.VideoWriter", FullDisk)
    with pytest.raises(
        DiskFullError, match=r"disk holding .*video\.mp4 is full: stopped after 3 of 7 chunks"
    ) as err:
        render_to_file(make_job(parts, out), on_chunk=first)
    assert "--resume" in str(err.value)
    assert probe_video(out).frames == 33 == load_sidecar(sidecar_path(out)).frames_written  # chunks 0-2
    monkeypatch.undo()
    rest = Recorder()
    render_to_file(make_job(parts, out), resume=True, on_chunk=rest)
    assert all(torch.equal(a, b) for a, b in zip(first.latents + rest.latents, ref.latents, strict=True))
    assert probe_video(out).frames == 81


def test_nan_chunk_stops_before_writing_it(parts, tmp_path: Path) -> None:
    job = make_job(parts, tmp_path / "video.mp4")

    def poison(module, args, kwargs, output):
        return output * float("nan") if kwargs.get("start_frame", 0) >= 9 else output  # chunk 3 on

    handle = job.model.register_forward_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(
            NonFiniteLatentsError, match=r"chunk 3 came out with NaN/Inf.*3 chunks before it \(33"
        ):
            render_to_file(job)
    finally:
        handle.remove()
    assert probe_video(job.out).frames == 33


def test_bad_inputs_fail_before_any_file(parts, tmp_path: Path) -> None:
    bundle, _ = parts
    out = tmp_path / "video.mp4"
    with pytest.raises(ValueError, match=r"below one chunk.*at least 9 frames"):
        render_to_file(make_job(parts, out, frames=5))
    small = VAEConfig(z_dim=4, base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4,
                      latents_std=(1.0,) * 4)  # fmt: skip
    job = make_job(parts, out)
    job.vae = WanVAE(small)
    with pytest.raises(ValueError, match="the VAE makes 4-channel latents but the model works on 16"):
        render_to_file(job)
    job = make_job(parts, out)  # an image seed encoded at another size than the render's
    job.context_latents = torch.zeros(1, 16, 1, SIZE // 8 * 2, SIZE // 8)
    with pytest.raises(ValueError, match=r"image seed / context latents are \[1, 16, 1, 8, 4\], but a 32x32"):
        render_to_file(job)
    assert not any(tmp_path.iterdir())
    out.write_bytes(b"x")
    with pytest.raises(ValueError, match="already exists"):
        render_to_file(make_job(parts, out))
    assert out.read_bytes() == b"x"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_long_render_holds_flat_memory_and_every_frame(parts, tmp_path: Path) -> None:
    frames = 1 + 4 * (3 * 120 - 1)  # 120 chunks of 3 latent frames (30 s of video)
    rss: list[int] = []
    job = make_job(parts, tmp_path / "long.mp4", frames=frames)
    state = render_to_file(job, on_chunk=lambda event: rss.append(_rss_bytes()))
    assert len(rss) == 120 and state.frames_written == frames
    assert max(rss[10:]) <= 1.05 * rss[10], [r >> 20 for r in rss]
    assert probe_video(job.out).frames == frames
