"""Zero-shot evaluations run end to end through the core paths (schedule, image-to-video, video-to-video)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import make_embedded
from training import zero_shot
from training.metrics import frame_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_all_three_applications_report_their_figures(tmp_path, monkeypatch) -> None:
    make_embedded(tmp_path, "zs")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    out = tmp_path / "new" / "z.json"  # its folder is made
    result = zero_shot.main(["--model", "embedded:zs", "--cases", "2", "--json", str(out)])
    sched = result["schedule"]
    assert [c["kind"] for c in sched["cases"]] == ["direction", "colour"]
    assert all(c["prompt"] != c["then"] for c in sched["cases"])
    for part in ("image_to_video", "video_to_video"):
        for value in result[part]["summary"].values():
            assert np.isfinite(value) and value >= 0
    assert all(c["source"] != c["target"] for c in result["video_to_video"]["cases"])
    assert json.loads(out.read_text())["schedule"]["summary"] == sched["summary"]


def test_bad_options_are_refused_before_any_rendering(tmp_path, monkeypatch) -> None:
    """--strength outside (0, 1] used to fail only in the last application, after the first two ran."""
    monkeypatch.setattr(zero_shot, "run_all", lambda *a: pytest.fail("rendered before checking its options"))
    with pytest.raises(ValueError, match=r"--strength must be in \(0, 1\]"):
        zero_shot.main(["--strength", "2"])
    with pytest.raises(ValueError, match="--cases must be at least 1"):
        zero_shot.main(["--cases", "0"])
    with pytest.raises(ValueError, match="is a folder"):
        zero_shot.main(["--json", str(tmp_path)])


def test_source_chunks_follow_the_vae_stride() -> None:
    video = np.zeros((33, 64, 64, 3), np.uint8)
    sizes = [c.shape[0] for c in zero_shot._source_chunks(video, 3)]
    assert sizes == [9, 12, 12]


def test_path_distance_is_measured_on_the_torus() -> None:
    a = np.zeros((2, 64, 64, 3), np.uint8)
    a[:, 30:34, 0:2] = 255  # an object cut by the left edge ...
    a[:, 30:34, 62:64] = 255  # ... continues on the right: its centroid sits on the border
    stats = frame_stats(a, (0, 0, 0))
    assert stats.present.all()
    x = stats.centroid[0, 0]
    assert min(abs(x - 0), abs(x - 64)) < 1.5
