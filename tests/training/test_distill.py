"""Every stage of ``python -m training.distill`` end to end on tiny Shapes runs, and its input errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from causvid_core.checkpoint import load_model
from causvid_core.config import PRESETS
from training import distill
from training.config import ConfigError, make_config, parse_cli, stage_name
from training.data import sample_indices
from training.distill import TrainingError, main

REPO = Path(__file__).resolve().parents[2]


def run(root: Path, stage: str, *args: str) -> dict:
    return main([stage, "--preset", "tiny", "--runs-dir", str(root), *args])


def fell(values: list[float]) -> bool:
    return float(np.mean(values[-3:])) < 0.8 * float(np.mean(values[:3]))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """teacher -> ode-pairs -> ode-init on the tiny preset (a few seconds)."""
    root = tmp_path_factory.mktemp("runs")
    teacher = run(root, "teacher", "--steps", "30", "--sample-every", "30")
    pairs = run(root, "ode-pairs")
    ode = run(root, "ode-init", "--steps", "30")
    return {"root": root, "teacher": teacher, "pairs": pairs, "ode": ode}


def test_teacher_loss_falls_and_final_checkpoint_loads(chain: dict) -> None:
    losses = [r["loss"] for r in chain["teacher"]["rows"]]
    assert len(losses) == 30 and fell(losses)
    folder = chain["root"] / "shapes" / "teacher"
    model, report = load_model(folder / "final.safetensors")
    assert model.config == PRESETS["tiny"].dit and report.config_source == "file metadata"
    with safe_open(str(folder / "final.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["causvid_stage"] == "teacher" and json.loads(meta["causvid_step"]) == 30
    assert json.loads(meta["causvid_training"])["steps"] == 30
    assert (folder / "samples" / "step_000030.mp4").stat().st_size > 0
    with Image.open(folder / "samples" / "step_000030.png") as strip:  # 8 of its 21 frames of 32x32, at 2x
        assert strip.size == (8 * 32 * 2, 32 * 2)
    assert (folder / "loss.png").exists() and (folder / "log.csv").read_text().count("\n") == 31


def test_ode_pairs_hold_the_students_timesteps_and_are_reproducible(chain: dict, tmp_path: Path) -> None:
    folder = chain["root"] / "shapes" / "ode-pairs"
    again = run(chain["root"], "ode-pairs", "--out-dir", str(tmp_path / "again"))
    assert len(again["written"]) == 2
    for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
        with safe_open(str(folder / name), "pt") as a, safe_open(str(tmp_path / "again" / name), "pt") as b:
            ma, mb = a.metadata(), b.metadata()
            ca, cb = json.loads(ma.pop("config")), json.loads(mb.pop("config"))
            assert ma == mb and {k for k in ca if ca[k] != cb[k]} == {"out_dir"}
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
            traj = a.get_tensor("trajectory")
            meta = a.metadata()
        assert traj.shape == (2, 4, 16, 6, 4, 4)  # [N, 3 kept steps + x0, C, F, h, w]
        assert json.loads(meta["keep_steps"]) == [0, 36, 44]
        assert len(json.loads(meta["prompts"])) == 2
    # the run's first shard's first x0 is decoded beside it, to be looked at before ode-init: 21 frames of 32x32
    assert (folder / "samples" / "shard_00000.mp4").stat().st_size > 0
    with Image.open(folder / "samples" / "shard_00000.png") as strip:
        assert strip.size == (8 * 32 * 2, 32 * 2)
    # a second run over a finished folder skips every shard; one with another guidance is not mixed in
    assert run(chain["root"], "ode-pairs")["written"] == []
    with pytest.raises(ConfigError, match=r"holds shards made with other settings \(guidance 6.0 here, 2.0 now\)"):
        run(chain["root"], "ode-pairs", "--guidance", "2")


def test_ode_init_loss_falls(chain: dict) -> None:
    losses = [r["loss"] for r in chain["ode"]["rows"]]
    assert fell(losses)
    assert (chain["root"] / "shapes" / "ode-init" / "final.safetensors").exists()


def test_dmd_critic_loss_falls_and_generator_moves(chain: dict) -> None:
    root = chain["root"]
    out = run(
        root, "dmd", "--steps", "40", "--batch-size", "8", "--critic-lr", "3e-3", "--sample-every", "40"
    )
    rows = out["rows"]
    assert fell([r["critic_loss"] for r in rows])
    assert [r["step"] for r in rows if "gen_loss" in r] == list(range(1, 41, 2))  # every critic_steps=2
    start, _ = load_model(root / "shapes" / "ode-init" / "final.safetensors")
    end, _ = load_model(root / "shapes" / "dmd" / "final.safetensors")
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), end.parameters(), strict=True))
    assert (root / "shapes" / "dmd" / "final_critic.safetensors").exists()
    assert (root / "shapes" / "dmd" / "samples" / "step_000040.mp4").stat().st_size > 0


@pytest.fixture(scope="module")
def causal_chain(chain: dict) -> dict:
    """The causal teacher's own chain beside the bidirectional one: teacher --kind causal -> ode-pairs ->
    ode-init, each with --teacher-kind causal and its default folders."""
    root = chain["root"]
    run(root, "teacher", "--kind", "causal", "--steps", "2")
    pairs = run(root, "ode-pairs", "--teacher-kind", "causal", "--num-samples", "2", "--shard-size", "2")
    ode = run(root, "ode-init", "--teacher-kind", "causal", "--steps", "2")
    return {"root": root, "pairs": pairs, "ode": ode}


def test_table4_variants_write_separate_stage_folders(causal_chain: dict) -> None:
    root = causal_chain["root"]
    assert causal_chain["pairs"]["folder"].name == "ode-pairs-causal-teacher"
    assert causal_chain["ode"]["folder"].name == "ode-init-causal-teacher"
    skip = run(root, "dmd", "--skip-ode-init", "--steps", "2")
    causal = run(root, "dmd", "--teacher-kind", "causal", "--steps", "2")  # the causal chain's pairs and student
    # version 3's row: the bidirectional teacher's ODE init and a bidirectional critic beside a causal teacher
    mixed = run(root, "dmd", "--teacher-kind", "causal", "--critic-kind", "bidirectional", "--steps", "2",
                "--generator-init", str(root / "shapes" / "ode-init" / "final.safetensors"),
                "--pairs", str(root / "shapes" / "ode-pairs"))  # fmt: skip
    assert skip["folder"].name == "dmd-no-ode-init" and causal["folder"].name == "dmd-causal-teacher"
    assert mixed["folder"].name == "dmd-causal-teacher-bidirectional-critic"
    # a causal critic beside the bidirectional teacher is a variant too, not the recipe's dmd folder
    assert stage_name(make_config("dmd", "tiny", {"critic_kind": "causal"})) == "dmd-causal-critic"
    with safe_open(str(causal["folder"] / "final.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["causvid_training"])
    assert record["teacher_kind"] == "causal" and record["critic_kind"] is None


def test_a_causal_teachers_ode_pairs_are_causal_and_kinds_cannot_be_mixed_up(
    causal_chain: dict, tmp_path: Path
) -> None:
    from causvid_core.sampling import sample_teacher
    from training.distill import latent_shape, step_generator

    root = causal_chain["root"]
    (shard,) = causal_chain["pairs"]["written"]
    with safe_open(str(shard), "pt") as f:
        assert json.loads(f.metadata()["teacher_kind"]) == "causal"
        traj, text = f.get_tensor("trajectory"), f.get_tensor("context")
    # the first chunk of each trajectory is what the teacher makes of that chunk alone: it saw no later frame
    cfg = make_config("ode-pairs", "tiny", {})
    teacher, _ = load_model(root / "shapes" / "teacher-causal" / "final.safetensors", dtype=torch.float32)
    teacher.eval()
    noise = torch.stack([torch.randn(latent_shape(cfg), generator=step_generator(cfg.seed, i, 0, 7)) for i in (0, 1)])
    with torch.no_grad():
        alone, _ = sample_teacher(teacher, noise[:, :, :3], teacher.encode_context(text),
                                  teacher.encode_context(torch.zeros(2, *text.shape[1:])), num_steps=cfg.num_steps,
                                  shift=cfg.sampling.shift, guidance=cfg.guidance, chunk_sizes=[3])  # fmt: skip
    assert torch.allclose(traj[:, -1, :, :3], alone, atol=1e-4)
    # a checkpoint of the other kind is refused with the fix, before any sampling or training
    with pytest.raises(ConfigError, match=r"is a bidirectional teacher .* pass --teacher-kind bidirectional"):
        run(root, "ode-pairs", "--teacher-kind", "causal", "--teacher",
            str(root / "shapes" / "teacher" / "final.safetensors"), "--out-dir", str(tmp_path / "x"))  # fmt: skip
    for stage in ("ode-init", "dmd"):
        with pytest.raises(ConfigError, match=r"is a causal teacher .* pass --teacher-kind causal"):
            run(root, stage, "--teacher", str(root / "shapes" / "teacher-causal" / "final.safetensors"),
                "--out-dir", str(tmp_path / stage))  # fmt: skip
    # a missing causal chain names the command that makes it
    with pytest.raises(ConfigError, match=r"'ode-init' stage makes it: .* ode-init .*--teacher-kind causal"):
        run(tmp_path, "dmd", "--teacher-kind", "causal", "--teacher", str(root / "shapes" / "teacher-causal" /
            "final.safetensors"), "--input", "data")  # fmt: skip


def test_clips_longer_than_the_window_train_the_attention_the_stream_uses(
    causal_chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the rolling window a stream's cache has evicted the oldest chunks; the causal teacher's ODE pairs and
    the student's ODE init over such a clip hide them too (tiny: 1 sink + 2 window chunks, 5 chunks here)."""
    from causvid_core.model import CausalWanModel

    seen: list[tuple] = []
    forward = CausalWanModel.forward

    def spy(self, x, t, context, **kw):  # noqa: ANN001, ANN202 - the model's own signature
        seen.append((x.shape[2], kw.get("chunk_sizes"), kw.get("sink_chunks"), kw.get("window_chunks")))
        return forward(self, x, t, context, **kw)

    monkeypatch.setattr(CausalWanModel, "forward", spy)
    teacher = str(causal_chain["root"] / "shapes" / "teacher-causal" / "final.safetensors")
    pairs = run(tmp_path, "ode-pairs", "--teacher-kind", "causal", "--teacher", teacher, "--num-frames", "57",
                "--num-samples", "1", "--shard-size", "1")  # fmt: skip
    run(tmp_path, "ode-init", "--teacher-kind", "causal", "--teacher", teacher, "--num-frames", "57",
        "--pairs", str(pairs["folder"]), "--steps", "1")  # fmt: skip
    trained = {(f, tuple(chunks), sink, window) for f, chunks, sink, window in seen if chunks is not None}
    assert trained == {(15, (3, 3, 3, 3, 3), 1, 2)}


