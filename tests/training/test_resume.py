"""``--resume`` continues bit for bit, after a planned stop and after SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS
from causvid_core.model import CausalWanModel
from training.distill import main

REPO = Path(__file__).resolve().parents[2]


def run(root: Path, stage: str, *args: str) -> dict:
    return main([stage, "--preset", "tiny", "--runs-dir", str(root), *args])


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optim(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    for name, oa in sa["optimizers"].items():
        ob = sb["optimizers"][name]
        for k, st in oa["state"].items():
            for field, value in st.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][k][field])), (
                    name,
                    k,
                    field,
                )


def make_teacher(root: Path) -> Path:
    torch.manual_seed(1)
    return save_model(CausalWanModel(PRESETS["tiny"].dit), root / "shapes" / "teacher" / "final.safetensors")


def test_teacher_resume_is_bit_for_bit(tmp_path: Path) -> None:
    straight = run(tmp_path / "a", "teacher", "--steps", "6", "--save-every", "3")
    run(tmp_path / "b", "teacher", "--steps", "3", "--save-every", "3")
    resumed = run(tmp_path / "b", "teacher", "--steps", "6", "--save-every", "3", "--resume")
    fa, fb = tmp_path / "a/shapes/teacher", tmp_path / "b/shapes/teacher"
    assert_same(weights(fa, "final.safetensors"), weights(fb, "final.safetensors"))
    assert_same_optim(fa / "state_000006.pt", fb / "state_000006.pt")
    assert [r["loss"] for r in straight["rows"]] == [r["loss"] for r in resumed["rows"]]


def test_dmd_resume_is_bit_for_bit(tmp_path: Path) -> None:
    args = ("--input", "data", "--skip-ode-init", "--save-every", "3", "--critic-steps", "2")
    for sub in ("a", "b"):
        make_teacher(tmp_path / sub)
    run(tmp_path / "a", "dmd", "--steps", "6", *args)
    run(tmp_path / "b", "dmd", "--steps", "3", *args)  # stops after a critic-only step
    run(tmp_path / "b", "dmd", "--steps", "6", "--resume", *args)
    fa, fb = tmp_path / "a/shapes/dmd-no-ode-init", tmp_path / "b/shapes/dmd-no-ode-init"
    assert_same(weights(fa, "final.safetensors"), weights(fb, "final.safetensors"))
    assert_same(weights(fa, "final_critic.safetensors"), weights(fb, "final_critic.safetensors"))
    assert_same_optim(fa / "state_000006.pt", fb / "state_000006.pt")
    start = load_file(str(tmp_path / "a/shapes/teacher/final.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in weights(fa, "final.safetensors").items())


def test_sigterm_saves_a_checkpoint_that_resumes_identically(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-u", "-m", "training.distill", "teacher", "--preset", "tiny", "--runs-dir",
           str(tmp_path / "b"), "--steps", "100000", "--save-every", "100000", "--log-every", "1"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 90
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "3/100000" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    # stopped, not finished: exit 143 (so a script's `set -e` does not go on to the next stage), no "done"
    assert proc.returncode == 143, "".join(lines) + rest
    assert "SIGTERM: saved teacher at step" in rest and "continue with the same command and --resume" in rest
    assert "== teacher done" not in rest
    folder = tmp_path / "b/shapes/teacher"
    states = sorted(folder.glob("state_*.pt"))
    assert len(states) == 1 and not (folder / "final.safetensors").exists()
    stopped = int(states[0].stem.split("_")[1])
    assert stopped >= 3
    total = str(stopped + 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): same float reduction order
    try:
        run(tmp_path / "b", "teacher", "--steps", total, "--save-every", "100000", "--resume")
        run(tmp_path / "a", "teacher", "--steps", total, "--save-every", "100000")
    finally:
        torch.set_num_threads(threads)
    assert_same(
        weights(tmp_path / "a/shapes/teacher", "final.safetensors"), weights(folder, "final.safetensors")
    )


def stopped_copy(src: Path, dst: Path) -> None:
    """``dst``: the 8-step run in ``src`` as if it had stopped after its step-6 checkpoint."""
    shutil.copytree(src, dst)
    for late in [*dst.glob("*000008*"), *dst.glob("final*")]:
        late.unlink()


def test_lr_schedule_warms_up_decays_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    """--lr-warmup / --lr-decay: the logged lr follows the schedule, and a run resumed from a checkpoint
    in the middle of it (same --steps) ends with the weights and optimizer state of the straight run."""
    args = ("--steps", "8", "--save-every", "6", "--lr", "1e-3", "--lr-warmup", "2", "--lr-decay", "0.5")
    straight = run(tmp_path / "a", "teacher", *args)
    lrs = [r["lr"] for r in straight["rows"]]
    expected = [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3 * (1 - 0.9 / 4), 1e-3 * (1 - 1.8 / 4), 1e-3 * (1 - 2.7 / 4)]
    assert lrs == pytest.approx(expected)
    folder_a, folder_b = tmp_path / "a/shapes/teacher", tmp_path / "b/shapes/teacher"
    stopped_copy(folder_a, folder_b)  # as if stopped after step 6, mid-decay
    resumed = run(tmp_path / "b", "teacher", *args, "--resume")
    assert [r["lr"] for r in resumed["rows"]][-2:] == pytest.approx(expected[6:])
    assert_same(weights(folder_a, "final.safetensors"), weights(folder_b, "final.safetensors"))
    assert_same_optim(folder_a / "state_000008.pt", folder_b / "state_000008.pt")
    # resumed with a lower --lr (what the NaN message advises): the schedule scales the new rate
    folder_c = tmp_path / "c/shapes/teacher"
    stopped_copy(folder_b, folder_c)
    lowered = run(tmp_path / "c", "teacher", *args[:-6], "--lr", "1e-4", *args[-4:], "--resume")
    assert [r["lr"] for r in lowered["rows"]][-2:] == pytest.approx([x / 10 for x in expected[6:]])


def test_ctrl_c_saves_like_sigterm_and_exits_130(tmp_path: Path) -> None:
    """A first Ctrl-C finishes the step, saves a checkpoint and says how to continue (it used to lose every
    step since the last save with a traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-u", "-m", "training.distill", "teacher", "--preset", "tiny", "--runs-dir",
           str(tmp_path), "--steps", "100000", "--save-every", "100000", "--log-every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    for line in proc.stdout:
        if "2/100000" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "Ctrl-C: saved teacher at step" in rest and "Traceback" not in rest
    assert len(list((tmp_path / "shapes/teacher").glob("state_*.pt"))) == 1


def test_resume_guards_name_what_changed(tmp_path: Path, capsys) -> None:
    """--resume with fewer steps than saved, changed options, another model shape, or another stage's
    folder: each says what and how, and a finished run continued to more steps drops its old final."""
    from training.config import ConfigError

    run(tmp_path, "teacher", "--steps", "4", "--save-every", "2")
    folder = tmp_path / "shapes/teacher"
    with pytest.raises(ConfigError, match=r"state_000004.pt is at step 4, past --steps 2: pass --steps 4 or more"):
        run(tmp_path, "teacher", "--steps", "2", "--resume")
    with pytest.raises(ConfigError, match=r"does not fit the model these options build .*dit.num_layers 2 -> 1"):
        run(tmp_path, "teacher", "--steps", "6", "--resume", "--dit.num-layers", "1")
    capsys.readouterr()
    seen = {}
    real = main.__globals__["CheckpointManager"].finalize

    def spy(self, step, trainables):  # the old final must be gone while the continued run trains
        seen["final before"] = (folder / "final.safetensors").exists()
        return real(self, step, trainables)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main.__globals__["CheckpointManager"], "finalize", spy)
        run(tmp_path, "teacher", "--steps", "6", "--save-every", "2", "--resume", "--lr", "0.0005")
    out = capsys.readouterr().out
    assert "resuming with changed options: lr 0.001 -> 0.0005; steps 4 -> 6" in out
    assert seen["final before"] is False and (folder / "final.safetensors").exists()
    with pytest.raises(ConfigError, match=r"holds checkpoints of the 'teacher' stage, not 'teacher-causal': choose"):
        run(tmp_path, "teacher", "--kind", "causal", "--out-dir", str(folder), "--resume")  # not mixed in
