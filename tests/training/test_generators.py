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
    calls, real = [], generators._euler

    def spy(model, noise, ctx, uncond, sigmas, guidance, chunks, pinned):
        x = real(model, noise, ctx, uncond, sigmas, guidance, chunks, pinned)
        calls.append((pinned, x))
        return x

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generators, "_euler", spy)
        video = fn("a blue square moving up", 0, 29)  # 8 latent frames: four windows of 3 with overlap 1
    assert video.shape == (29, 32, 32, 3)
    assert len(calls) == 4 and calls[0][0] is None
    for (_, before), (pinned, after) in zip(calls, calls[1:], strict=False):
        # each window starts from the last frame of the one before and samples two new ones
        assert torch.equal(pinned, before[:, :, -1:]) and torch.equal(after[:, :, :1], pinned)
        assert not torch.allclose(after[:, :, 1:], before[:, :, 1:], atol=1e-3)
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


def test_a_checkpoint_is_read_with_the_text_encoder_of_its_run(tmp_path, monkeypatch) -> None:
    """A run trained with --text-seed 3 must be evaluated with that encoder, not seed 0's."""
    from training.data import checkpoint_text_encoder

    cfg = PRESETS["tiny"].dit
    save_model(CausalWanModel(cfg), tmp_path / "student.safetensors",
               extra_metadata={"causvid_training": {"text_seed": 3, "dit": {}}})  # fmt: skip
    prompt = ["a red circle moving right"]
    got = checkpoint_text_encoder(tmp_path / "student.safetensors").encode(prompt)
    assert torch.equal(got, ShapesTextEncoder(cfg.text_dim, cfg.text_len, seed=3).encode(prompt))
    assert not torch.equal(got, ShapesTextEncoder(cfg.text_dim, cfg.text_len, seed=0).encode(prompt))
    make_embedded(tmp_path, "evalshapes", seed=5)  # an embedded model: the encoder it ships
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    shipped = checkpoint_text_encoder("embedded:evalshapes").encode(prompt)
    assert torch.equal(shipped, ShapesTextEncoder(cfg.text_dim, cfg.text_len, seed=5).encode(prompt))


def test_eval_scores_the_teacher_an_embedded_model_ships(tmp_path, monkeypatch) -> None:
    """--teacher embedded:NAME samples teacher.safetensors; a causal teacher keeps its trained chunks."""
    from training import eval as shapes_eval

    folder = make_embedded(tmp_path, "evalshapes")
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(tmp_path))
    torch.manual_seed(1)
    save_model(CausalWanModel(PRESETS["tiny"].dit), folder / "teacher.safetensors",
               extra_metadata={"causvid_training": {"kind": "causal", "causal": {"chunk_frames": 2}}})  # fmt: skip
    seen = {}
    real = generators.teacher

    def spy(path, vae, text, **kw):
        seen.update(path=path, chunk=kw["causal_chunk"])
        return real(path, vae, text, **kw)

    monkeypatch.setattr(generators, "teacher", spy)
    result = shapes_eval.main(["--teacher", "embedded:evalshapes", "--teacher-steps", "2", "--prompts", "1",
                               "--seconds", "1"])  # fmt: skip
    assert len(result["videos"]) == 1
    assert seen == {"path": folder / "teacher.safetensors", "chunk": 2}
    shapes_eval.main(["--teacher", "embedded:evalshapes", "--teacher-steps", "2", "--prompts", "1", "--seconds",
                      "1", "--causal-chunk", "3"])  # fmt: skip
    assert seen["chunk"] == 3  # an explicit --causal-chunk wins


def test_eval_names_a_vae_of_another_channel_count_before_any_video(tmp_path) -> None:
    from safetensors.torch import save_file

    from causvid_core.vae import VAEConfig, WanVAE
    from training import eval as shapes_eval
    from training.vae_stage import store_statistics

    cfg = PRESETS["tiny"].dit  # 16-channel latents
    save_model(CausalWanModel(cfg), tmp_path / "student.safetensors")
    small = VAEConfig(z_dim=4, base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4,
                      latents_std=(1.0,) * 4)  # fmt: skip
    save_file({k: v.contiguous() for k, v in WanVAE(small).state_dict().items()}, str(tmp_path / "vae4.safetensors"))
    store_statistics(tmp_path / "vae4.safetensors", [0.0] * 4, [1.0] * 4)  # a loadable 4-channel VAE file
    with pytest.raises(ValueError, match=r"works on 16-channel latents but --vae .*vae4.safetensors makes 4: pass"):
        shapes_eval.main(["--model", str(tmp_path / "student.safetensors"), "--vae", str(tmp_path / "vae4.safetensors"),
                          "--prompts", "1", "--seconds", "1"])  # fmt: skip