def test_clean_chunks_give_the_student_the_pairs_x0_at_t_zero_as_context(
    chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ode-init --clean-chunks: some chunks reach the student as their pair's x0 itself at t = 0 (what its cache
    holds at inference), the others at a step of the few-step list; and the share must lie in [0, 1)."""
    from causvid_core.model import CausalWanModel
    from training.data import ShardSource

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = CausalWanModel.forward

    def spy(self, x, t, context, **kw):  # noqa: ANN001, ANN202 - the model's own signature
        seen.append((x.detach().clone(), t.detach().clone()))
        return forward(self, x, t, context, **kw)

    monkeypatch.setattr(CausalWanModel, "forward", spy)
    pairs, teacher = str(chain["pairs"]["folder"]), str(chain["root"] / "shapes" / "teacher" / "final.safetensors")
    run(tmp_path, "ode-init", "--pairs", pairs, "--teacher", teacher, "--clean-chunks", "0.5", "--steps", "4")
    x0s = ShardSource(Path(pairs), "trajectory").get(list(range(4))).latents[:, -1]
    ts = torch.cat([t for _, t in seen])
    assert (ts == 0).any() and (ts > 500).any()  # clean context and noisy chunks both trained
    for x, t in seen:
        for b in range(len(x)):
            clean = t[b] == 0
            if clean.any():  # those frames are one pair's clean end, untouched
                assert any(torch.allclose(x[b][:, clean], x0[:, clean]) for x0 in x0s)
    with pytest.raises(ConfigError, match="--clean-chunks"):
        run(tmp_path, "ode-init", "--pairs", pairs, "--teacher", teacher, "--clean-chunks", "1")
    # by default a quarter of the chunks are clean, as the reference's few-step list [1000, 757, 522, 0] draws them
    assert parse_cli("ode-init", ["--preset", "tiny"]).clean_chunks == 0.25


def test_a_missing_sample_vae_stops_the_run_before_step_0(chain: dict, tmp_path: Path) -> None:
    """--vae run with sample videos on and no vae stage in the runs folder: the error comes before training
    (it used to come at the first sample, step 500 of a real run, on rank 0 only), naming the fix."""
    teacher = str(chain["root"] / "shapes" / "teacher" / "final.safetensors")
    with pytest.raises(ConfigError, match=r"vae/final.safetensors not found.*--sample-every 0"):
        run(tmp_path, "ode-init", "--pairs", str(chain["pairs"]["folder"]), "--teacher", teacher, "--vae", "run",
            "--sample-every", "2", "--steps", "4")  # fmt: skip
    assert not (tmp_path / "shapes" / "ode-init").exists() or not any((tmp_path / "shapes" / "ode-init").iterdir())
    run(tmp_path, "ode-init", "--pairs", str(chain["pairs"]["folder"]), "--teacher", teacher, "--vae", "run",
        "--sample-every", "0", "--steps", "1")  # without samples it needs no VAE  # fmt: skip


def test_ode_pairs_steady_targets_replace_x0_and_record_which(
    chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--steady-targets true: x0 becomes the encoded drawing along the path measured on the teacher's drawing
    (here a path handed over, the tiny teacher drawing nothing to measure), the noisy points stay the teacher's,
    a clip without a path keeps its x0, and the shard records which were steadied."""
    from causvid_core.bundle import embedded_file
    from causvid_core.vae import load_wan_vae
    from training import student_clips
    from training.data import CoreVAECodec

    calls = []

    def path(video: np.ndarray, prompt: str) -> tuple | None:
        calls.append(len(video))
        return None if len(calls) == 2 else (np.array([20.0, 40.0]), np.zeros((len(video), 2)))

    monkeypatch.setattr(student_clips, "measure_path", path)
    teacher = str(chain["root"] / "shapes" / "teacher" / "final.safetensors")
    common = ("--teacher", teacher, "--vae", "embedded:shapes", "--height", "64", "--width", "64", "--num-frames", "9",
              "--num-samples", "3", "--shard-size", "3")  # fmt: skip
    (plain,) = run(tmp_path / "plain", "ode-pairs", *common)["written"]
    (steady,) = run(tmp_path / "steady", "ode-pairs", *common, "--steady-targets", "true")["written"]
    with safe_open(str(plain), "pt") as a, safe_open(str(steady), "pt") as b:
        before, after = a.get_tensor("trajectory"), b.get_tensor("trajectory")
        prompts, steadied = json.loads(b.metadata()["prompts"]), json.loads(b.metadata()["steadied"])
    assert calls == [9, 9, 9] and steadied == [True, False, True]
    assert torch.equal(before[:, :-1], after[:, :-1]) and torch.equal(before[1, -1], after[1, -1])
    codec = CoreVAECodec(load_wan_vae(embedded_file("shapes", "vae")))
    for i in (0, 2):
        drawn = student_clips.render_along(prompts[i], student_clips.smooth_path(
            prompts[i], np.array([20.0, 40.0]), np.zeros((9, 2)), 64, 0), 64)  # fmt: skip
        want = codec.encode(torch.from_numpy(drawn).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)[0]
        assert torch.allclose(after[i, -1], want, atol=1e-5)
    # a folder of plain pairs is not topped up with steadied ones; the option needs Shapes prompts and a real VAE
    with pytest.raises(ConfigError, match=r"other settings \(steady_targets False here, True now"):
        run(tmp_path / "plain", "ode-pairs", *common, "--steady-targets", "true")
    with pytest.raises(ConfigError, match="the pool codec cannot: pass --vae run, embedded:NAME or a VAE file"):
        run(tmp_path, "ode-pairs", "--steady-targets", "true")
    with pytest.raises(ConfigError, match="measures the path of a Shapes prompt's object, but --data is"):
        run(tmp_path, "ode-pairs", "--steady-targets", "true", "--vae", "embedded:shapes", "--data", str(tmp_path))


