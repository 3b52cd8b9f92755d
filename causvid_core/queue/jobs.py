"""Jobs for the queue helper: an API-format workflow plus one row of substitutions per job.

A column names what to set: ``NODE_ID.input_name`` (``6.text``, ``3.seed``) or a friendly alias resolved
against the workflow (``prompt``, ``seed``, ``length``, ``seconds``, ``frames``, ``filename``,
``filename_prefix``); ``name`` labels the job. Values are converted to the type of the workflow's value.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Workflow = dict[str, dict[str, Any]]
NAME_COLUMN = "name"
PROMPT_SCHEDULE = "CausVid_PromptSchedule"
# alias -> input names it sets on every node that has them ("prompt" is resolved by _prompt_targets).
INPUT_ALIASES: dict[str, tuple[str, ...]] = {
    "seed": ("seed", "noise_seed"),
    "length": ("length",),
    "seconds": ("seconds",),
    "frames": ("frames",),
    "filename": ("filename_prefix",),
    "filename_prefix": ("filename_prefix",),
}
ALIASES = ("prompt", *INPUT_ALIASES)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class JobError(ValueError):
    """A workflow or jobs file that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Target:
    """One workflow input a column sets."""

    node_id: str
    input_name: str

    def __str__(self) -> str:
        return f"{self.node_id}.{self.input_name}"


@dataclass
class Job:
    """One row: its 1-based index, label, raw values and substituted workflow (or why it is invalid)."""

    index: int
    name: str
    values: dict[str, Any]
    prompt: Workflow = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"job {self.index}" + (f" ({self.name})" if self.name else "")


