"""Workflow files: load UI-format workflows and convert them to API format with the host's /object_info.

The UI format (what users drag into the page) stores widget values as a list in widget order; the API
format (what ``POST /prompt`` takes) maps input names to values or ``[origin_node_id, origin_slot]``.
The conversion mirrors the front end's graphToPrompt for plain graphs (no subgraphs, no bypassed nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MUTED, BYPASSED = 2, 4


def load_ui(path: str | Path) -> dict:
    """Read a UI-format workflow; ValueError naming the file when it is API format or not a workflow."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "nodes" not in data or "links" not in data:
        kind = "an API-format prompt" if _looks_like_api(data) else "not a workflow"
        raise ValueError(
            f"{path} is {kind}: a UI workflow has 'nodes' and 'links' (save it with Save, not Export (API))"
        )
    return data


def _looks_like_api(data: Any) -> bool:
    return isinstance(data, dict) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def is_widget(spec: list | tuple) -> bool:
    """Whether an /object_info input spec is a widget (has a value in widgets_values) rather than a socket."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(spec: list | tuple, name: str) -> int:
    """Values a widget input takes in widgets_values: 2 for an INT with a control_after_generate widget.

    The front end adds the control widget when the option is set, or (option absent) for inputs named
    seed / noise_seed.
    """
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = options.get("control_after_generate")
    if control is None:
        control = name in ("seed", "noise_seed")
    return 2 if spec[0] == "INT" and control else 1


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of the required then optional inputs in /object_info's input_order."""
    inputs, order = info["input"], info.get("input_order", {})
    out = []
    for group in ("required", "optional"):
        specs = inputs.get(group) or {}
        for name in order.get(group, list(specs)):
            out.append((name, specs[name]))
    return out


def _widget_values(node: dict, info: dict) -> dict[str, Any]:
    """Map a node's widgets_values onto its widget inputs, skipping control/upload extra values."""
    values = node.get("widgets_values", [])
    widgets = [(n, s) for n, s in _ordered_inputs(info) if is_widget(s)]
    if isinstance(values, dict):
        return {n: values[n] for n, _ in widgets if n in values}
    uploads = sum(1 for _, s in widgets if len(s) > 1 and isinstance(s[1], dict) and _has_upload(s[1]))
    base = sum(widget_slots(s, n) for n, s in widgets)
    with_upload = len(values) == base + uploads and uploads > 0
    if len(values) not in (base, base + uploads):
        raise ValueError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for widgets "
            f"{[n for n, _ in widgets]} (expected {base}, seed inputs take two: value and control_after_generate); "
            "was the workflow saved with another version of the node?"
        )
    out, i = {}, 0
    for name, spec in widgets:
        out[name] = values[i]
        i += widget_slots(spec, name)
        if with_upload and len(spec) > 1 and isinstance(spec[1], dict) and _has_upload(spec[1]):
            i += 1
    return out


def _has_upload(options: dict) -> bool:
    return any(options.get(key) for key in UPLOAD_OPTIONS)


def _origin(link_id: int, links: dict[int, list], nodes: dict[int, dict]) -> list | None:
    """[origin_id, slot] of a link, followed through Reroute nodes; None for a PrimitiveNode source."""
    link = links[link_id]
    source = nodes[link[1]]
    if source["type"] == "Reroute":
        upstream = source["inputs"][0].get("link")
        return None if upstream is None else _origin(upstream, links, nodes)
    if source["type"] == "PrimitiveNode":
        return None  # its value is copied into the target's own widget value
    return [str(link[1]), link[2]]


def ui_to_api(ui: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt, as the front end's graphToPrompt does."""
    if ui.get("definitions", {}).get("subgraphs"):
        raise ValueError("workflows with subgraphs are not supported by ui_to_api: unpack the subgraph first")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise ValueError(
                f"node {node_id} ({kind}) is bypassed: ui_to_api does not reroute bypassed nodes"
            )
        if kind not in object_info:
            raise KeyError(f"node {node_id}: type {kind!r} is not in /object_info (is its package loaded?)")
        info = object_info[kind]
        inputs: dict[str, Any] = dict(_widget_values(node, info))
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            origin = _origin(slot["link"], links, nodes)
            if origin is not None:
                inputs[slot["name"]] = origin
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return prompt


def api_links(prompt: dict[str, dict]) -> set[tuple[str, str, str, int]]:
    """Every link of an API prompt as (target id, input name, origin id, origin slot)."""
    out = set()
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                out.add((node_id, name, str(value[0]), value[1]))
    return out
