"""scripts/train_shapes.sh (the shipped recipe): every command it runs must name a real stage and real
options, so a user who runs it for hours does not meet a typo at the last stage. Each command is checked,
not run, by a stand-in Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECKER = """
import os, sys
from pathlib import Path
args = sys.argv[1:]
log = Path(os.environ["RECIPE_LOG"])
assert args[0] == "-m", args
module, rest = args[1], args[2:]
if module == "torch.distributed.run":  # the launcher of NPROC > 1: its own options, then -m MODULE ...
    assert "--nproc_per_node" in rest and os.environ.get("OMP_NUM_THREADS") == "1", rest
    at = rest.index("-m")
    module, rest = rest[at + 1], rest[at + 2:]
if module == "training.distill":
    from training.config import parse_cli
    cfg = parse_cli(rest[0], rest[1:])  # raises ConfigError on an unknown stage or option
    if rest[0] == "precompute":  # the scripts mark the finished latents beside them
        (Path(cfg.runs_dir) / cfg.name / "latents").mkdir(parents=True, exist_ok=True)
    log.write_text(log.read_text() + rest[0] + "\\n")
elif module == "training.export":
    import training.export as export
    export.export = lambda *a, **k: {}  # parse the options only; nothing to ship
    export.main(rest)
    log.write_text(log.read_text() + "export\\n")
else:
    raise SystemExit(f"unexpected module {module}")
"""


@pytest.mark.parametrize(
    ("script", "stages"),
    [
        ("train_shapes.sh", ["vae"] * 5 + ["precompute", "teacher", "teacher", "teacher", "ode-pairs", "ode-init",
                                          "vae", "export"]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_recipe_script_commands_are_valid(tmp_path, script, stages, nproc) -> None:
    checker = tmp_path / "checker.py"
    checker.write_text(CHECKER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{checker}" "$@"\n')
    python.chmod(0o755)
    log = tmp_path / "stages.txt"
    log.write_text("")
    env = {**os.environ, "PYTHON": str(python), "RUNS": str(tmp_path / "runs"), "NPROC": nproc,
           "RECIPE_LOG": str(log), "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log.read_text().split() == stages


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_python_scripts_run_as_the_docs_call_them(tmp_path, script) -> None:
    """`python scripts/NAME.py --help`, as README and docs/ call them: from the checkout, no PYTHONPATH and
    nothing installed, each finds the package beside it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