def load_workflow(path: str | Path) -> Workflow:
    """Read an API-format workflow (``{"id": {"class_type", "inputs"}}``); UI-format files are refused."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"workflow file {path} not found") from None
    except json.JSONDecodeError as e:
        raise JobError(f"workflow file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]  # {"prompt": {...}} as POST /prompt takes it
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise JobError(
            f"{path} is a UI-format workflow (nodes/links); export it in API format instead: in ComfyUI "
            "use Workflow > Export (API) (older menus: enable dev mode, then 'Save (API Format)')"
        )
    if not isinstance(data, dict) or not data:
        raise JobError(f"{path} is not an API-format workflow: expected a JSON object of nodes")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise JobError(
                f"{path}: node {node_id!r} has no class_type/inputs; is this an API-format workflow "
                "(Workflow > Export (API))?"
            )
    return data


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read the jobs: a CSV with a header row (empty cells keep the workflow's value) or a JSON list."""
    path = Path(path)
    if not path.exists():
        raise JobError(f"jobs file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise JobError(f"{path} is empty: the first line must name the columns (e.g. name,3.seed)")
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row:
                    raise JobError(f"{path} line {line}: more cells than columns in the header")
                rows.append({k.strip(): v for k, v in row.items() if k and k.strip() and v not in (None, "")})
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise JobError(f"jobs file {path} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("jobs"), list):
            data = data["jobs"]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise JobError(f'{path}: expected a JSON list of objects, one per job ({{"3.seed": 1, ...}})')
        rows = [{str(k).strip(): v for k, v in row.items() if v is not None} for row in data]
    else:
        raise JobError(f"jobs file {path}: use a .csv (with a header row) or a .json list of objects")
    if not rows:
        raise JobError(f"{path} has no jobs")
    return rows


def _available(workflow: Workflow) -> list[str]:
    """Every ``NODE_ID.input`` holding a value (not a link), for error messages."""
    return [
        f"{node_id}.{name}"
        for node_id, node in workflow.items()
        for name, value in node["inputs"].items()
        if not _is_link(value)
    ]


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _available_hint(workflow: Workflow) -> str:
    names = _available(workflow)
    shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
    return f"available NODE_ID.input columns: {shown}; aliases: {', '.join(ALIASES)}, plus '{NAME_COLUMN}'"


def _explicit_target(workflow: Workflow, column: str) -> Target | None:
    """``NODE_ID.input_name`` -> Target (node ids may themselves hold dots or colons), else None."""
    for i, char in enumerate(column):
        if char == "." and column[:i] in workflow:
            node_id, input_name = column[:i], column[i + 1 :]
            node = workflow[node_id]
            if input_name not in node["inputs"]:
                inputs = ", ".join(f"{node_id}.{n}" for n in node["inputs"]) or "none"
                raise JobError(
                    f"column {column!r}: node {node_id} ({node['class_type']}) has no input "
                    f"{input_name!r}; its inputs: {inputs}"
                )
            if _is_link(node["inputs"][input_name]):
                source = node["inputs"][input_name][0]
                raise JobError(
                    f"column {column!r}: that input is linked to node {source} "
                    f"({workflow.get(str(source), {}).get('class_type', '?')}); set a value on node {source} "
                    "instead"
                )
            return Target(node_id, input_name)
    return None


def _prompt_targets(workflow: Workflow) -> list[Target]:
    """The prompt text: the CausVid Prompt Schedule, else the one text encoder feeding a 'positive' input."""
    schedules = [
        Target(nid, "schedule" if "schedule" in node["inputs"] else "text")
        for nid, node in workflow.items()
        if node["class_type"] == PROMPT_SCHEDULE and ({"schedule", "text"} & node["inputs"].keys())
    ]
    candidates = schedules or [
        Target(nid, "text")
        for nid, node in workflow.items()
        if "TextEncode" in node["class_type"] and isinstance(node["inputs"].get("text"), str)
    ]
    if len(candidates) > 1 and not schedules:
        positive = {
            str(value[0])
            for node in workflow.values()
            for name, value in node["inputs"].items()
            if name == "positive" and _is_link(value)
        }
        linked = [t for t in candidates if t.node_id in positive]
        if len(linked) == 1:
            return linked
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise JobError(
            f"column 'prompt': the workflow has no {PROMPT_SCHEDULE} node and no text-encode node with a "
            f"'text' input; use a NODE_ID.input column instead. {_available_hint(workflow)}"
        )
    listed = ", ".join(
        f"{t} ({workflow[t.node_id]['class_type']}: {str(workflow[t.node_id]['inputs'][t.input_name])[:40]!r})"
        for t in candidates
    )
    raise JobError(
        f"column 'prompt' is ambiguous: it could set {listed}; use a NODE_ID.input column such as "
        f"{candidates[0]} instead"
    )


def resolve_column(workflow: Workflow, column: str) -> list[Target]:
    """The inputs one column sets; JobError naming the column and the available inputs when none match."""
    explicit = _explicit_target(workflow, column)
    if explicit is not None:
        return [explicit]
    alias = column.lower()
    if alias == "prompt":
        return _prompt_targets(workflow)
    if alias in INPUT_ALIASES:
        names = INPUT_ALIASES[alias]
        targets = [
            Target(nid, name)
            for nid, node in workflow.items()
            for name in names
            if name in node["inputs"] and not _is_link(node["inputs"][name])
        ]
        if targets:
            return targets
        raise JobError(
            f"column {column!r}: no node of the workflow has an input named {' or '.join(names)}; "
            f"{_available_hint(workflow)}"
        )
    if "." in column:
        node_id = column.split(".", 1)[0]
        raise JobError(
            f"column {column!r}: the workflow has no node {node_id!r} (node ids: {', '.join(workflow)}); "
            f"{_available_hint(workflow)}"
        )
    raise JobError(f"unknown column {column!r}: {_available_hint(workflow)}")


def convert(value: Any, current: Any) -> Any:
    """``value`` converted to the type of the workflow's ``current`` value (int, float, bool, str)."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{value!r} is not a boolean (use true/false, yes/no or 1/0)")
    if isinstance(current, int):
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        if isinstance(value, int):
            return value
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if number.is_integer():
            return int(number)
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(current, float):
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            return float(value if isinstance(value, (int, float)) else str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if isinstance(current, str):
        if isinstance(value, (dict, list)):
            raise ValueError(f"{value!r} is not text")
        return value if isinstance(value, str) else json.dumps(value)
    return value


KIND_EXAMPLES = {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}
KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "text"}


def declared_example(object_info: dict | None, class_type: str, input_name: str) -> Any:
    """A value of the type the server declares for an input (INT -> 0, FLOAT -> 0.0, ...), or None.

    JSON writes 81.0 as 81, so a FLOAT input may hold an int in the workflow: the declaration wins.
    """
    declared = ((object_info or {}).get(class_type) or {}).get("input") or {}
    spec = (declared.get("required") or {}).get(input_name) or (declared.get("optional") or {}).get(
        input_name
    )
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    return KIND_EXAMPLES.get(kind) if isinstance(kind, str) else None


def _substitute(
    workflow: Workflow, row: dict[str, Any], targets: dict[str, list[Target]], object_info: dict | None
) -> Workflow:
    """A copy of ``workflow`` with the row's values set; ValueError naming the column on a bad value."""
    prompt = copy.deepcopy(workflow)
    for column, value in row.items():
        for target in targets[column]:
            node = prompt[target.node_id]
            current = node["inputs"][target.input_name]
            example = declared_example(object_info, node["class_type"], target.input_name)
            like = current if example is None else example
            try:
                node["inputs"][target.input_name] = convert(value, like)
            except ValueError as e:
                kind = KIND_NAMES.get(type(like), type(like).__name__)
                where = "" if column == str(target) else f"{target}, "
                raise ValueError(f"column {column!r} ({where}{kind}): {e}") from None
    return prompt


def build_jobs(workflow: Workflow, rows: list[dict[str, Any]], object_info: dict | None = None) -> list[Job]:
    """One Job per row; an unknown column raises JobError, a bad value only marks its job invalid.

    ``object_info`` (the server's GET /object_info), when given, decides the type of each input.
    """
    columns = list(dict.fromkeys(c for row in rows for c in row if c.lower() != NAME_COLUMN))
    targets = {column: resolve_column(workflow, column) for column in columns}
    jobs = []
    for index, row in enumerate(rows, start=1):
        name = next((str(v) for k, v in row.items() if k.lower() == NAME_COLUMN), "")
        values = {k: v for k, v in row.items() if k.lower() != NAME_COLUMN}
        job = Job(index, name, values)
        try:
            job.prompt = _substitute(workflow, values, targets, object_info)
        except ValueError as e:
            job.error = str(e)
        jobs.append(job)
    return jobs
