"""Evaluation generators: the streaming student and the sliding-window teacher give whole, seeded videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS
from causvid_core.model import CausalWanModel
from causvid_core.text import ShapesTextEncoder
from causvid_core.vae import VAE_PRESETS, WanVAE
from tests.helpers import make_embedded
from training import generators

pytestmark = pytest.mark.usefixtures("one_thread")


def test_student_streams_the_requested_frames_reproducibly(tmp_path, monkeypatch) -> None:
    make_embedded(tmp_path, "evalshapes")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    fn = generators.student("embedded:evalshapes", vae, size=32)
    a = fn("a red circle moving right", 3, 30)
    assert a.shape == (30, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, fn("a red circle moving right", 3, 30))
    assert not np.array_equal(a, fn("a red circle moving right", 4, 30))


def test_teacher_continues_past_its_window(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].dit
    save_model(CausalWanModel(cfg), tmp_path / "teacher.safetensors")
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    text = ShapesTextEncoder(cfg.text_dim, cfg.text_len)
    fn = generators.teacher(tmp_path / "teacher.safetensors", vae, text, steps=2, window=3, overlap=1, size=32)
    video = fn("a blue square moving up", 0, 29)  # 8 latent frames: four windows of 3 with overlap 1
    assert video.shape == (29, 32, 32, 3)
    assert np.array_equal(video, fn("a blue square moving up", 0, 29))


def test_eval_cli_scores_a_model(tmp_path, monkeypatch) -> None:
    from training import eval as shapes_eval

    make_embedded(tmp_path, "evalshapes")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    out = tmp_path / "figures.json"
    result = shapes_eval.main(["--model", "embedded:evalshapes", "--prompts", "2", "--seconds", "1",
                               "--json", str(out)])  # fmt: skip
    assert len(result["videos"]) == 2 and out.is_file()
    assert set(shapes_eval.FIGURES) <= set(result["summary"])
