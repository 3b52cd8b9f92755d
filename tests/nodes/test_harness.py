"""The test harness itself, proven on ComfyUI's own nodes: in-process, over HTTP and in both front ends.

Nothing here depends on this package's nodes, so a harness fault is told apart from a node fault.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import host as h
import pytest
import torch
import workflow_tools as wt
from PIL import Image

ORANGE = 0xFF8000


def save_prompt(prefix: str, width: int = 64, height: int = 48) -> dict:
    """EmptyImage (orange) -> SaveImage, in API format."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": ORANGE},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def builtin_ui(prefix: str, extra_nodes: tuple[str, ...] = ()) -> dict:
    """UI workflow EmptyImage -> ImageAddNoise (seed + control widget) -> ImageScale -> SaveImage."""

    def node(i: int, kind: str, inputs: list, links: list | None, values: list) -> dict:
        outputs = (
            [] if links is None else [{"name": "IMAGE", "type": "IMAGE", "links": links, "slot_index": 0}]
        )
        return {
            "id": i, "type": kind, "pos": [60 + 330 * (i - 1), 80], "size": [300, 160], "flags": {},
            "order": i - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": kind}, "widgets_values": values,
        }  # fmt: skip

    def image_in(name: str, link: int) -> list:
        return [{"name": name, "type": "IMAGE", "link": link}]

    nodes = [
        node(1, "EmptyImage", [], [1], [64, 48, 1, ORANGE]),
        node(2, "ImageAddNoise", image_in("image", 1), [2], [123, "fixed", 0.25]),
        node(3, "ImageScale", image_in("image", 2), [3], ["nearest-exact", 32, 24, "disabled"]),
        node(4, "SaveImage", image_in("images", 3), None, [prefix]),
    ]
    nodes += [node(5 + i, kind, [], [], []) for i, kind in enumerate(extra_nodes)]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]]
    return {
        "last_node_id": len(nodes), "last_link_id": 3, "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }  # fmt: skip


def saved_png(output_dir: Path, ui_output: dict) -> Path:
    """The file a SaveImage UI output names, checked to exist."""
    image = ui_output["images"][0]
    path = output_dir / image["subfolder"] / image["filename"]
    assert path.is_file(), f"{path} listed in the outputs but not written"
    return path


class Steps:
    """A test-only node: ``steps`` ProgressBar updates, optionally failing; not part of any package."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "steps": ("INT", {"default": 5}), "fail": ("BOOLEAN", {})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image: torch.Tensor, steps: int, fail: bool) -> tuple[torch.Tensor]:
        import comfy.model_management
        import comfy.utils

        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)
        if fail:
            raise ValueError("Steps failed on purpose: set fail=False")
        return (image * 0.5,)


@pytest.fixture
def steps_node(comfy_host: h.InProcessHost):
    comfy_host.node_classes["HarnessSteps"] = Steps
    yield "HarnessSteps"
    del comfy_host.node_classes["HarnessSteps"]


def steps_prompt(prefix: str, steps: int, fail: bool = False) -> dict:
    prompt = save_prompt(prefix)
    prompt["3"] = {"class_type": "HarnessSteps", "inputs": {"image": ["1", 0], "steps": steps, "fail": fail}}
    prompt["2"]["inputs"]["images"] = ["3", 0]
    return prompt


# ---------------------------------------------------------------------------------------------- in-process


def test_inprocess_run_saves_png_and_reports_events(comfy_host: h.InProcessHost) -> None:
    result = comfy_host.execute(save_prompt("harness_inproc"))
    assert result.success and result.error is None
    assert result.executed_nodes == ["1", "2"]
    assert result.events("execution_success") and not result.events("execution_error")
    png = saved_png(comfy_host.output_dir, result.outputs["2"])
    assert png.parent == comfy_host.output_dir and png.name.startswith("harness_inproc")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (64, 48)
        assert image.convert("RGB").getpixel((10, 10)) == (0xFF, 0x80, 0x00)
    assert tuple(result.value("1").shape) == (1, 48, 64, 3)


def test_inprocess_progress_and_fresh_executor(comfy_host: h.InProcessHost, steps_node: str) -> None:
    prompt = steps_prompt("harness_steps", steps=4)
    first = comfy_host.execute(prompt)
    assert first.success
    assert [(p["value"], p["max"], p["node"]) for p in first.progress] == [(i, 4, "3") for i in range(1, 5)]
    assert [e["value"] for e in first.events("progress")] == [1, 2, 3, 4]
    again = comfy_host.execute(prompt)  # same prompt: nothing may come from a cache
    assert again.executed_nodes == first.executed_nodes and len(again.progress) == 4


@pytest.mark.parametrize("hook_raises", [True, False])
def test_inprocess_interrupt_stops_the_run(
    comfy_host: h.InProcessHost, steps_node: str, hook_raises: bool
) -> None:
    result = comfy_host.execute(
        steps_prompt("harness_interrupt", steps=10), interrupt_after=3, hook_raises=hook_raises
    )
    assert result.interrupted and not result.success
    assert result.events("execution_interrupted")[0]["node_id"] == "3"
    assert len(result.progress) == 3  # stopped at the update that interrupted (or the check right after)
    assert "2" not in result.outputs and "2" not in result.executed_nodes
    follow_up = comfy_host.execute(steps_prompt("harness_after_interrupt", steps=2))
    assert follow_up.success, "the interrupt flag leaked into the next run"


def test_inprocess_node_exception_is_reported(comfy_host: h.InProcessHost, steps_node: str) -> None:
    result = comfy_host.execute(steps_prompt("harness_fail", steps=1, fail=True))
    assert not result.success and not result.interrupted
    assert result.error == "Steps failed on purpose: set fail=False"
    assert result.events("execution_error")[0]["node_type"] == "HarnessSteps"


def test_inprocess_validation_error_names_node_and_input(comfy_host: h.InProcessHost) -> None:
    prompt = save_prompt("harness_invalid", width=-5)
    check = comfy_host.validate(prompt)
    assert not check.ok
    assert list(check.node_errors) == ["1"]
    assert any(e["extra_info"]["input_name"] == "width" for e in check.node_errors["1"]["errors"])
    with pytest.raises(h.PromptInvalid, match="width"):
        comfy_host.execute(prompt)


# ---------------------------------------------------------------------------------------------- workflow tools


def test_ui_to_api_maps_widgets_links_and_seed_control(comfy_host: h.InProcessHost) -> None:
    ui = builtin_ui("harness_convert")
    api = wt.ui_to_api(ui, comfy_host.object_infos())
    assert api["2"] == {
        "class_type": "ImageAddNoise",
        "inputs": {"image": ["1", 0], "seed": 123, "strength": 0.25},
    }
    assert api["3"]["inputs"] == {
        "image": ["2", 0], "upscale_method": "nearest-exact", "width": 32, "height": 24, "crop": "disabled",
    }  # fmt: skip
    assert wt.api_links(api) == {("2", "image", "1", 0), ("3", "image", "2", 0), ("4", "images", "3", 0)}
    assert comfy_host.validate(api).ok


def test_ui_to_api_errors_are_clear(comfy_host: h.InProcessHost, tmp_path: Path) -> None:
    infos = comfy_host.object_infos()
    ui = builtin_ui("x")
    ui["nodes"][1]["widgets_values"] = [123, 0.25]  # the seed's control value is missing
    with pytest.raises(ValueError, match=r"node 2 \(ImageAddNoise\): 2 widget values .*expected 3"):
        wt.ui_to_api(ui, infos)
    with pytest.raises(KeyError, match="NoSuchNodeType"):
        wt.ui_to_api(builtin_ui("x", ("NoSuchNodeType",)), infos)
    api_file = tmp_path / "api.json"
    api_file.write_text('{"1": {"class_type": "EmptyImage", "inputs": {}}}')
    with pytest.raises(ValueError, match="API-format prompt"):
        wt.load_ui(api_file)


# ---------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """conftest's server, plus an extra checkpoints folder holding one (empty) file."""
    extra = tmp_path_factory.mktemp("extra_checkpoints")
    (extra / "harness_dummy.safetensors").write_bytes(b"")
    models = {"checkpoints": [extra]}
    with h.http_host(comfy_root, tmp_path_factory.mktemp("http_default"), models=models) as server:
        yield server


def test_http_prompt_runs_and_history_lists_file(http_server: h.HttpHost) -> None:
    prompt_id, events, entry = h.run_prompt(http_server.base, save_prompt("harness_http"))
    kinds = [kind for kind, _ in events]
    assert "execution_success" in kinds and "execution_error" not in kinds
    assert [d["node"] for k, d in events if k == "executing"] == ["1", "2", None]
    executed = [d for k, d in events if k == "executed"]
    assert executed and executed[0]["node"] == "2"
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    png = saved_png(http_server.output_dir, entry["outputs"]["2"])
    assert png.name == executed[0]["output"]["images"][0]["filename"]


def test_http_bad_prompt_is_rejected_with_node_errors(http_server: h.HttpHost) -> None:
    with pytest.raises(h.PromptRejected) as info:
        h.queue_prompt(http_server.base, save_prompt("harness_bad", width=-5), uuid.uuid4().hex)
    assert info.value.status == 400
    assert list(info.value.body["node_errors"]) == ["1"]


def test_http_converted_ui_workflow_runs(http_server: h.HttpHost) -> None:
    object_info = h.get_json(http_server.base + "/object_info")
    api = wt.ui_to_api(builtin_ui("harness_http_ui"), object_info)
    _, _, entry = h.run_prompt(http_server.base, api)
    assert entry["status"]["status_str"] == "success"
    with Image.open(saved_png(http_server.output_dir, entry["outputs"]["4"])) as image:
        assert image.size == (32, 24)


def test_http_host_lists_extra_model_folders(http_server: h.HttpHost) -> None:
    info = h.get_json(http_server.base + "/object_info/CheckpointLoaderSimple")
    assert "harness_dummy.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_http_host_imports_the_linked_package(http_server: h.HttpHost) -> None:
    link = http_server.base_dir / "custom_nodes" / h.PACKAGE_NAME
    assert link.resolve() == h.REPO
    log = http_server.log.read_text()
    assert "Import times for custom nodes" in log and str(link) in log


# ---------------------------------------------------------------------------------------------- browser


@pytest.fixture(params=["1.32.9", "1.58.1"])
def frontend(request: pytest.FixtureRequest, browser_available: None) -> tuple[str, h.HttpHost]:
    name = "http_server" if request.param == "1.32.9" else "http_server_158"
    return request.param, request.getfixturevalue(name)


def test_browser_loads_and_queues_builtin_workflow(frontend: tuple[str, h.HttpHost], artifacts: Path) -> None:
    version, server = frontend
    ui = builtin_ui(f"harness_browser_{version}")
    shot = artifacts / f"harness_frontend-{version}.png"
    found = h.load_in_browser(server.base, ui, shot, queue=True)
    assert found["ok"], found["error"]
    assert found["frontend_version"] == version
    assert found["missing"] == [] and found["node_count"] == 4
    assert "missing node" not in found["page_text"].lower() and found["page_errors"] == []
    page_api = {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in found["api_prompt"].items()
    }
    assert page_api == wt.ui_to_api(ui, h.get_json(server.base + "/object_info"))
    assert [r["status"] for r in found["prompt_responses"]] == [200]
    (entry,) = found["history"].values()
    assert entry["status"]["status_str"] == "success"
    saved_png(server.output_dir, entry["outputs"]["4"])
    assert shot.stat().st_size > 10_000


def test_browser_reports_unknown_node_type(frontend: tuple[str, h.HttpHost], artifacts: Path) -> None:
    version, server = frontend
    ui = builtin_ui("harness_unknown", extra_nodes=("NoSuchNodeType",))
    found = h.load_in_browser(server.base, ui, artifacts / f"harness_unknown_type-{version}.png")
    assert found["ok"], found["error"]
    assert found["missing"] == ["NoSuchNodeType"]
    assert "NoSuchNodeType" in found["page_text"]  # the front end's own missing-node notice agrees
