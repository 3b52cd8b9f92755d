"""The queue helper (``python -m causvid_core.queue``) against the real ComfyUI host, on its built-in nodes.

One ``main.py --cpu`` serves the module; the restart test runs its own server, SIGKILLs it right after
job 2 is queued and starts a new one on the same port and output folder. Every server is killed at the end
(finally blocks, plus PR_SET_PDEATHSIG should pytest itself die).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from causvid_core.queue import client as queue_client
from causvid_core.queue.cli import main
from causvid_core.queue.jobs import JobError, build_jobs, load_rows, load_workflow
from causvid_core.queue.runner import ProgressLine, Runner

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# A real host over HTTP
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Comfy:
    """A ``main.py`` on a fixed port; ``start`` again after a kill reuses the port and the folders."""

    root: Path
    work: Path
    port: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> Path:
        return self.work / "output"

    def start(self) -> subprocess.Popen:
        (self.work / "base" / "custom_nodes").mkdir(parents=True, exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--output-directory", str(self.output), "--base-directory", str(self.work / "base")]
        cmd += ["--disable-all-custom-nodes", "--disable-api-nodes", "--disable-auto-launch"]
        cmd += ["--database-url", "sqlite:///:memory:"]
        with open(self.work / "server.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.procs[-1].returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                get(self.base, "/object_info")
                return
            time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return (self.work / "server.log").read_text(errors="replace")[-3000:]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def _die_with_parent() -> None:
    """In the child: SIGKILL when pytest dies, so no server outlives the run (Linux prctl)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfy_server(root: Path, work: Path) -> Iterator[Comfy]:
    comfy = Comfy(root, work, _free_port())
    try:
        comfy.start()
        comfy.wait_ready()
        yield comfy
    finally:
        comfy.kill_all()


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def comfy(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Comfy]:
    with comfy_server(comfy_root, tmp_path_factory.mktemp("queue_host")) as server:
        yield server


# ----------------------------------------------------------------------------------------------------------
# Workflows and job files
# ----------------------------------------------------------------------------------------------------------


