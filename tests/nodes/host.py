"""Run prompts in the real ComfyUI host: in-process (fast), over HTTP (main.py) and in headless chromium.

A helper module for the tests under tests/nodes (not a test file). The package is made visible to the
host through a symlink ``<tmp>/custom_nodes/comfyui-causvid -> repo``: nothing is written into the repo or
into the cached host tree. See shared/TEST_HOST.md (beside the checkout) for how the host runs offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGE_NAME = "comfyui-causvid"
CACHE = Path(os.environ.get("CAUSVID_CACHE", Path.home() / ".cache" / "comfyui-causvid"))
FRONTEND_158 = CACHE / "frontend-1.58" / "comfyui_frontend_package" / "static"
NODE_MODULES = CACHE / "node" / "node_modules"
CHROMIUM = Path("/usr/bin/chromium")
BROWSER_SCRIPT = Path(__file__).resolve().parent / "browser" / "load_workflow.mjs"
ARTIFACTS = REPO / "test-artifacts"
PYTHON = sys.executable


def link_package(custom_nodes: Path) -> Path:
    """Symlink the repo as ``custom_nodes/comfyui-causvid`` (idempotent) and return the link."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACKAGE_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return link
    if link.exists() or link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a link to {REPO}: remove it or use another folder")
    link.symlink_to(REPO, target_is_directory=True)
    return link


# ----------------------------------------------------------------------------------------------------------
# In-process host
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Validation:
    """What ``execution.validate_prompt`` says about a prompt."""

    ok: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict[str, Any]


@dataclass
class Result:
    """One in-process run: the host's messages, progress updates, UI outputs and raw node outputs."""

    prompt_id: str
    success: bool
    messages: list[tuple[str, dict]]
    progress: list[dict]
    outputs: dict[str, dict]
    values: dict[str, list] = field(default_factory=dict)

    def events(self, name: str) -> list[dict]:
        """Payloads of every message named ``name`` (e.g. 'executing', 'progress', 'execution_error')."""
        return [data for event, data in self.messages if event == name]

    @property
    def interrupted(self) -> bool:
        return bool(self.events("execution_interrupted"))

    @property
    def error(self) -> str | None:
        """``exception_message`` of the run's execution_error (the host appends a newline: stripped), or None."""
        errors = self.events("execution_error")
        return errors[-1]["exception_message"].strip() if errors else None

    @property
    def executed_nodes(self) -> list[str]:
        """Ids of the nodes that ran, in order ('executing' messages)."""
        return [d["node"] for d in self.events("executing") if d.get("node") is not None]

    def value(self, node_id: str, slot: int = 0) -> Any:
        """Raw Python output ``slot`` of node ``node_id`` (first item of the host's per-slot list)."""
        return self.values[str(node_id)][slot][0]


class PromptInvalid(AssertionError):
    """The host's validation rejected a prompt given to ``InProcessHost.execute``."""


