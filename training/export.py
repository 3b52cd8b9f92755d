"""Ship a trained run as an embedded model: ``python -m training.export --name shapes --to DIR``.

Writes ``DIR/dit.safetensors`` (the distilled causal student), ``vae.safetensors``, ``text.safetensors``
(the Shapes text encoder table), optionally ``teacher.safetensors``, all in float16 to stay small
(the bundle computes in float32), and ``MODEL_CARD.md``: every stage's command, configuration, steps,
wall time and final losses read back from the run folder, plus the evaluation figures when given.
``DIR`` = ``causvid_core/embedded/shapes`` makes it ``embedded:shapes``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from causvid_core.bundle import file_metadata
from causvid_core.text import ShapesTextEncoder

from .state import save_weights

BUDGET_BYTES = 25 * 1000 * 1000  # SHAPES.md: all shipped weights together at most 25 MB
SHIPPED_FILES = ("dit.safetensors", "vae.safetensors", "teacher.safetensors", "text.safetensors", "MODEL_CARD.md")
OUTSIDE_RUNS = "(a folder outside the runs directory)"  # what the card says for a path it must not name
# the card's stage folders in recipe order; vae-images / vae-colour / vae-clips / vae-shape and teacher-base
# are the earlier runs of a stage trained in several (docs/training.md), each continued with --init by the next
# stages a run folder lacks are left out of the card (older recipes had no vae-code or vae-clips2)
STAGES = ("vae-images", "vae-colour", "vae-clips", "vae-shape", "vae-code", "vae-clips2", "vae", "vae-decoder",
          "latents", "teacher-base", "teacher", "ode-pairs", "ode-init", "dmd")
# a student distilled from the causal teacher (fine-tuned from the bidirectional one, since version 5 in two
# runs: teacher-causal-base, continued into teacher-causal) comes from this chain
# the decoder fine-tuned on the shipped student's own latents (vae --student, since version 14): after the student
STUDENT_DECODER = "vae-student"
CAUSAL_CHAIN = ("teacher-causal-base", "teacher-causal", "ode-pairs-causal-teacher", "ode-init-causal-teacher", "dmd-causal-teacher")


def recipe_stages(dit_stage: str) -> tuple[str, ...]:
    """The stage folders behind the shipped student, in recipe order, up to the student's own (versions 6
    to 10 ship the causal chain's ODE-init student: the DMD run after it is a Table 4 row, not behind it)."""
    if dit_stage in CAUSAL_CHAIN:
        chain = STAGES[: STAGES.index("ode-pairs")] + CAUSAL_CHAIN[: CAUSAL_CHAIN.index(dit_stage) + 1]
    else:
        chain = STAGES[: STAGES.index(dit_stage) + 1] if dit_stage in STAGES else STAGES
    return (*chain, STUDENT_DECODER)  # left out of the card where the run has none


def shipped_vae(run: Path) -> Path:
    """The VAE an export ships: the decoder fine-tuned on the student's own latents (vae-student) when the run
    has one, else the fine-tuned decoder (vae-decoder), else the VAE stage's own; all share one encoder."""
    for folder in (STUDENT_DECODER, "vae-decoder"):
        if (run / folder / "final.safetensors").is_file():
            return run / folder / "final.safetensors"
    return run / "vae" / "final.safetensors"