def image_workflow(prefix: str = "queue/default") -> dict:
    """EmptyImage -> SaveImage in API format (runs in well under a second on the CPU)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def run_cli(args: list[str], summary: Path) -> tuple[int, dict]:
    code = main([*args, "--summary-json", str(summary)])
    return code, json.loads(summary.read_text())


def check_image(comfy: Comfy, output: dict, prefix: str, width: int, color: int, height: int = 8) -> None:
    """The listed file exists under the substituted prefix, with the substituted width and colour."""
    subfolder, stem = prefix.rsplit("/", 1)
    assert output["subfolder"] == subfolder and output["filename"].startswith(stem + "_")
    path = comfy.output / output["subfolder"] / output["filename"]
    assert path.is_file(), f"{path} is in the summary but not on disk"
    with Image.open(path) as image:
        assert image.size == (width, height)
        assert image.convert("RGB").getpixel((0, 0)) == ((color >> 16) & 255, (color >> 8) & 255, color & 255)


# ----------------------------------------------------------------------------------------------------------
# Queuing against the real host
# ----------------------------------------------------------------------------------------------------------


def test_five_jobs_finish_with_their_substitutions(comfy: Comfy, tmp_path: Path, capsys) -> None:
    tag = uuid.uuid4().hex[:8]
    jobs = [(f"clip{i}", 0x100000 * i + 0x40, 16 + 8 * i, f"five_{tag}/clip{i}") for i in range(5)]
    jobs_csv = write_csv(
        tmp_path / "jobs.csv", ["name", "1.color", "1.width", "2.filename_prefix"], [list(j) for j in jobs]
    )
    workflow = write_json(tmp_path / "wf.json", image_workflow())
    code, summary = run_cli([str(workflow), str(jobs_csv), "--server", comfy.base], tmp_path / "s.json")
    assert code == 0, capsys.readouterr()
    assert summary["counts"] == {"ok": 5, "failed": 0, "invalid": 0}
    for (name, color, width, prefix), result in zip(jobs, summary["jobs"], strict=True):
        assert result["name"] == name and result["status"] == "ok" and result["submissions"] == 1
        assert len(result["outputs"]) == 1
        check_image(comfy, result["outputs"][0], prefix, width, color)
    table = capsys.readouterr().out
    assert all(f"clip{i}" in table for i in range(5)) and "5 jobs: 5 ok, 0 failed, 0 invalid" in table


def test_bad_jobs_are_reported_and_the_others_still_run(comfy: Comfy, tmp_path: Path) -> None:
    """A JSON job list, followed by polling /history (--poll) instead of the websocket."""
    tag = uuid.uuid4().hex[:8]
    rows = [
        {"name": "first", "1.width": 24, "2.filename_prefix": f"bad_{tag}/first"},
        {"name": "negative", "1.width": -5, "2.filename_prefix": f"bad_{tag}/negative"},
        {"name": "word", "1.width": "wide", "2.filename_prefix": f"bad_{tag}/word"},
        {"name": "escape", "2.filename_prefix": "../escape"},
        {"name": "last", "1.width": 40, "1.color": 0xFF0000, "2.filename_prefix": f"bad_{tag}/last"},
    ]
    workflow = write_json(tmp_path / "wf.json", image_workflow())
    jobs = write_json(tmp_path / "jobs.json", rows)
    code, summary = run_cli([str(workflow), str(jobs), "--server", comfy.base, "--poll"], tmp_path / "s.json")
    assert code == 1
    results = summary["jobs"]
    assert [r["status"] for r in results] == ["ok", "invalid", "invalid", "failed", "ok"]
    # The server's own message, with the node and input it names.
    assert "Value -5 smaller than min of 1" in results[1]["error"]
    assert "node 1 (EmptyImage) input 'width'" in results[1]["error"]
    assert results[1]["node_errors"]["1"]["class_type"] == "EmptyImage"
    # A value that cannot be an integer never reaches the server; the column is named.
    assert "'1.width'" in results[2]["error"] and "'wide' is not an integer" in results[2]["error"]
    assert results[2]["submissions"] == 0
    # Fails while running: the node and the host's exception message.
    assert "node 2 (SaveImage) failed" in results[3]["error"]
    assert "outside the output folder" in results[3]["error"]
    check_image(comfy, results[4]["outputs"][0], f"bad_{tag}/last", 40, 0xFF0000)


def test_server_killed_and_restarted_mid_queue(
    comfy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGKILL right after job 2 is queued, a new server on the same port: every job still finishes."""
    with comfy_server(comfy_root, tmp_path / "host") as comfy:
        submit = queue_client.Server.submit
        calls = []

        def submit_then_kill(self, prompt, client_id, prompt_id):
            answer = submit(self, prompt, client_id, prompt_id)
            calls.append(answer)
            if len(calls) == 2:  # job 2 is queued (and big enough to still be running): kill, restart
                comfy.procs[-1].kill()
                comfy.procs[-1].wait(timeout=30)
                comfy.start()
            return answer

        monkeypatch.setattr(queue_client.Server, "submit", submit_then_kill)
        # Noise makes the PNGs slow to write: job 2 (1024x1024 x 4) is still running when the kill comes.
        big = {"width": 1024, "height": 1024, "batch": 4}
        rows = [
            [f"job{i}", *(big.values() if i == 2 else (16, 8, 1)), i, f"restart/job{i}"] for i in range(1, 6)
        ]
        header = ["name", "1.width", "1.height", "1.batch_size", "seed", "2.filename_prefix"]
        jobs = write_csv(tmp_path / "jobs.csv", header, rows)
        noisy = image_workflow()
        noisy["3"] = {
            "class_type": "ImageAddNoise",
            "inputs": {"image": ["1", 0], "seed": 0, "strength": 0.5},
        }
        noisy["2"]["inputs"]["images"] = ["3", 0]
        workflow = write_json(tmp_path / "wf.json", noisy)
        args = [str(workflow), str(jobs), "--server", comfy.base, "--retries", "4", "--timeout", "120"]
        code, summary = run_cli(args, tmp_path / "s.json")
        log = capsys.readouterr().err
        assert code == 0, log + comfy.log_tail()
        assert len(comfy.procs) == 2 and comfy.procs[0].returncode == -signal.SIGKILL
        assert [r["status"] for r in summary["jobs"]] == ["ok"] * 5
        # Job 2 died with the first server and was submitted again; the others went in once.
        assert [r["submissions"] for r in summary["jobs"]] == [1, 2, 1, 1, 1]
        assert "lost prompt" in log and "submitting again" in log
        restarted_history = get(comfy.base, "/history")
        for result in summary["jobs"][1:]:
            assert result["prompt_id"] in restarted_history  # ran on the new server
        for (_, width, height, batch, _, prefix), result in zip(rows, summary["jobs"], strict=True):
            names = [o["filename"] for o in result["outputs"]]
            assert len(names) == batch and all(n.startswith(prefix.split("/")[1] + "_") for n in names)
            with Image.open(comfy.output / "restart" / result["outputs"][-1]["filename"]) as image:
                assert image.size == (width, height)


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        raw = answer.read()
    return json.loads(raw) if raw else {}