class _FakeServer:
    """The few PromptServer attributes the executor uses; every send_sync is recorded."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.sent: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.sent.append((event, data))

    def queue_updated(self) -> None:
        pass


def import_host(comfy_root: Path) -> None:
    """Import the host's modules in main.py's order, so its ``utils`` package is not shadowed.

    ``nodes.py`` puts ``ComfyUI/comfy`` first on sys.path; imported before ``utils`` (as main.py never
    does), ``import utils`` then finds ``comfy/utils.py`` and ``comfy_extras/nodes_images.py`` fails.
    """
    root = str(comfy_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() != comfy_root / "nodes.py":
        raise RuntimeError(
            f"sys.modules['nodes'] is {loaded!r}, not the host's nodes.py: a test imported this repo's "
            "nodes/ package as top-level 'nodes'; import the node modules through the host instead"
        )
    utils = sys.modules.get("utils")
    if (
        utils is not None
        and Path(getattr(utils, "__file__", "")).resolve() != comfy_root / "utils" / "__init__.py"
    ):
        del sys.modules["utils"]
    saved = list(sys.path)
    sys.path.insert(0, root)
    try:
        importlib.import_module("utils.extra_config")
        importlib.import_module("utils.install_util")
        importlib.import_module("utils.json_util")
    finally:
        sys.path[:] = saved
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    importlib.import_module("server")
    importlib.import_module("nodes")
    importlib.import_module("execution")


def _progress_hook(
    server: _FakeServer, progress: list[dict], interrupt_after: int | None, hook_raises: bool
) -> Callable[..., None]:
    """A progress hook like main.py's (interrupt check, progress registry, 'progress' message) that records.

    Each entry of ``progress``: value, max, node (id of the running node), preview (the preview tuple the
    node passed, e.g. ("JPEG", PIL image, max size), or None).
    """
    import comfy.model_management as mm
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value: int, total: int, preview: Any, prompt_id: str | None = None, node_id: str | None = None):
        context = get_executing_context()
        if node_id is None:
            node_id = context.node_id if context is not None else server.last_node_id
        progress.append({"value": value, "max": total, "node": node_id, "preview": preview})
        if interrupt_after is not None and len(progress) >= interrupt_after:
            mm.interrupt_current_processing(True)
        if hook_raises:
            mm.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview)
        server.send_sync("progress", {"value": value, "max": total, "node": node_id}, server.client_id)

    return hook


class InProcessHost:
    """The host's node registry and executor in this process; one fresh executor per run (no caching)."""

    _extras_loaded = False

    def __init__(self, comfy_root: Path, work_dir: Path) -> None:
        import_host(comfy_root)
        import folder_paths

        import nodes

        self.comfy_root = comfy_root
        self.work_dir = work_dir
        self.output_dir = work_dir / "output"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "temp").mkdir(exist_ok=True)
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_temp_directory(str(work_dir / "temp"))
        if not InProcessHost._extras_loaded:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            InProcessHost._extras_loaded = True
        self.package_link: Path | None = None

    def load_package(self) -> Path:
        """Import this package as the host does (``nodes.load_custom_node``) once; returns its link."""
        if self.package_link is None:
            link = link_package(self.work_dir / "custom_nodes")
            self._load(link)
            self.package_link = link
        return self.package_link

    def _load(self, path: Path) -> None:
        """``nodes.load_custom_node`` on one package folder; its log goes into the error when it fails."""
        import nodes

        records: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger().addHandler(handler)
        try:
            ok = asyncio.run(nodes.load_custom_node(str(path), module_parent="custom_nodes"))
        finally:
            logging.getLogger().removeHandler(handler)
        if not ok:
            raise RuntimeError(f"the host could not import {path}:\n" + "\n".join(records))

    @property
    def node_classes(self) -> dict[str, type]:
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def object_info(self, class_type: str) -> dict:
        """The /object_info entry of one node type (the fields workflow conversion needs)."""
        import nodes

        cls = nodes.NODE_CLASS_MAPPINGS[class_type]
        if hasattr(cls, "GET_NODE_INFO_V1"):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {
            "input": inputs,
            "input_order": {k: list(v.keys()) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            "name": class_type,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
            "category": getattr(cls, "CATEGORY", "sd"),
        }

    def object_infos(self, kinds: list[str] | None = None) -> dict[str, dict]:
        """/object_info entries of ``kinds`` (default: every registered node type)."""
        return {kind: self.object_info(kind) for kind in (kinds or list(self.node_classes))}

    def validate(self, prompt: dict) -> Validation:
        """``execution.validate_prompt`` on an API-format prompt."""
        import execution

        ok, error, outputs, node_errors = asyncio.run(
            execution.validate_prompt(uuid.uuid4().hex, prompt, None)
        )
        return Validation(ok, error, list(outputs), node_errors)

    def execute(
        self,
        prompt: dict,
        *,
        interrupt_after: int | None = None,
        hook_raises: bool = True,
        extra_data: dict | None = None,
    ) -> Result:
        """Validate and run ``prompt`` with a fresh executor, recording messages and progress.

        interrupt_after: after that many progress updates, call the host's interrupt (as the Cancel button
        does). hook_raises: like main.py's hook, raise the interrupt inside the progress update; False
        leaves it to the node's own ``throw_exception_if_processing_interrupted`` checks.
        """
        import comfy.utils
        import execution

        import nodes

        valid = self.validate(prompt)
        if not valid.ok:
            raise PromptInvalid(
                f"prompt rejected: {valid.error}; node_errors: {json.dumps(valid.node_errors)}"
            )
        prompt_id = uuid.uuid4().hex
        server = _FakeServer()
        progress: list[dict] = []
        executor = execution.PromptExecutor(
            server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )
        previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(
            _progress_hook(server, progress, interrupt_after, hook_raises)
        )
        try:
            data = {"client_id": "pytest", **(extra_data or {})}
            executor.execute(prompt, prompt_id, data, valid.outputs)
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)
            nodes.interrupt_processing(False)
        values = {}
        for node_id in prompt:
            entry = executor.caches.outputs.get(node_id)
            if entry is not None:
                values[node_id] = entry.outputs
        return Result(
            prompt_id=prompt_id,
            success=executor.success and not any(e == "execution_interrupted" for e, _ in server.sent),
            messages=server.sent,
            progress=progress,
            outputs=executor.history_result.get("outputs", {}),
            values=values,
        )