def _half(src: Path, dst: Path, extra: dict[str, str] | None = None) -> int:
    """Copy a safetensors in float16 (metadata kept with portable paths, ``extra`` added); returns the
    written size."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    meta = {k: v for k, v in file_metadata(src).items() if k != "format"}
    if "causvid_training" in meta:  # the shipped weights name no folder of the training machine either
        meta["causvid_training"] = json.dumps(_portable(json.loads(meta["causvid_training"]), src.parent))
    meta.update(extra or {})
    save_weights(sd, dst, meta)
    return dst.stat().st_size


def stage_summary(folder: Path) -> dict[str, Any] | None:
    """Steps, wall time and last metrics of a stage from its log.csv (None when the stage never ran)."""
    log = folder / "log.csv"
    if not log.is_file():
        return None
    with log.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    last = {k: float(v) for k, v in rows[-1].items() if v not in ("", None)}
    tail = rows[-max(1, len(rows) // 20) :]  # the last 5% of steps, to smooth per-batch noise
    means = {k: sum(float(r[k]) for r in tail if r.get(k)) / len(tail) for k in rows[-1] if k != "step"}
    return {"steps": int(last["step"]), "wall_s": last.get("wall_s", 0.0), "last": means}


def _portable(cfg: dict[str, Any], stage_dir: Path | None = None) -> dict[str, Any]:
    """``runs_dir`` becomes ``runs`` and paths under it ``runs/...``: the card names no folder of the
    machine that trained the model (the recipe's commands use ``--runs-dir runs``). A stage trained
    elsewhere and moved into the run folder (an experiment promoted to the recipe) gets ``stage_dir``, where
    it now lies, as its ``out_dir`` (``runs/NAME/STAGE``); any other path outside the runs folder is named
    only as such."""
    root = cfg.get("runs_dir")
    if not isinstance(root, str) or not root:
        return cfg
    prefix = root.rstrip("/") + "/"
    out = {}
    for key, value in cfg.items():
        if key == "runs_dir":
            value = "runs"
        elif isinstance(value, str) and value.startswith(prefix):
            value = "runs/" + value[len(prefix) :]
        elif isinstance(value, str) and value.startswith("/"):
            if key == "out_dir" and stage_dir is not None:  # an experiment promoted: where it lies now
                value = f"runs/{stage_dir.parent.name}/{stage_dir.name}"
            else:
                value = OUTSIDE_RUNS
        out[key] = value
    return out


def model_card(run: Path, files: dict[str, int], figures: dict[str, Any] | None, commands: list[str],
               stages: tuple[str, ...] = STAGES) -> str:  # fmt: skip
    """MODEL_CARD.md text for a run folder."""
    lines = [
        "# embedded:shapes", "",
        "A small CausVid model for the Shapes domain (SHAPES.md in the project notes, `shared/` beside the "
        "checkout; README), trained from scratch on a CPU by this package's own `training/` recipe. It is "
        "what a fresh install renders "
        "with, what the CPU tests run and where the paper's claims are checked in miniature "
        "(docs/reproduction.md).", "",
        "## Files", "",
        "| file | bytes |", "|---|---|",
        *[f"| {name} | {size:,} |" for name, size in files.items()],
        f"| total | {sum(files.values()):,} (budget {BUDGET_BYTES:,}) |", "",
        "Weights are stored in float16; the bundle loads them in float32.", "",
        "## Recipe", "", "```", *commands, "```", "",
        "## Stages", "",
        "| stage | steps | wall time | final metrics (mean of the last 5% of steps) |", "|---|---|---|---|",
    ]  # fmt: skip
    total = 0.0
    configs = {}
    for stage in stages:
        summary = stage_summary(run / stage)
        meta = file_metadata(run / stage / "final.safetensors")  # {} when the stage has no final weights
        # the training config saved in the stage's final weights, with this machine's paths made portable
        raw = meta.get("causvid_training")
        cfg = _portable(json.loads(raw), run / stage) if raw else None
        if cfg:
            configs[stage] = cfg
        if summary is None:
            step = meta.get("causvid_step") if cfg else None
            if step:  # weights copied from an earlier run folder: its log stayed there
                lines.append(f"| {stage} | {step} | in an earlier run folder (docs/reproduction.md) | |")
            continue
        total += summary["wall_s"]
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary["last"].items() if k not in ("wall_s", "skipped", "lr"))
        lines.append(f"| {stage} | {summary['steps']} | {summary['wall_s'] / 60:.1f} min | {metrics} |")
    lines += ["", f"Training wall time of the stages with a step loop: {total / 60:.1f} min on the machine "
              "named in docs/reproduction.md (data preparation and ODE pairs are listed there).", ""]  # fmt: skip
    if figures:
        lines += ["## Figures (Shapes metrics, 0-100)", "", "```", json.dumps(figures, indent=2), "```", ""]
    lines += ["## Configurations (as saved in the checkpoints; seeds included)", ""]
    for stage, cfg in configs.items():
        lines += [f"<details><summary>{stage}</summary>", "", "```json", json.dumps(cfg, indent=1), "```",
                  "</details>", ""]  # fmt: skip
    return "\n".join(lines)


def _made_by(folder: str, run: Path) -> str:
    """The training command whose output is ``run/folder`` (the stage and the options that name it)."""
    from .config import ConfigError, make_config, stage_name

    variants = [("vae", {}), ("vae", {"decoder_only": True}), ("teacher", {}), ("teacher", {"kind": "causal"}),
                ("ode-init", {}), ("ode-init", {"teacher_kind": "causal"}), ("dmd", {}),
                ("dmd", {"teacher_kind": "causal"}), ("dmd", {"skip_ode_init": True}),
                ("dmd", {"skip_ode_init": True, "teacher_kind": "causal"})]  # fmt: skip
    for stage, options in variants:
        try:
            made = stage_name(make_config(stage, "shapes", options))
        except ConfigError:
            continue
        if made == folder:
            flags = "".join(f" --{k.replace('_', '-')} {str(v).lower() if v is True else v}" for k, v in options.items())
            return (f"train it with python -m training.distill {stage} --preset shapes --name {run.name} "
                    f"--runs-dir {run.parent}{flags} (scripts/train_shapes.sh and reproduce_shapes.sh run them all)")  # fmt: skip
    return f"train the stage that writes it first (a stage's own folder, or one given --out-dir {run / folder})"


def _check_same_encoder(dit: Path, used: str | None, vae: Path) -> None:
    """The shipped VAE must encode as the one the DiT's latents came from (``used``, its run's --vae):
    ``run`` (this run's vae/, whose encoder vae-decoder/ keeps) or a file with the same encoder weights."""
    if used in (None, "run"):
        return
    path = Path(used)
    if not path.is_file():
        raise ValueError(
            f"{dit} was trained on --vae {used} latents, not this run's VAE ({vae}): the shipped model would "
            "decode with a VAE its latents do not fit; export a student trained with --vae run"
        )
    theirs, ours = load_file(str(path)), load_file(str(vae))
    keys = [k for k in theirs if k.startswith(("encoder.", "conv1."))]  # conv1: the latent head
    if not keys or any(k not in ours or not torch.equal(theirs[k].float(), ours[k].float()) for k in keys):
        raise ValueError(f"{dit} was trained on latents of {path}, whose encoder is not that of {vae}")


def export(run: Path, out: Path, dit_stage: str = "dmd", teacher: bool = True,
           figures: dict[str, Any] | None = None, commands: list[str] | None = None,
           teacher_stage: str = "teacher") -> dict[str, int]:  # fmt: skip
    """Write the embedded model folder; returns file sizes. Raises ValueError naming a missing stage.
    ``teacher_stage``: the folder of the teacher shipped as teacher.safetensors."""
    vae = shipped_vae(run)
    needed = {"vae": vae, dit_stage: run / dit_stage / "final.safetensors"}
    if teacher:
        needed[teacher_stage] = run / teacher_stage / "final.safetensors"
    for folder, path in needed.items():
        if not path.is_file():
            raise ValueError(f"{path} not found: {_made_by(folder, run)}")
    cfg = json.loads(file_metadata(needed[dit_stage]).get("causvid_training") or "{}")
    _check_same_encoder(needed[dit_stage], cfg.get("vae"), needed["vae"])
    # everything is written into a scratch folder beside ``out`` first: over the budget or stopped
    # part-way, ``out`` (the shipped model, by default) is as it was
    final_out, out = out, out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        vae_meta = file_metadata(needed["vae"])
        stats = {"causvid_latents": vae_meta["causvid_latents"]} if "causvid_latents" in vae_meta else {}
        files = {
            "dit.safetensors": _half(needed[dit_stage], out / "dit.safetensors", stats),
            "vae.safetensors": _half(needed["vae"], out / "vae.safetensors"),
        }
        if teacher:
            files["teacher.safetensors"] = _half(needed[teacher_stage], out / "teacher.safetensors", stats)
        dit = cfg["dit"]
        text = ShapesTextEncoder(dit["text_dim"], dit["text_len"], seed=cfg.get("text_seed", 0))
        save_weights({k: v.contiguous() for k, v in text.state_dict().items()}, out / "text.safetensors", {})
        files["text.safetensors"] = (out / "text.safetensors").stat().st_size
        if sum(files.values()) > BUDGET_BYTES:
            raise ValueError(f"the shipped weights take {sum(files.values()):,} bytes, over the 25 MB budget")
        (out / "MODEL_CARD.md").write_text(model_card(run, files, figures, commands or [], recipe_stages(dit_stage)))
        final_out.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:  # a file this export does not ship (a teacher, with --no-teacher) goes
            if (out / name).exists():
                os.replace(out / name, final_out / name)
            else:
                (final_out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--to", default=str(Path(__file__).resolve().parents[1] / "causvid_core/embedded/shapes"))
    parser.add_argument("--dit", default="dmd", help="stage folder of the shipped student (default dmd)")
    parser.add_argument("--no-teacher", action="store_true", help="do not ship a teacher")
    parser.add_argument("--teacher", default="teacher",
                        help="stage folder of the teacher to ship (default teacher; teacher-causal)")  # fmt: skip
    parser.add_argument("--figures", help="JSON of evaluation figures to put in the model card")
    parser.add_argument("--commands", help="text file with the recipe's commands, one per line")
    args = parser.parse_args(argv)
    for flag, path in (("--figures", args.figures), ("--commands", args.commands)):
        if path and not Path(path).is_file():
            print(f"error: {flag} {path} not found", file=sys.stderr)
            return 2
    figures = json.loads(Path(args.figures).read_text()) if args.figures else None
    commands = Path(args.commands).read_text().splitlines() if args.commands else []
    try:
        files = export(Path(args.runs_dir) / args.name, Path(args.to), args.dit, not args.no_teacher,
                       figures, commands, args.teacher)  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.to}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in files.items()))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
