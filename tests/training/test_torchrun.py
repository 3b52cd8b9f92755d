"""``torchrun --nproc_per_node 2`` on the CPU (gloo): a DMD run ends with the same weights on both ranks."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS
from causvid_core.model import CausalWanModel

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_dmd_keeps_ranks_in_sync(tmp_path: Path) -> None:
    torch.manual_seed(1)
    save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "shapes" / "teacher" / "final.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "training.distill", "dmd", "--preset", "tiny",
        "--runs-dir", str(tmp_path), "--input", "data", "--skip-ode-init", "--steps", "2", "--device", "cpu", "--data-size", "0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "world size 2" in out
    digests = {(m[1], m[0]): m[2] for m in re.findall(r"rank (\d): (\w+) digest ([0-9a-f]{16})", out)}
    assert set(digests) == {("step", "0"), ("step", "1"), ("critic", "0"), ("critic", "1")}, out
    assert digests["step", "0"] == digests["step", "1"]
    assert digests["critic", "0"] == digests["critic", "1"]
    folder = tmp_path / "shapes" / "dmd-no-ode-init"
    assert (folder / "final.safetensors").exists() and (folder / "state_000002.pt").exists()
    # rank 0 alone logs: one CSV with one row per step
    assert (folder / "log.csv").read_text().count("\n") == 3


def test_a_rank_that_fails_alone_stops_the_run_with_its_error(tmp_path: Path) -> None:
    """Rank 0 alone writes the sample videos; when that fails (here a file stands where their folder goes, as a
    full or read-only disk would fail it) the run must end with the error, not hang: rank 1 waits in the next
    step's all-reduce, so rank 0 may not wait for it on the way out."""
    torch.manual_seed(1)
    save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "shapes" / "teacher" / "final.safetensors")
    folder = tmp_path / "shapes" / "dmd-no-ode-init"
    folder.mkdir(parents=True)
    (folder / "samples").write_text("in the way")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "training.distill", "dmd", "--preset", "tiny",
        "--runs-dir", str(tmp_path), "--input", "data", "--skip-ode-init", "--steps", "4", "--device", "cpu",
        "--data-size", "0", "--sample-every", "1", "--save-every", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert str(folder / "samples") in out, out  # rank 0's error, printed
    assert (folder / "state_000001.pt").exists(), out  # the step before it is kept