# ----------------------------------------------------------------------------------------------------------
# HTTP host (python main.py)
# ----------------------------------------------------------------------------------------------------------


class PromptRejected(AssertionError):
    """POST /prompt answered an error (HTTP 400 with ``error`` and ``node_errors``)."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"POST /prompt -> HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class HttpHost:
    """A running ``main.py``: its base URL, folders and log file."""

    base: str
    base_dir: Path
    output_dir: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _write_models_config(base_dir: Path, models: dict[str, list[Path]]) -> list[str]:
    """An extra_model_paths.yaml registering extra model folders; returns the main.py arguments."""
    if not models:
        return []
    lines = ["causvid_tests:"]
    for folder, paths in models.items():
        lines.append(f"  {folder}: |")
        lines.extend(f"    {Path(p).resolve()}" for p in paths)
    config = base_dir / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    return ["--extra-model-paths-config", str(config)]


@contextlib.contextmanager
def http_host(
    comfy_root: Path,
    tmp_path: Path,
    *,
    front_end_root: Path | None = None,
    models: dict[str, list[Path]] | None = None,
    env: dict[str, str] | None = None,
    load_package: bool = True,
    timeout: float = 90,
) -> Iterator[HttpHost]:
    """Start ``main.py --cpu`` on a free port with this package loaded; yield it; stop it with SIGTERM.

    ``--base-directory`` points models/custom_nodes/input/user/temp at ``tmp_path/base`` so the cached host
    tree is not written to; only this package is loaded (--disable-all-custom-nodes + whitelist).
    """
    base_dir = tmp_path / "base"
    output_dir = tmp_path / "output"
    for sub in ("custom_nodes", "models", "input", "user/default"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A returning user: no first-run template browser over the canvas.
    settings = {"Comfy.TutorialCompleted": True}
    (base_dir / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    port = free_port()
    cmd = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes"]
    cmd += ["--base-directory", str(base_dir), "--output-directory", str(output_dir)]
    cmd += ["--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    cmd += _write_models_config(base_dir, models or {})
    if load_package:
        link_package(base_dir / "custom_nodes")
        cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", PACKAGE_NAME]
    if front_end_root is not None:
        cmd += ["--front-end-root", str(front_end_root)]
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=comfy_root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent,
        )
    host = HttpHost(f"http://127.0.0.1:{port}", base_dir, output_dir, log, proc)
    try:
        _wait_ready(host, timeout)
        yield host
    finally:
        _stop(proc)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no server outlives a killed run (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(host: HttpHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {host.process.returncode}; log:\n{host.log_tail()}")
        try:
            get_json(host.base + "/object_info", timeout=5)
            return
        except (OSError, ValueError):
            time.sleep(0.3)
    raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout:.0f} s; log:\n{host.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queue_prompt(base: str, prompt: dict, client_id: str) -> str:
    """POST /prompt; returns the prompt id or raises PromptRejected (with node_errors) on an error."""
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    request = urllib.request.Request(base + "/prompt", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["prompt_id"]
    except urllib.error.HTTPError as e:
        raise PromptRejected(e.code, json.loads(e.read() or b"{}")) from None


def history(base: str, prompt_id: str) -> dict:
    """GET /history/{id}: the prompt's entry (``outputs``, ``status``), or {} while it is not done."""
    return get_json(f"{base}/history/{prompt_id}").get(prompt_id, {})


