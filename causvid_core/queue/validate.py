"""Check a substituted API workflow against a server's ``GET /object_info`` without queuing it (--dry-run)."""

from __future__ import annotations

from typing import Any

from .jobs import Workflow

PACK_PREFIXES = {"CausVid_": "comfyui-causvid"}  # class_type prefix -> the custom node pack that provides it


def _missing_class(node_id: str, class_type: str) -> str:
    """Message for a class_type the server does not know, naming the likely pack."""
    for prefix, pack in PACK_PREFIXES.items():
        if class_type.startswith(prefix):
            return (
                f"node {node_id}: class_type {class_type!r} is not installed on the server: install the "
                f"custom node pack {pack!r} (ComfyUI/custom_nodes/{pack}) and restart ComfyUI"
            )
    return (
        f"node {node_id}: class_type {class_type!r} is not installed on the server: a custom node pack is "
        "missing (ComfyUI-Manager > Install Missing Custom Nodes) or the name is misspelt"
    )


def _combo_options(kind: Any, options: dict) -> list | None:
    """The allowed values of a COMBO input (old style: the type is the list), or None when not a combo."""
    if isinstance(kind, list):
        return kind
    if kind == "COMBO" and isinstance(options.get("options"), list):
        return options["options"]
    return None


def check_value(name: str, value: Any, spec: list) -> str | None:
    """Why ``value`` does not fit the input spec ``[type, {min, max, ...}]``, or None when it does."""
    kind = spec[0] if spec else None
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    combo = _combo_options(kind, options)
    if combo is not None:
        if value not in combo:
            shown = ", ".join(repr(c) for c in combo[:20]) + (
                f", ... ({len(combo)} in all)" if len(combo) > 20 else ""
            )
            return (
                f"input {name!r}: {value!r} is not one of the options [{shown}]"
                if combo
                else (
                    f"input {name!r}: {value!r} is not available on the server (the list of options is empty: "
                    "is the model file in the right ComfyUI/models folder?)"
                )
            )
        return None
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = int(value) if kind == "INT" else float(value)
            except (TypeError, ValueError):
                return f"input {name!r}: {value!r} is not {'an integer' if kind == 'INT' else 'a number'}"
        if "min" in options and value < options["min"]:
            return f"input {name!r}: {value} is below the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"input {name!r}: {value} is above the maximum {options['max']}"
    return None


def _check_node(node_id: str, node: dict, info: dict, workflow: Workflow) -> list[str]:
    """Problems of one node whose class the server knows: missing inputs, bad links, bad values."""
    where = f"node {node_id} ({node['class_type']})"
    declared = info.get("input", {})
    required, optional = declared.get("required") or {}, declared.get("optional") or {}
    inputs = node["inputs"]
    errors = [
        f"{where}: required input {name!r} is missing; add it to the workflow or set it with a "
        f"'{node_id}.{name}' column"
        for name in required
        if name not in inputs
    ]
    for name, value in inputs.items():
        spec = required.get(name, optional.get(name))
        if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            if str(value[0]) not in workflow:
                errors.append(
                    f"{where}: input {name!r} is linked to node {value[0]}, which is not in the workflow"
                )
            continue
        if isinstance(spec, (list, tuple)):
            problem = check_value(name, value, list(spec))
            if problem:
                errors.append(f"{where}: {problem}")
    return errors


def validate_prompt(workflow: Workflow, object_info: dict[str, dict]) -> list[str]:
    """Every problem ``POST /prompt`` would reject (or that would fail at once), as readable lines."""
    errors: list[str] = []
    has_output = False
    for node_id, node in workflow.items():
        info = object_info.get(node["class_type"])
        if info is None:
            errors.append(_missing_class(node_id, node["class_type"]))
            continue
        has_output = has_output or bool(info.get("output_node"))
        errors.extend(_check_node(node_id, node, info, workflow))
    if not has_output and not errors:
        errors.append(
            "the workflow has no output node (e.g. SaveImage or CausVid Render Video): nothing would run"
        )
    return errors
