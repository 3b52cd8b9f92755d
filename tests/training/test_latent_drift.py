"""scripts/latent_drift.py: the per-channel drift figures behind --latent-shift-channels (docs/training.md)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import load_script

ld = load_script("latent_drift")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_offsets_are_per_channel_and_per_second_and_small_where_the_student_is_right(capsys) -> None:
    prompts = ["a red circle moving right", "a blue square moving up on a white background"]
    d = ld.offsets("embedded:shapes", None, prompts, seconds=4.0)
    # 4 s = 65 frames = 17 latent frames: 4 whole blocks of 4 per prompt, the 17th frame left out
    assert d.shape == (16, 8) and np.isfinite(d).all()
    # the pooled colour (channels 0-2) is what the shipped student gets right: its background and colour sit
    # within 0.3 latent stds of the true video's, far below the gap between two backgrounds (about 1)
    assert np.abs(d[:3]).max() < 0.3
    assert "a blue square moving up on a white background: mean |offset|" in capsys.readouterr().out


def test_a_student_checkpoint_needs_its_vae() -> None:
    from causvid_core.bundle import embedded_file

    with pytest.raises(SystemExit, match="--vae PATH is needed"):
        ld.offsets(str(embedded_file("shapes", "dit")), None, ["a red circle moving right"], 1.0)


def test_a_student_checkpoint_with_its_vae_measures_like_the_embedded_model() -> None:
    from causvid_core.bundle import embedded_file

    prompts = ["a green triangle moving left on a gray background"]
    embedded = ld.offsets("embedded:shapes", None, prompts, seconds=2.0)
    files = ld.offsets(str(embedded_file("shapes", "dit")), str(embedded_file("shapes", "vae")), prompts, 2.0)
    assert np.allclose(embedded, files, atol=1e-5)