WATCHED = (
    "progress",
    "executing",
    "executed",
    "execution_error",
    "execution_interrupted",
    "execution_success",
)


async def _follow(base: str, client_id: str, prompt_id: str | None, prompt: dict | None, timeout: float):
    import aiohttp

    events: list[tuple[str, dict]] = []
    ws_url = base.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=20) as ws:
        if prompt is not None:
            prompt_id = await asyncio.to_thread(queue_prompt, base, prompt, client_id)
        elif await asyncio.to_thread(history, base, prompt_id):
            return prompt_id, events  # finished before we connected
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} not done in {timeout:.0f} s; events: {events[-5:]}")
            msg = await ws.receive(timeout=left)
            if msg.type == aiohttp.WSMsgType.BINARY:
                events.append(("binary", {"bytes": len(msg.data)}))
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"websocket closed ({msg.type}) while waiting for prompt {prompt_id}")
            data = json.loads(msg.data)
            kind, payload = data.get("type"), data.get("data") or {}
            if kind not in WATCHED or payload.get("prompt_id", prompt_id) != prompt_id:
                continue
            events.append((kind, payload))
            if kind == "executing" and payload.get("node") is None:
                return prompt_id, events


def follow_ws(
    base: str,
    client_id: str,
    prompt_id: str | None = None,
    *,
    prompt: dict | None = None,
    timeout: float = 120,
) -> tuple[str, list[tuple[str, dict]]]:
    """Collect a prompt's websocket events until ``executing`` with node None.

    Give ``prompt`` to queue it after the socket is open (no event is missed); returns (prompt_id, events).
    """
    if (prompt_id is None) == (prompt is None):
        raise ValueError("give exactly one of prompt_id (already queued) or prompt (queued here)")
    return asyncio.run(_follow(base, client_id, prompt_id, prompt, timeout))


def run_prompt(base: str, prompt: dict, timeout: float = 120) -> tuple[str, list[tuple[str, dict]], dict]:
    """Queue ``prompt``, follow it to the end; returns (prompt_id, websocket events, history entry)."""
    prompt_id, events = follow_ws(base, uuid.uuid4().hex, prompt=prompt, timeout=timeout)
    return prompt_id, events, history(base, prompt_id)


# ----------------------------------------------------------------------------------------------------------
# Headless browser (Debian chromium driven by playwright-core)
# ----------------------------------------------------------------------------------------------------------


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when chromium, node and playwright-core are present)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: run scripts/setup_browser.sh"
    if not (NODE_MODULES / "playwright-core" / "package.json").exists():
        return f"playwright-core not found in {NODE_MODULES}: run scripts/setup_browser.sh"
    if subprocess.run(["node", "--version"], capture_output=True).returncode != 0:
        return "node not found: install nodejs"
    return None


def load_in_browser(
    base: str, workflow: dict | Path, screenshot: Path, *, queue: bool = False, timeout: float = 120
) -> dict:
    """Open the page, load a UI workflow, optionally queue it; returns the script's JSON findings.

    Keys: ok, frontend_version, missing (node types the page does not know), node_count, queued,
    history (the queued prompts' /history entries), console_errors, page_errors, error.
    """
    if isinstance(workflow, dict):
        path = screenshot.with_suffix(".workflow.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(workflow))
        workflow = path
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["node", str(BROWSER_SCRIPT), base, str(workflow), str(screenshot), "1" if queue else "0"]
    env = {**os.environ, "PLAYWRIGHT_NODE_MODULES": str(NODE_MODULES), "CHROMIUM": str(CHROMIUM)}
    env["BROWSER_TIMEOUT_MS"] = str(int(timeout * 1000))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 30)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"browser script gave no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return json.loads(lines[-1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
