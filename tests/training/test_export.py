"""Exporting a run as an embedded model: small float16 files the bundle loads, with a model card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from causvid_core.bundle import file_metadata, load_bundle
from causvid_core.vae import latent_stats_of, load_wan_vae
from training import distill
from training.config import make_config
from training.export import OUTSIDE_RUNS, _portable, export
from training.state import save_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_ships_a_loadable_embedded_model(tmp_path, monkeypatch) -> None:
    runs = tmp_path / "runs"
    common = {"runs_dir": str(runs), "steps": "2", "save_every": "2"}
    run = runs / "shapes"
    # a VAE in runs as docs/training.md trains one: a first run in its own folder, the next from its weights
    images = run / "vae-images"
    distill.run("vae", make_config("vae", "tiny", {**common, "stats_samples": "2", "out_dir": str(images)}))
    init = str(images / "final.safetensors")
    # the code recipe (docs/training.md): the runs between are listed too, in recipe order
    for name in ("vae-shape", "vae-code", "vae-clips2"):
        cfg = {**common, "stats_samples": "2", "init": init, "out_dir": str(run / name)}
        distill.run("vae", make_config("vae", "tiny", cfg))
        init = str(run / name / "final.safetensors")
    distill.run("vae", make_config("vae", "tiny", {**common, "stats_samples": "2", "init": init}))
    # the teacher in two runs as the recipe trains it: teacher-base, then continued from its weights
    base = run / "teacher-base"
    distill.run("teacher", make_config("teacher", "tiny", {**common, "vae": "run", "out_dir": str(base)}))
    init = str(base / "final.safetensors")
    distill.run("teacher", make_config("teacher", "tiny", {**common, "vae": "run", "init": init}))
    (run / "dmd").mkdir()
    shutil.copy(run / "teacher" / "final.safetensors", run / "dmd" / "final.safetensors")

    out = tmp_path / "embedded" / "exported"
    files = export(run, out, commands=["python -m training.distill vae ..."])
    assert set(files) == {"dit.safetensors", "vae.safetensors", "teacher.safetensors", "text.safetensors"}
    with safe_open(str(out / "dit.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    card = (out / "MODEL_CARD.md").read_text()
    order = [card.index(f"| {name} | 2 |") for name in ("vae-images", "vae-shape", "vae-code", "vae-clips2", "vae")]
    assert order == sorted(order)
    assert "| teacher | 2 |" in card
    assert card.index("| teacher-base | 2 |") < card.index("| teacher | 2 |")
    assert "python -m training.distill vae" in card
    assert str(tmp_path) not in card and '"runs_dir": "runs"' in card  # no path of the training machine
    for part in files:
        with safe_open(str(out / part), "pt") as f:
            assert str(tmp_path) not in json.dumps(f.metadata())

    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(out.parent))
    bundle = load_bundle("embedded:exported")
    assert next(bundle.model.parameters()).dtype == torch.float32
    stats = latent_stats_of(run / "vae" / "final.safetensors")
    assert bundle.latents_mean == stats[0] and bundle.latents_std == stats[1]  # the DiT knows its VAE
    assert load_wan_vae(out / "vae.safetensors").config.latents_std == stats[1]
    assert bundle.text_encoder.encode(["a red circle moving right"]).shape[1:] == (16, 32)

    # into a folder that holds an earlier export: over the budget it is left as it was; without a teacher the
    # old teacher.safetensors goes (it would be shipped beside a student it was not exported with)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("training.export.BUDGET_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 25 MB budget"):
        export(run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".*export-tmp"))
    monkeypatch.undo()
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(out.parent))
    export(run, out, teacher=False)
    assert not (out / "teacher.safetensors").exists() and (out / "dit.safetensors").exists()

    # a fine-tuned decoder (vae-decoder) is what ships once it exists; the card lists its stage. This one was
    # an experiment trained outside the runs folder and moved in: neither the card nor the shipped weights name
    # the folder it was trained in, and its config says where it lies now
    elsewhere = tmp_path / "experiments" / "dec"
    cfg = {**common, "decoder_only": "true", "mask_weight": "1", "out_dir": str(elsewhere),
           "init": str(run / "vae" / "final.safetensors")}
    distill.run("vae", make_config("vae", "tiny", cfg))
    shutil.move(str(elsewhere), str(run / "vae-decoder"))
    export(run, out, commands=[])
    card = (out / "MODEL_CARD.md").read_text()
    assert str(tmp_path) not in card and '"out_dir": "runs/shapes/vae-decoder"' in card
    with safe_open(str(out / "vae.safetensors"), "pt") as f:
        shipped_cfg = json.loads(f.metadata()["causvid_training"])
    assert shipped_cfg["out_dir"] == "runs/shapes/vae-decoder"
    assert shipped_cfg["init"] == "runs/shapes/vae/final.safetensors"
    tuned = load_wan_vae(run / "vae-decoder" / "final.safetensors").state_dict()
    shipped = load_wan_vae(out / "vae.safetensors").state_dict()
    key = next(k for k in tuned if k.startswith("decoder.") and k.endswith("weight"))
    first = load_wan_vae(run / "vae" / "final.safetensors").state_dict()
    assert not torch.equal(first[key].half(), tuned[key].half())
    assert torch.equal(shipped[key], tuned[key].half().float())
    assert "| vae-decoder | 2 |" in card

    # a decoder fine-tuned on the student's own latents (vae --student, vae-student) ships over vae-decoder, and
    # the card lists it after the student. Stood in for here by vae-decoder's weights with one tensor changed
    shutil.copytree(run / "vae-decoder", run / "vae-student")
    weights = load_file(str(run / "vae-student" / "final.safetensors"))
    weights[key] = weights[key] + 1
    save_weights(weights, run / "vae-student" / "final.safetensors",
                 file_metadata(run / "vae-decoder" / "final.safetensors"))
    export(run, out, commands=[])
    assert torch.equal(load_wan_vae(out / "vae.safetensors").state_dict()[key], (tuned[key] + 1).half().float())
    card = (out / "MODEL_CARD.md").read_text()
    assert card.index("| vae-decoder | 2 |") < card.index("| dmd |") < card.index("| vae-student | 2 |")


def test_export_names_the_missing_stage(tmp_path) -> None:
    # the error gives the command that makes the missing folder, for this run's name and runs folder
    made = r"vae/final.safetensors not found: train it with python -m training.distill vae --preset shapes "
    with pytest.raises(ValueError, match=made + re.escape(f"--name nothing --runs-dir {tmp_path}")):
        export(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "nothing" / "vae").mkdir(parents=True)
    (tmp_path / "nothing" / "vae" / "final.safetensors").write_bytes(b"")  # present: the student is next
    with pytest.raises(ValueError, match=r"dmd-causal-teacher/final.safetensors not found: .* dmd .*--teacher-kind causal"):
        export(tmp_path / "nothing", tmp_path / "out", dit_stage="dmd-causal-teacher")
    # a student trained on the weight-free stand-in's latents would ship with a VAE its latents do not fit
    from causvid_core.checkpoint import save_model
    from causvid_core.config import PRESETS
    from causvid_core.model import CausalWanModel

    (tmp_path / "nothing" / "dmd").mkdir()
    save_model(CausalWanModel(PRESETS["tiny"].dit), tmp_path / "nothing" / "dmd" / "final.safetensors",
               extra_metadata={"causvid_training": {"vae": "pool"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained on --vae pool latents, not this run's VAE"):
        export(tmp_path / "nothing", tmp_path / "out", teacher=False)
    assert not (tmp_path / "out").exists()


def test_a_causal_teacher_student_ships_with_its_chain_in_the_card(tmp_path) -> None:
    runs = tmp_path / "runs"
    common = {"runs_dir": str(runs), "steps": "2", "save_every": "2"}
    run = runs / "shapes"
    distill.run("vae", make_config("vae", "tiny", {**common, "stats_samples": "2"}))
    distill.run("teacher", make_config("teacher", "tiny", {**common, "vae": "run", "kind": "causal"}))
    # the bidirectional teacher came from an earlier run folder: its weights are here, its log is not
    (run / "teacher").mkdir()
    shutil.copy(run / "teacher-causal" / "final.safetensors", run / "teacher" / "final.safetensors")
    (run / "teacher-causal-base").mkdir()  # version 5's first causal run (continued into teacher-causal)
    shutil.copy(run / "teacher-causal" / "final.safetensors", run / "teacher-causal-base" / "final.safetensors")
    (run / "dmd-causal-teacher").mkdir()
    shutil.copy(run / "teacher-causal" / "final.safetensors", run / "dmd-causal-teacher" / "final.safetensors")
    (run / "dmd").mkdir()  # a Table 4 row of the same run folder, not behind the shipped student
    shutil.copy(run / "teacher-causal" / "final.safetensors", run / "dmd" / "final.safetensors")

    out = tmp_path / "embedded" / "causal"
    export(run, out, dit_stage="dmd-causal-teacher", teacher_stage="teacher-causal")
    card = (out / "MODEL_CARD.md").read_text()
    assert card.index("| teacher | 2 | in an earlier run folder") < card.index("| teacher-causal | 2 |")
    assert card.index("| teacher-causal-base | 2 | in an earlier") < card.index("| teacher-causal | 2 |")
    assert "<summary>dmd-causal-teacher</summary>" in card and "<summary>dmd</summary>" not in card
    with safe_open(str(out / "teacher.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["causvid_training"])["kind"] == "causal"
    with pytest.raises(ValueError, match="teacher-base/final.safetensors not found: train the stage that writes it first"):
        export(run, out, teacher_stage="teacher-base")

    # version 6 ships the ODE-init student: its card ends the chain there (the DMD run after it is a Table 4 row)
    (run / "ode-init-causal-teacher").mkdir()
    shutil.copy(run / "teacher-causal" / "final.safetensors", run / "ode-init-causal-teacher" / "final.safetensors")
    export(run, out, dit_stage="ode-init-causal-teacher", teacher_stage="teacher-causal")
    card = (out / "MODEL_CARD.md").read_text()
    assert "<summary>ode-init-causal-teacher</summary>" in card and "<summary>teacher-causal</summary>" in card
    assert "<summary>dmd-causal-teacher</summary>" not in card


def test_a_card_names_no_folder_outside_the_runs_directory() -> None:
    # a stage started from weights in a scratch folder (an experiment promoted to the recipe): the card says the
    # weights came from outside the runs folder without naming the machine's folder
    cfg = {"runs_dir": "/data/me/runs", "init": "/scratch/me/dec/final.safetensors", "out_dir": "/scratch/me/dec2",
           "data": "/data/me/runs/shapes/latents", "lr": 1e-4}
    card = _portable(cfg, Path("/data/me/runs/shapes/vae-decoder"))
    assert card == {"runs_dir": "runs", "init": OUTSIDE_RUNS, "out_dir": "runs/shapes/vae-decoder",
                    "data": "runs/shapes/latents", "lr": 1e-4}
    assert "/scratch" not in json.dumps(_portable(cfg)) and _portable(cfg)["out_dir"] == OUTSIDE_RUNS