def queue_blocker(comfy: Comfy) -> str:
    """Queue someone else's slow prompt (noisy 1024x1024 x 8 PNGs, about a second); returns its id."""
    blocker = image_workflow(f"blocker_{uuid.uuid4().hex[:8]}/b")
    blocker["3"] = {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 7, "strength": 0.5}}
    blocker["2"]["inputs"]["images"] = ["3", 0]
    blocker["1"]["inputs"].update(width=1024, height=1024, batch_size=8)
    return post(comfy.base, "/prompt", {"prompt": blocker, "client_id": "blocker"})["prompt_id"]


def wait_idle(comfy: Comfy, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while get(comfy.base, "/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_job_past_its_timeout_is_failed_and_taken_off_the_queue(comfy: Comfy, tmp_path: Path) -> None:
    """Behind a slow prompt the job times out while pending: it is deleted and never runs."""
    blocker_id = queue_blocker(comfy)
    jobs = write_json(tmp_path / "jobs.json", [{"name": "late", "2.filename_prefix": "late/x"}])
    args = [str(write_json(tmp_path / "wf.json", image_workflow())), str(jobs), "--server", comfy.base]
    code, summary = run_cli([*args, "--timeout", "0.3"], tmp_path / "s.json")
    (result,) = summary["jobs"]
    assert code == 1 and result["status"] == "failed" and "timed out after 0.3 s" in result["error"]
    assert result["seconds"] < 5  # did not wait for the slow prompt ahead of it
    wait_idle(comfy)
    history = get(comfy.base, "/history")
    assert history[blocker_id]["status"]["status_str"] == "success"  # someone else's prompt: untouched
    assert result["prompt_id"] not in history and not (comfy.output / "late").exists()


def test_a_job_deleted_in_comfyui_fails_and_is_not_resubmitted(
    comfy: Comfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user removed it from ComfyUI's queue on purpose: the helper does not put it back."""
    queue_blocker(comfy)
    submit = queue_client.Server.submit

    def submit_then_delete(self, prompt, client_id, prompt_id):
        answer = submit(self, prompt, client_id, prompt_id)
        post(comfy.base, "/queue", {"delete": [answer]})  # what the queue panel's delete button sends
        return answer

    monkeypatch.setattr(queue_client.Server, "submit", submit_then_delete)
    (job,) = build_jobs(image_workflow("deleted/x"), [{"name": "deleted"}])
    (result,) = Runner(queue_client.Server(comfy.base), poll=0.5, log=io.StringIO()).run([job])
    assert result.status == "failed" and result.submissions == 1
    assert "left the server's queue without running" in result.error
    wait_idle(comfy)
    assert result.prompt_id not in get(comfy.base, "/history")


# ----------------------------------------------------------------------------------------------------------
# --dry-run
# ----------------------------------------------------------------------------------------------------------


def queue_state(comfy: Comfy) -> tuple[set, dict]:
    return set(get(comfy.base, "/history")), get(comfy.base, "/queue")


def test_dry_run_catches_problems_without_queuing(comfy: Comfy, tmp_path: Path, capsys) -> None:
    before = queue_state(comfy)
    jobs = write_json(tmp_path / "jobs.json", [{"name": "only", "1.width": 16}])

    unknown = image_workflow()
    unknown["3"] = {"class_type": "CausVid_Sampler", "inputs": {"seed": 1}}
    code = main(
        [str(write_json(tmp_path / "a.json", unknown)), str(jobs), "--server", comfy.base, "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "node 3: class_type 'CausVid_Sampler' is not installed" in out and "'comfyui-causvid'" in out

    missing = image_workflow()
    del missing["1"]["inputs"]["height"]
    code = main(
        [str(write_json(tmp_path / "b.json", missing)), str(jobs), "--server", comfy.base, "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 1 and "node 1 (EmptyImage): required input 'height' is missing" in out

    # Through the real entry point: values out of range and not in a COMBO list, per job.
    scaled = image_workflow()
    scaled["3"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["1", 0],
            "upscale_method": "bilinear",
            "width": 8,
            "height": 8,
            "crop": "disabled",
        },
    }
    scaled["2"]["inputs"]["images"] = ["3", 0]
    rows = [
        {"name": "fine", "1.width": 16},
        {"name": "narrow", "1.width": 0},
        {"name": "sharp", "3.upscale_method": "sharpest"},
        {"name": "bright", "1.color": 2**24},
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "causvid_core.queue", str(write_json(tmp_path / "c.json", scaled)),
         str(write_json(tmp_path / "c_jobs.json", rows)), "--server", comfy.base, "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "job 1 (fine): OK" in out
    assert "job 2 (narrow): INVALID" in out and "input 'width': 0 is below the minimum 1" in out
    assert (
        "job 3 (sharp): INVALID" in out
        and "'sharpest' is not one of the options" in out
        and "'bilinear'" in out
    )
    assert "job 4 (bright): INVALID" in out and "above the maximum 16777215" in out
    assert queue_state(comfy) == before  # nothing was queued


def clip_workflow() -> dict:
    """A text-to-image graph: two CLIPTextEncode (positive, negative), KSampler, RandomNoise, SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 4,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },  # fmt: skip
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def test_aliases_on_a_text_to_image_workflow(comfy: Comfy, tmp_path: Path, capsys) -> None:
    workflow = clip_workflow()
    jobs_csv = write_csv(
        tmp_path / "jobs.csv", ["name", "prompt", "seed", "filename"], [["fox", "a red fox", 42, "fox/a"]]
    )
    (job,) = build_jobs(workflow, load_rows(jobs_csv))
    assert job.name == "fox" and job.error is None
    assert job.prompt["6"]["inputs"]["text"] == "a red fox"  # the encoder wired to 'positive'
    assert job.prompt["7"]["inputs"]["text"] == "blurry"
    assert job.prompt["3"]["inputs"]["seed"] == 42 and job.prompt["11"]["inputs"]["noise_seed"] == 42
    assert job.prompt["9"]["inputs"]["filename_prefix"] == "fox/a"
    assert workflow["6"]["inputs"]["text"] == "a cat"  # the template is left alone

    # The prompt schedule of this package wins over text encoders.
    scheduled = {
        **clip_workflow(),
        "20": {"class_type": "CausVid_PromptSchedule", "inputs": {"schedule": "0: x"}},
    }
    (job,) = build_jobs(scheduled, [{"prompt": "0: a fox\n3: a dog"}])
    assert (
        job.prompt["20"]["inputs"]["schedule"] == "0: a fox\n3: a dog"
        and job.prompt["6"]["inputs"]["text"] == "a cat"
    )

    # Two encoders and nothing says which is positive: an error naming both and the way out.
    unwired = clip_workflow()
    del unwired["3"]
    with pytest.raises(JobError) as e:
        build_jobs(unwired, [{"prompt": "a fox"}])
    assert "ambiguous" in str(e.value) and "6.text" in str(e.value) and "7.text" in str(e.value)
    assert "NODE_ID.input" in str(e.value)

    # Dry run against the host (no model needed): aliases resolved, the empty model list reported.
    workflow_path = write_json(tmp_path / "wf.json", clip_workflow())
    code = main([str(workflow_path), str(jobs_csv), "--server", comfy.base, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 1 and "job 1 (fox): INVALID" in out
    assert "node 4 (CheckpointLoaderSimple): input 'ckpt_name': 'model.safetensors' is not available" in out
    assert "KSampler" not in out and "CLIPTextEncode" not in out  # the substituted values are valid


# ----------------------------------------------------------------------------------------------------------
# Files, types and errors (no server)
# ----------------------------------------------------------------------------------------------------------


def webp_workflow() -> dict:
    workflow = image_workflow()
    workflow["2"] = {
        "class_type": "SaveAnimatedWEBP",
        "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": True, "quality": 80,
                   "method": "default"},
    }  # fmt: skip
    return workflow


def test_csv_and_json_values_take_the_workflow_types(tmp_path: Path) -> None:
    workflow = webp_workflow()
    header = ["name", "1.width", "2.fps", "2.lossless", "2.filename_prefix", "2.quality"]
    jobs_csv = write_csv(
        tmp_path / "jobs.csv",
        header,
        [["a", "64", "12", "false", "007", ""], ["b", "8.0", "7.5", "yes", "x", "90"]],
    )
    a, b = build_jobs(workflow, load_rows(jobs_csv))
    assert a.prompt["1"]["inputs"]["width"] == 64 and type(a.prompt["1"]["inputs"]["width"]) is int
    assert a.prompt["2"]["inputs"]["fps"] == 12.0 and type(a.prompt["2"]["inputs"]["fps"]) is float
    assert a.prompt["2"]["inputs"]["lossless"] is False and b.prompt["2"]["inputs"]["lossless"] is True
    assert a.prompt["2"]["inputs"]["filename_prefix"] == "007"  # text stays text
    assert (
        a.prompt["2"]["inputs"]["quality"] == 80 and b.prompt["2"]["inputs"]["quality"] == 90
    )  # empty: kept
    assert b.prompt["1"]["inputs"]["width"] == 8 and b.prompt["2"]["inputs"]["fps"] == 7.5

    rows = [{"1.width": 64.0, "2.fps": 8, "2.lossless": False}, {"1.width": 64.5}, {"2.lossless": "maybe"}]
    ok, fractional, unsure = build_jobs(workflow, load_rows(write_json(tmp_path / "jobs.json", rows)))
    assert (
        ok.error is None
        and ok.prompt["1"]["inputs"]["width"] == 64
        and ok.prompt["2"]["inputs"]["fps"] == 8.0
    )
    assert "'1.width'" in fractional.error and "64.5 is not an integer" in fractional.error
    assert "'2.lossless'" in unsure.error and "true/false" in unsure.error


def test_the_server_declared_type_wins_over_a_json_integer(comfy: Comfy, tmp_path: Path) -> None:
    """An API file stores a FLOAT of 6.0 as 6; with /object_info, '7.5' is still accepted as 7.5."""
    workflow = webp_workflow()
    workflow["2"]["inputs"]["fps"] = 6
    rows = [{"2.fps": "7.5", "2.quality": "90"}]
    (typed,) = build_jobs(workflow, rows, get(comfy.base, "/object_info"))
    assert typed.error is None and typed.prompt["2"]["inputs"]["fps"] == 7.5
    assert type(typed.prompt["2"]["inputs"]["quality"]) is int
    (untyped,) = build_jobs(workflow, rows)  # only the workflow to go by
    assert "'7.5' is not an integer" in untyped.error


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("colour", ["unknown column 'colour'", "1.width", "2.filename_prefix", "seed"]),
        ("1.widht", ["node 1 (EmptyImage) has no input 'widht'", "1.width", "1.color"]),
        ("9.width", ["no node '9'", "node ids: 1, 2"]),
        ("2.images", ["linked to node 1", "set a value on node 1"]),
        ("seed", ["no node of the workflow has an input named seed or noise_seed", "1.color"]),
    ],
)
def test_unusable_columns_are_named_with_the_fix(tmp_path: Path, column: str, expected: list[str]) -> None:
    jobs = write_json(tmp_path / "jobs.json", [{column: 1}])
    workflow = write_json(tmp_path / "wf.json", image_workflow())
    with pytest.raises(JobError) as e:
        build_jobs(load_workflow(workflow), load_rows(jobs))
    for text in expected:
        assert text in str(e.value)


def test_bad_files_exit_2_with_a_clear_message(tmp_path: Path, capsys) -> None:
    ui = write_json(tmp_path / "ui.json", {"nodes": [], "links": [], "version": 0.4})
    jobs = write_json(tmp_path / "jobs.json", [{"1.width": 8}])
    assert main([str(ui), str(jobs), "--dry-run"]) == 2
    assert "UI-format workflow" in capsys.readouterr().err
    workflow = write_json(tmp_path / "wf.json", image_workflow())
    text = tmp_path / "jobs.txt"
    text.write_text("1.width\n8\n")
    assert main([str(workflow), str(text)]) == 2
    assert "use a .csv" in capsys.readouterr().err
    # No server there: the dry run says so instead of a traceback.
    assert main([str(workflow), str(jobs), "--dry-run", "--server", f"127.0.0.1:{_free_port()}"]) == 2
    assert "is ComfyUI running there?" in capsys.readouterr().err


def test_progress_line_shows_node_value_and_bar() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, "[1/2] fox", {"3": {"class_type": "KSampler"}})
    for value in (1, 5, 10):
        message = {"type": "progress", "data": {"prompt_id": "p", "node": "3", "value": value, "max": 10}}
        assert Runner._on_message(json.dumps(message), "p", line) is False
    other = {"type": "executing", "data": {"prompt_id": "someone-else", "node": None}}
    assert Runner._on_message(json.dumps(other), "p", line) is False
    assert Runner._on_message(
        json.dumps({"type": "executing", "data": {"prompt_id": "p", "node": None}}), "p", line
    )
    text = stream.getvalue()
    assert "[1/2] fox node 3 (KSampler) 5/10 [##########----------]  50%" in text
    assert "10/10 [####################] 100%" in text


def test_helper_imports_only_the_standard_library() -> None:
    """The helper imports only the standard library at module level (aiohttp lazily, for the websocket)."""
    code = (  # every top-level module the import brings in (not those site already loaded) is stdlib
        "import sys; before = set(sys.modules); import causvid_core.queue.cli; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'causvid_core'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ}
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_a_server_that_never_answers_ends_the_run_quickly() -> None:
    """Bounded waits: the first job uses its --retries windows, later jobs one window each."""
    jobs = build_jobs(image_workflow(), [{"name": f"j{i}"} for i in range(3)])
    log = io.StringIO()
    runner = Runner(queue_client.Server(f"127.0.0.1:{_free_port()}"), retries=2, wait_base=0.2, log=log)
    start = time.monotonic()
    results = runner.run(jobs)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["failed"] * 3 and all("unreachable" in r.error for r in results)
    assert all(r.submissions == 0 for r in results)
    text = log.getvalue()
    assert "[1/3] j0:" in text and "(try 2/2)" in text and "[2/3] j1:" in text and "(try 1/1)" in text
    assert elapsed < 0.2 + 0.4 + 2 * 0.2 + 3  # windows of 0.2 s and 0.4 s, then 0.2 s per later job


def test_something_else_on_the_port_is_named_and_the_summary_still_written(tmp_path: Path) -> None:
    """A web page where ComfyUI should be: each job fails with 'not a ComfyUI server?' (not one JSON
    traceback for the whole batch), and the table and --summary-json are written as for any failure."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a router's login page</html>")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        workflow = write_json(tmp_path / "wf.json", image_workflow())
        rows = write_csv(tmp_path / "jobs.csv", ["name"], [["a"], ["b"]])
        args = [str(workflow), str(rows), "--server", f"127.0.0.1:{httpd.server_address[1]}", "--retries", "0",
                "--timeout", "5", "--poll"]  # fmt: skip
        code, summary = run_cli(args, tmp_path / "out" / "summary.json")
    finally:
        httpd.shutdown()
    assert code == 1 and [j["status"] for j in summary["jobs"]] == ["failed", "failed"]
    assert all("not a ComfyUI server?" in j["error"] for j in summary["jobs"])
    assert main([*args, "--summary-json", str(tmp_path)]) == 2  # a folder: refused before anything runs


def test_ctrl_c_cancels_the_job_in_flight_and_says_so(monkeypatch) -> None:
    """The job running when Ctrl-C comes was queued on the server: it is cancelled there and reported as
    such (its prompt id), not as 'not run' while it goes on running."""
    from causvid_core.queue import cli as queue_cli

    cancelled = []

    class Server:
        base = "http://x"

        def cancel(self, prompt_id: str) -> None:
            cancelled.append(prompt_id)

    def run_job(self, job, total=0):
        if job.index == 1:
            return queue_cli.JobResult(job.index, job.name, status="ok")
        self.current = queue_cli.JobResult(job.index, job.name, prompt_id="p-2")
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "run_job", run_job)
    jobs = build_jobs(image_workflow(), [{"name": f"j{i}"} for i in range(3)])
    args = type("Args", (), {"retries": 0, "timeout": 5.0, "poll": True})()
    results, code = queue_cli._run(Server(), jobs, args, "client")
    assert code == 130 and cancelled == ["p-2"]
    assert [(r.index, r.error) for r in results] == [
        (1, None), (2, "cancelled on the server (Ctrl-C; was queued as p-2)"), (3, "not run (Ctrl-C)")]  # fmt: skip