def test_precompute_shards_feed_training(tmp_path: Path) -> None:
    out = run(tmp_path, "precompute")
    assert len(out["written"]) == 2
    res = run(tmp_path, "teacher", "--data", str(out["folder"]), "--steps", "3")
    assert len(res["rows"]) == 3 and all(np.isfinite(r["loss"]) for r in res["rows"])


def test_precompute_reads_a_captioned_video_folder(tmp_path: Path) -> None:
    from training.logging_utils import write_video
    from training.shapes import render_video

    videos = tmp_path / "videos"
    captions = {"a.mp4": "a red circle moving right", "b.mp4": "a blue square moving up on a gray background"}
    for i, (name, prompt) in enumerate(captions.items()):
        write_video(render_video(prompt, i, 21, 32), videos / name)
    (videos / "captions.json").write_text(json.dumps(captions))
    out = run(tmp_path, "precompute", "--videos", str(videos))
    with safe_open(str(out["written"][0]), "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == list(captions.values())
        assert f.get_tensor("latents").shape == (2, 16, 6, 4, 4)


def test_ranks_draw_different_deterministic_data() -> None:
    a = sample_indices(3, 0, 2, 4, seed=1, size=100)
    b = sample_indices(3, 1, 2, 4, seed=1, size=100)
    assert not set(a) & set(b)
    assert a == sample_indices(3, 0, 2, 4, seed=1, size=100)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"loss is nan at step 8.*state_000005\.pt.*--resume"):
        run(tmp_path, "teacher", "--steps", "10", "--save-every", "5", "--debug-nan-at-step", "8")
    folder = tmp_path / "shapes" / "teacher"
    assert sorted(p.name for p in folder.glob("state_*.pt")) == ["state_000005.pt"]
    assert not (folder / "final.safetensors").exists()
    model, _ = load_model(folder / "step_000005.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    resumed = run(tmp_path, "teacher", "--steps", "10", "--save-every", "5", "--resume")
    assert [r["step"] for r in resumed["rows"]] == list(range(1, 11))


def test_bad_options_name_the_problem() -> None:
    with pytest.raises(ConfigError, match=r"unknown option --stepz.*did you mean --steps"):
        parse_cli("teacher", ["--stepz", "3"])
    with pytest.raises(ConfigError, match=r"unknown option --dit.num_layer for DiTConfig; did you mean --dit.num-layers\?"):
        parse_cli("teacher", ["--dit.num-layer", "3"])  # the suggestion keeps the dotted path, so it works
    with pytest.raises(ConfigError, match=r"unknown stage 'teachr' \(did you mean 'teacher'\?\)"):
        main(["teachr"])
    with pytest.raises(ConfigError, match=r"--steps expects int, got 'abc'"):
        parse_cli("teacher", ["--steps", "abc"])
    with pytest.raises(ConfigError, match=r"--grad-ckpt expects a bool"):
        parse_cli("teacher", ["--grad-ckpt", "maybe"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        parse_cli("teacher", ["--preset", "huge"])
    with pytest.raises(ConfigError, match="--teacher-kind must be"):
        make_config("dmd", "tiny", {"teacher_kind": "sideways"})
    cfg = parse_cli(
        "dmd", ["--preset", "tiny", "--skip-ode-init", "--dit.num-layers", "3", "--grad-clip=2.5"]
    )
    assert cfg.skip_ode_init and cfg.dit.num_layers == 3 and cfg.grad_clip == 2.5


def test_stage_help_lists_the_values_a_run_of_the_preset_gets(capsys: pytest.CaptureFixture) -> None:
    """--help shows the preset's values (what an unset option becomes), not the bare dataclass defaults."""
    main(["teacher", "--help"])
    shapes = capsys.readouterr().out
    cfg = make_config("teacher", "shapes")
    assert f"--steps (int, default {cfg.steps})" in shapes and f"--dit.dim (int, default {cfg.dit.dim})" in shapes
    main(["teacher", "--preset", "tiny", "--help"])
    tiny = capsys.readouterr().out
    assert f"--dit.dim (int, default {make_config('teacher', 'tiny').dit.dim})" in tiny and tiny != shapes


def test_text_dropout_trains_that_share_of_samples_on_the_empty_prompt(tmp_path: Path, monkeypatch) -> None:
    """--text-dropout P: the teacher sees the empty prompt (zeros) for a share P of its samples, which
    classifier-free guidance needs; 0 never, 1 always."""
    from causvid_core.model import CausalWanModel

    seen: list[torch.Tensor] = []
    forward = CausalWanModel.forward

    def spy(self, x, t, context, **kw):
        seen.append(context.detach().flatten(1).abs().sum(1))  # per sample: 0 for the empty prompt
        return forward(self, x, t, context, **kw)

    monkeypatch.setattr(CausalWanModel, "forward", spy)
    empty = {}
    for p in ("0", "0.5", "1"):
        seen.clear()
        run(tmp_path / p, "teacher", "--steps", "4", "--batch-size", "4", "--sample-every", "0", "--text-dropout", p)
        per_sample = torch.cat(seen)
        assert len(per_sample) == 16
        empty[p] = int((per_sample == 0).sum())
    assert empty["0"] == 0 and empty["1"] == 16 and 0 < empty["0.5"] < 16


def test_fsdp_on_the_cpu_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from training.dist import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--fsdp needs CUDA GPUs.*drop --fsdp to use DDP"):
        init_distributed("cpu", fsdp=True)


def test_more_ranks_than_gpus_names_nproc_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node 4 on a 2-GPU machine: rank 2 is told what to change, before any CUDA call
    answers with "invalid device ordinal"."""
    from training.dist import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match=r"rank 2 would use GPU 2, but this machine has 2 CUDA GPU\(s\): run "
                                          r"torchrun with --nproc_per_node 2 or fewer"):
        init_distributed("cuda")


def test_missing_input_names_the_stage_and_command(tmp_path: Path) -> None:
    # the command it names writes where this run looks: the same --runs-dir
    made = r"'teacher' stage makes it: python -m training.distill teacher .*--runs-dir " + re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=made):
        run(tmp_path, "ode-init")
    with pytest.raises(ConfigError, match=r"'teacher' stage makes it"):
        run(tmp_path, "ode-pairs")
    with pytest.raises(ConfigError, match=r"'ode-init' stage makes it: python -m training.distill ode-init"):
        run(tmp_path, "dmd", "--teacher", str(tmp_path), "--critic-init", str(tmp_path), "--input", "data")


def test_empty_data_folders_are_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ConfigError, match=r"holds no shard_\*\.safetensors files; make them with: .*precompute"
    ):
        run(tmp_path, "teacher", "--data", str(empty))
    with pytest.raises(ConfigError, match="holds no videos"):
        run(tmp_path, "precompute", "--videos", str(empty))


def test_command_line_prints_a_one_line_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "training.distill", "teacher", "--preset", "tiny", "--stepz", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown option --stepz") and "Traceback" not in proc.stderr


def test_each_rank_says_its_error_on_a_line_of_its_own(monkeypatch, capsys) -> None:
    """Under torchrun two ranks once printed one message run into the other's. Each says it in one whole
    line, a rank other than 0 naming itself (its error may be its own alone), and every rank exits 2."""
    monkeypatch.setattr(sys, "argv", ["distill", "teacher", "--preset", "tiny", "--stepz", "3"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", "rank 1: error: unknown option --stepz"), ("0", "error: unknown option --stepz")):
        monkeypatch.setenv("RANK", rank)
        assert distill.cli() == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("error:") == 1 and err.endswith("\n")


def test_free_text_captions_go_through_the_umt5_encoder(tmp_path: Path) -> None:
    """Captions outside the Shapes vocabulary: --text-encoder (Wan umT5 .pth, tokenizer beside it)."""
    import torch

    from causvid_core.umt5 import UMT5_PRESETS, UMT5TextEncoder
    from tests.core.test_umt5 import _random_wan_state, _write_tokenizer
    from training.config import ConfigError
    from training.logging_utils import write_video
    from training.shapes import render_video

    enc_dir = tmp_path / "umt5"
    enc_dir.mkdir()
    torch.save(_random_wan_state(UMT5_PRESETS["tiny"]), enc_dir / "umt5.pth")
    _write_tokenizer(enc_dir / "tokenizer.json")
    videos = tmp_path / "videos"
    captions = {"a.mp4": "a red cat runs on the grass", "b.mp4": "blue sky !"}
    for i, name in enumerate(captions):
        write_video(render_video("a red circle moving right", i, 21, 32), videos / name)
    (videos / "captions.json").write_text(json.dumps(captions))
    with pytest.raises(ConfigError, match="need a text encoder: --text-encoder"):
        run(tmp_path / "no-encoder", "precompute", "--videos", str(videos))
    out = run(tmp_path, "precompute", "--videos", str(videos), "--text-encoder", str(enc_dir / "umt5.pth"))
    expected = UMT5TextEncoder.load(enc_dir / "umt5.pth", dtype=torch.float32).encode(list(captions.values()))
    with safe_open(str(out["written"][0]), "pt") as f:
        key = next(k for k in f.keys() if "context" in k or "text" in k)
        assert torch.allclose(
            f.get_tensor(key).float(), expected[:, :16], atol=1e-5
        )  # cut to the DiT text_len


def test_teacher_train_shift_moves_training_toward_mid_noise(tmp_path: Path) -> None:
    from training.distill import teacher_schedule

    default = teacher_schedule(parse_cli("teacher", ["--preset", "shapes"]))
    low = teacher_schedule(parse_cli("teacher", ["--preset", "shapes", "--train-shift", "3"]))
    assert default.shift == PRESETS["shapes"].sampling.shift == 8.0  # unchanged without the option

    def above(s) -> float:
        return float((s.sigmas > 0.9).double().mean())

    # shift 8 spends ~47% of the samples above sigma 0.9 (mostly irreducible noise), shift 3 ~25%
    assert above(default) == pytest.approx(0.47, abs=0.02) and above(low) == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ConfigError, match="--train-shift must be a positive number"):
        run(tmp_path, "teacher", "--steps", "2", "--train-shift", "0")
    assert not (tmp_path / "shapes" / "teacher" / "final.safetensors").exists()
    out = run(tmp_path, "teacher", "--steps", "4", "--train-shift", "3")
    assert len(out["rows"]) == 4 and all(np.isfinite(r["loss"]) for r in out["rows"])


def test_teacher_motion_weight_adds_the_temporal_difference_loss(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--motion-weight must be 0 or more"):
        run(tmp_path, "teacher", "--steps", "2", "--motion-weight", "-1")
    assert not (tmp_path / "shapes" / "teacher").exists()
    out = run(tmp_path, "teacher", "--steps", "3", "--motion-weight", "2")
    for r in out["rows"]:  # the flow loss stays logged on its own, so runs compare with and without
        assert r["loss"] == pytest.approx(r["flow_loss"] + 2 * r["motion_loss"], rel=1e-4)
        assert r["motion_loss"] > 0
    plain = run(tmp_path / "plain", "teacher", "--steps", "3")
    assert "motion_loss" not in plain["rows"][0]
    assert [r["loss"] for r in plain["rows"]][:1] == pytest.approx([out["rows"][0]["flow_loss"]], rel=1e-4)
