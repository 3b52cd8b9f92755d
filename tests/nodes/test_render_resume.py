"""Render Video's resume input in the real host: Cancel, then resume the same file to the end."""

from __future__ import annotations

import os
import re

import numpy as np
from test_nodes import render_prompt

from causvid_core.resume import load_sidecar, sidecar_path
from causvid_core.video_io import probe_video, psnr, read_video


def _newest(host):
    return sorted((host.output_dir / "causvid").glob("resume_*.mp4"), key=os.path.getmtime)[-1]


def test_cancel_then_resume_finishes_the_same_video(host, embedded) -> None:
    prompt = render_prompt(length=65)  # 17 latent frames: 6 chunks
    prompt["4"]["inputs"]["filename_prefix"] = "causvid/resume"
    straight = host.execute(prompt)
    assert straight.success, straight.error
    reference = read_video(straight.value("4", 1))

    cancelled = host.execute(prompt, interrupt_after=2)
    assert cancelled.interrupted
    path = _newest(host)
    done = load_sidecar(sidecar_path(path))
    assert 2 <= done.chunks_done < 6 and probe_video(path).frames == done.frames_written

    prompt["4"]["inputs"]["resume"] = f"causvid/{path.name}"
    resumed = host.execute(prompt)
    assert resumed.success, resumed.error
    assert resumed.value("4", 1) == str(path) and not sidecar_path(path).exists()
    final = read_video(path)
    assert len(final) == 65 and psnr(final, reference) > 35
    assert np.array_equal(final[: done.frames_written - 1], reference[: done.frames_written - 1])
    # the images output holds the frames made in this run
    assert resumed.value("4", 0).shape[0] == 65 - done.frames_written


def test_resume_outside_the_output_folder_is_refused(host, embedded, tmp_path) -> None:
    prompt = render_prompt()
    prompt["4"]["inputs"]["resume"] = str(tmp_path / "elsewhere.mp4")
    result = host.execute(prompt)
    assert not result.success
    assert re.search(r"resume path '.*elsewhere\.mp4' is outside ComfyUI's output folder", result.error)
    prompt["4"]["inputs"]["resume"] = "causvid/never_rendered.mp4"
    result = host.execute(prompt)
    assert "nothing to resume" in result.error
