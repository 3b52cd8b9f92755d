"""The shipped workflows (workflows/*.json) in the real host: conversion, validation, runs, HTTP and browser.

The embedded Shapes model is not trained yet: a tiny random model is laid out as ``embedded:shapes``
(tests/helpers.py) and the embedded workflows run with their sizes overridden small (32x32, 33 frames).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import host as h
import pytest
import workflow_tools as wt

from causvid_core.video_io import probe_video

WORKFLOWS = h.REPO / "workflows"
NAMES = sorted(p.name.removesuffix(".api.json") for p in WORKFLOWS.glob("*.api.json"))
EMBEDDED = [n for n in NAMES if n.startswith("embedded-")]
WAN = [n for n in NAMES if n.startswith("wan-")]
SAMPLES = ("causvid_shapes_first_frame.png", "causvid_shapes_source.mp4")
SMALL = {"width": 32, "height": 32, "length": 33, "length_unit": "frames"}
FILE_INPUTS = {"model_name", "vae_name", "clip_name", "image"}  # loader widgets naming files


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.api.json").read_text())


def shrink(prompt: dict) -> dict:
    """A copy with every size/length input set small (32x32, 33 frames) for a CPU test run."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for key, value in SMALL.items():
            if key in node["inputs"]:
                node["inputs"][key] = value
    return prompt


def shrink_ui(ui: dict, object_info: dict) -> dict:
    """The same override on a UI workflow's widgets_values (found through /object_info's widget order)."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        if node["type"] in wt.VIRTUAL_NODES:
            continue
        i = 0
        for name, spec in wt._ordered_inputs(object_info[node["type"]]):
            if not wt.is_widget(spec):
                continue
            if name in SMALL:
                node["widgets_values"][i] = SMALL[name]
            i += wt.widget_slots(spec, name)
    return ui


def output_files(prompt: dict) -> list[str]:
    """Ids of the nodes that write a video (a non-empty filename_prefix)."""
    return [k for k, v in prompt.items() if v["inputs"].get("filename_prefix")]


def copy_samples(input_dir: Path) -> None:
    """Put the shipped PNG and MP4 in a host's input folder, as the workflows' notes tell users to."""
    input_dir.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        shutil.copy(WORKFLOWS / name, input_dir / name)


@pytest.fixture(scope="module")
def input_dir(host: h.InProcessHost, tmp_path_factory: pytest.TempPathFactory):
    """The in-process host's input folder moved to a tmp folder holding the samples (restored after)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("input")
    copy_samples(folder)
    # wan-image-to-video loads example.png, which every ComfyUI install has in its input folder
    shutil.copy(WORKFLOWS / SAMPLES[0], folder / "example.png")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(old)


def test_every_workflow_ships_in_both_formats_and_names_the_pack() -> None:
    assert len(EMBEDDED) == len(WAN) == 4
    assert {n.removeprefix("embedded-") for n in EMBEDDED} == {n.removeprefix("wan-") for n in WAN}
    for name in NAMES:
        ui = wt.load_ui(WORKFLOWS / f"{name}.json")
        assert ui["version"] == 0.4
        assert ui["extra"]["causvid"]["pack"] == "comfyui-causvid", name


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_the_shipped_api_file(host: h.InProcessHost, name: str) -> None:
    ui = wt.load_ui(WORKFLOWS / f"{name}.json")
    assert wt.ui_to_api(ui, host.object_infos()) == load_api(name)


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_workflow_runs_and_writes_its_video(host, embedded, input_dir, name: str) -> None:
    prompt = shrink(load_api(name))
    result = host.execute(prompt)
    assert result.success, result.error
    (writer,) = output_files(prompt)
    path = Path(result.value(writer, 1))
    assert path.is_relative_to(host.output_dir) and path.exists()
    info = probe_video(path)
    assert (info.width, info.height) == (32, 32)
    assert info.frames == 33  # the requested length, or every frame of the 33-frame source video


@pytest.mark.parametrize("name", WAN)
def test_wan_workflow_is_valid_but_for_absent_model_files(
    host: h.InProcessHost, input_dir, name: str
) -> None:
    prompt = load_api(name)
    valid = host.validate(prompt)
    assert not valid.ok  # the test host has no Wan weights
    errors = [e for node in valid.node_errors.values() for e in node["errors"]]
    assert errors, valid.error
    assert {e["type"] for e in errors} == {"value_not_in_list"}, errors
    flagged = {e["extra_info"]["input_name"] for e in errors}
    assert flagged <= FILE_INPUTS and {"model_name", "vae_name", "clip_name"} <= flagged


# ------------------------------------------------------------------------------------------------ HTTP


def test_http_embedded_image_to_video_runs_and_history_lists_the_file(
    embedded, http_server: h.HttpHost
) -> None:
    copy_samples(http_server.base_dir / "input")
    _, events, entry = h.run_prompt(
        http_server.base, shrink(load_api("embedded-image-to-video")), timeout=120
    )
    kinds = [kind for kind, _ in events]
    assert "execution_success" in kinds and "execution_error" not in kinds, events[-3:]
    assert entry["status"]["status_str"] == "success"
    (video,) = entry["outputs"]["10"]["images"]
    path = http_server.output_dir / video["subfolder"] / video["filename"]
    assert probe_video(path).frames == 33


# --------------------------------------------------------------------------------------------- browser


@pytest.fixture(params=["1.32.9", "1.58.1"])
def frontend(request: pytest.FixtureRequest, embedded, browser_available: None) -> tuple[str, h.HttpHost]:
    name = "http_server" if request.param == "1.32.9" else "http_server_158"
    return request.param, request.getfixturevalue(name)


@pytest.mark.parametrize("name", NAMES)
def test_browser_loads_workflow_without_missing_nodes(frontend, artifacts: Path, name: str) -> None:
    version, server = frontend
    shot = artifacts / f"workflow_{name}-{version}.png"
    found = h.load_in_browser(server.base, WORKFLOWS / f"{name}.json", shot)
    assert found["ok"], found["error"]
    assert found["missing"] == [], found["missing"]
    assert found["page_errors"] == []
    page_api = {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in found["api_prompt"].items()
    }
    expected = load_api(name)
    diff = {
        f"{k}.{i}": (page_api.get(k, {}).get("inputs", {}).get(i, "-"), expected.get(k, {}).get("inputs", {}).get(i, "-"))
        for k in set(page_api) | set(expected)
        for i in set(page_api.get(k, {}).get("inputs", {})) | set(expected.get(k, {}).get("inputs", {}))
        if page_api.get(k, {}).get("inputs", {}).get(i, "-") != expected.get(k, {}).get("inputs", {}).get(i, "-")
    }
    assert page_api == expected, f"page vs file: {diff}"  # the page builds the same prompt as the shipped API file


def test_browser_queues_embedded_text_to_video(frontend, artifacts: Path) -> None:
    version, server = frontend
    object_info = h.get_json(server.base + "/object_info")
    ui = shrink_ui(wt.load_ui(WORKFLOWS / "embedded-text-to-video.json"), object_info)
    shot = artifacts / f"workflow_queue_embedded-text-to-video-{version}.png"
    found = h.load_in_browser(server.base, ui, shot, queue=True)
    assert found["ok"], found["error"]
    assert [r["status"] for r in found["prompt_responses"]] == [200]
    (entry,) = found["history"].values()
    assert entry["status"]["status_str"] == "success"
    (video,) = entry["outputs"]["10"]["images"]
    assert probe_video(server.output_dir / video["subfolder"] / video["filename"]).frames == 33
