"""Submit jobs one at a time, follow each to its end, survive server restarts, collect the outputs.

Per job: open the websocket first (no event is missed), POST /prompt with our own prompt id, follow
``progress``/``executing`` messages, and take the outcome from ``GET /history/{id}``. When the server drops,
wait for it with growing windows (``retries`` of them), then look the prompt up: finished -> collected,
still queued -> followed again, unknown (the server restarted and lost its queue) -> submitted again.
Every loop is bounded in count (retries) and in time (the per-job timeout).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from .client import PromptRejected, Server, ServerDown, Socket
from .jobs import Job

BAR_WIDTH = 20


@dataclass
class JobResult:
    """What happened to one job: status is 'ok', 'failed' or 'invalid'."""

    index: int
    name: str
    status: str = "failed"
    seconds: float = 0.0
    prompt_id: str | None = None
    submissions: int = 0
    outputs: list[dict] = field(default_factory=list)
    error: str | None = None
    node_errors: dict | None = None


class _Lost(Exception):
    """The server knows nothing of the prompt any more (it restarted and lost its queue)."""


class _Timeout(Exception):
    """The job ran past --timeout."""


class _GaveUp(Exception):
    """A bounded loop ran out of tries; the message says which."""


def collect_outputs(outputs: dict | None) -> list[dict]:
    """Files in a /history entry's ``outputs`` (images, gifs, videos, ...): node, kind, filename, subfolder, type."""
    files = []
    for node_id, ui in (outputs or {}).items():
        for kind, items in (ui or {}).items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append(
                        {
                            "node": node_id,
                            "kind": kind,
                            "filename": item["filename"],
                            "subfolder": item.get("subfolder", ""),
                            "type": item.get("type", "output"),
                        }
                    )
    return files


def output_path(item: dict) -> str:
    """``type/subfolder/filename`` of one output, relative to ComfyUI's folders (output/, temp/)."""
    return "/".join(p for p in (item.get("type", ""), item.get("subfolder", ""), item["filename"]) if p)


def describe_failure(status: dict) -> str:
    """The error of a finished prompt from its history ``status.messages``."""
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            message = " ".join(str(data.get("exception_message", "")).split())
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type', 'error')}: {message}"
            )
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the server reports status {status.get('status_str', 'unknown')!r}"


class ProgressLine:
    """One job's progress: a redrawn line on a terminal, a line per quarter otherwise."""

    def __init__(self, stream: TextIO, label: str, prompt: dict) -> None:
        self.stream, self.label, self.prompt = stream, label, prompt
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0
        self.last_quarter: tuple[str, int] | None = None

    def _node(self, node_id: str) -> str:
        return f"node {node_id} ({self.prompt.get(str(node_id), {}).get('class_type', '?')})"

    def update(self, node_id: str, value: float, maximum: float) -> None:
        """Show ``value/max`` of the running node with a bar."""
        fraction = min(max(value / maximum, 0.0), 1.0) if maximum else 0.0
        filled = round(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        text = f"  {self.label} {self._node(node_id)} {value:g}/{maximum:g} [{bar}] {fraction:4.0%}"
        if self.live:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = max(self.width, len(text))
            self.stream.flush()
            return
        quarter = (str(node_id), int(fraction * 4))
        if quarter != self.last_quarter:
            self.last_quarter = quarter
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.live and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


class Runner:
    """Runs jobs against one server; see the module docstring for the reconnect rules."""

    def __init__(
        self,
        server: Server,
        *,
        client_id: str | None = None,
        retries: int = 3,
        timeout: float = 7200.0,
        poll: float = 3.0,
        wait_base: float = 5.0,
        wait_cap: float = 60.0,
        websocket: bool = True,
        log: TextIO | None = None,
    ) -> None:
        self.server = server
        self.client_id = client_id or uuid.uuid4().hex
        self.retries, self.timeout, self.poll = retries, timeout, poll
        self.wait_base, self.wait_cap = wait_base, wait_cap
        self.websocket = websocket
        self.log = log or sys.stderr
        self.socket: Socket | None = None
        self.server_gone = False  # the last job gave up on the server: fail fast until it answers again
        self.current: JobResult | None = None
        self.last_down: ServerDown | None = None  # why the server last failed to answer (cleared on connect)
        self.results: list[JobResult] = []

    def _say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def run(self, jobs: list[Job]) -> list[JobResult]:
        """Run every job in order; ``self.results`` holds the finished ones even after Ctrl-C."""
        self.results = []
        try:
            for job in jobs:
                self.results.append(self.run_job(job, len(jobs)))
        finally:
            self._drop_socket()
        return self.results

    def run_job(self, job: Job, total: int = 0) -> JobResult:
        """Submit and follow one job to its end; never raises for a server or job problem."""
        result = JobResult(job.index, job.name)
        self.current = result  # the job in flight, for a Ctrl-C (cli._run)
        tag = f"[{job.index}/{total or '?'}]" + (f" {job.name}" if job.name else "")
        if job.error:
            result.status, result.error = "invalid", job.error
            self._say(f"{tag}: invalid: {job.error}")
            return result
        start = time.monotonic()
        try:
            entry = self._drive(job, result, start + self.timeout, tag)
            self._collect(result, entry)
        except PromptRejected as e:
            result.status, result.error, result.node_errors = (
                "invalid",
                f"rejected by the server: {e}",
                e.node_errors,
            )
            result.prompt_id = None
        except _Timeout:
            if result.prompt_id is not None:
                self.server.cancel(result.prompt_id)
                result.error = f"timed out after {self.timeout:g} s (--timeout); cancelled on the server"
            else:  # never queued: say why, when it was the server
                why = f" while waiting for the server: {self.last_down}" if self.last_down else ""
                result.error = f"timed out after {self.timeout:g} s (--timeout) before it was queued{why}"
        except ServerDown as e:
            result.error = f"server {self.server.base} unreachable: {e}"
        except _GaveUp as e:
            result.error = str(e)
        except urllib.error.HTTPError as e:
            result.error = f"{self.server.base} answered HTTP {e.code} {e.reason} to {e.url}"
        result.seconds = round(time.monotonic() - start, 3)
        shown = ", ".join(output_path(o) for o in result.outputs) or "no output files"
        detail = shown if result.status == "ok" else result.error
        self._say(f"{tag}: {result.status} in {result.seconds:.1f} s: {detail}")
        return result

    def _drive(self, job: Job, result: JobResult, deadline: float, tag: str) -> dict:
        """Submit, follow, reconnect and resubmit until the server's history holds the job."""
        reconnects, recheck = 0, False
        while True:
            try:
                self._check(deadline)
                self._connect()
                if recheck and result.prompt_id is not None:
                    recheck = False
                    state, entry = self._locate(result.prompt_id)
                    if state == "done":
                        return entry
                    if state == "lost":
                        raise _Lost
                if result.prompt_id is None:
                    self._submit(job, result, tag)
                return self._follow(job, result.prompt_id, deadline, tag)
            except _Lost:
                self._say(f"{tag}: the server lost prompt {result.prompt_id} (restarted?): submitting again")
                result.prompt_id = None
            except ServerDown as e:
                self._drop_socket()
                self.last_down = e
                reconnects = self._reconnect(e, reconnects, deadline, tag)
                recheck = True

    def _reconnect(self, error: ServerDown, done: int, deadline: float, tag: str) -> int:
        """Wait for the server with growing windows; returns the tries used so far, raises when out of tries.

        Per job: --retries tries in all; once a job gave up, the next jobs get one window each (overall bound).
        """
        tries = 1 if self.server_gone else self.retries
        while done < tries:
            done += 1
            if self._wait_for_server(error, done, tries, deadline, tag):
                return done
        self.server_gone = True
        raise ServerDown(
            f"{error} (gave up after {done} reconnect tries, --retries {self.retries})"
        ) from None

    def _check(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        return left

    def _connect(self) -> None:
        """Open the websocket (or, with polling, probe the server) before anything is submitted."""
        if not self.websocket:
            self.server.queued_ids()
        elif self.socket is None:
            self.socket = Socket(self.server.ws_url(self.client_id), timeout=self.server.timeout)
        self.server_gone = False
        self.last_down = None

    def _drop_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def _submit(self, job: Job, result: JobResult, tag: str) -> None:
        if result.submissions > self.retries:
            raise _GaveUp(
                f"the server lost this job {result.submissions} times; gave up (--retries {self.retries})"
            )
        result.prompt_id = uuid.uuid4().hex  # ours, so a submission whose answer was lost can be looked up
        result.submissions += 1
        result.prompt_id = self.server.submit(job.prompt, self.client_id, result.prompt_id)
        self._say(f"{tag}: queued as {result.prompt_id}")

    def _wait_for_server(self, error: Exception, attempt: int, tries: int, deadline: float, tag: str) -> bool:
        """Poll the server for up to ``wait_base * 2**(attempt-1)`` seconds (capped); True once it answers."""
        window = min(self.wait_base * 2 ** (attempt - 1), self.wait_cap)
        why = str(error) if attempt == 1 else "still unreachable"
        self._say(f"{tag}: {why}; waiting up to {window:g} s for the server (try {attempt}/{tries})")
        end = time.monotonic() + window
        while time.monotonic() < end:
            time.sleep(min(0.5, self._check(deadline)))
            try:
                self.server.queued_ids()
                return True
            except ServerDown:
                continue
        return False

    def _locate(self, prompt_id: str) -> tuple[str, dict | None]:
        """'done' (with its history entry), 'queued' (running or pending) or 'lost'."""
        entry = self.server.history(prompt_id)
        if entry:
            return "done", entry
        if prompt_id in self.server.queued_ids():
            return "queued", None
        entry = self.server.history(prompt_id)  # it may have finished between the two calls
        return ("done", entry) if entry else ("lost", None)

    def _receive(self, timeout: float) -> str | None:
        if self.socket is None:
            time.sleep(timeout)
            return None
        return self.socket.receive(timeout)

    def _follow(self, job: Job, prompt_id: str, deadline: float, tag: str) -> dict:
        """Show progress until the prompt ends; its history entry is checked on every end event and idle poll."""
        progress = ProgressLine(self.log, tag, job.prompt)
        next_poll = time.monotonic() + self.poll
        wait = self.poll if self.socket is not None else 0.25  # polling alone: 0.25 s, doubling up to poll
        try:
            while True:
                text = self._receive(min(wait, self._check(deadline)))
                wait = min(wait * 2, self.poll)
                ended = bool(text) and self._on_message(text, prompt_id, progress)
                if ended or text is None or time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.poll
                    state, entry = self._locate(prompt_id)
                    if state == "done":
                        return entry
                    if state == "lost" and self.socket is None:
                        raise _Lost  # polling cannot tell a quick restart from a deletion: resubmit
                    if state == "lost":
                        raise _GaveUp(
                            f"prompt {prompt_id} left the server's queue without running (deleted or cleared "
                            "in ComfyUI?); not submitted again"
                        )
        finally:
            progress.close()

    @staticmethod
    def _on_message(text: str, prompt_id: str, progress: ProgressLine) -> bool:
        """Handle one websocket message; True when it says our prompt ended."""
        try:
            message = json.loads(text)
        except ValueError:
            return False
        data = message.get("data") if isinstance(message, dict) else None
        if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
            return False
        kind = message.get("type")
        if kind == "progress" and data.get("node") is not None:
            progress.update(data["node"], float(data.get("value", 0)), float(data.get("max", 0)))
        if kind == "executing":
            return data.get("node") is None
        return kind in ("execution_success", "execution_error", "execution_interrupted")

    @staticmethod
    def _collect(result: JobResult, entry: dict) -> None:
        status = entry.get("status") or {}
        result.outputs = collect_outputs(entry.get("outputs"))
        if status.get("status_str", "success") == "success" and status.get("completed", True) is not False:
            result.status = "ok"
        else:
            result.status, result.error = "failed", describe_failure(status)


def format_table(results: list[JobResult], width: int = 100) -> str:
    """The summary table: job, name, status, seconds, outputs (or the error)."""
    rows = [("job", "name", "status", "seconds", "outputs / error")]
    for r in results:
        files = [output_path(o) for o in r.outputs]
        if len(files) > 2:
            files = [files[0], f"... ({len(files)} files)"]
        detail = ", ".join(files) if r.status == "ok" else (r.error or "")
        detail = detail if len(detail) <= width else detail[: width - 3] + "..."
        rows.append((str(r.index), r.name or "-", r.status, f"{r.seconds:.1f}", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "invalid")}
    lines.append(f"{len(results)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def summary(results: list[JobResult], **meta: Any) -> dict:
    """The --summary-json document: run metadata, counts and every job's result."""
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "invalid")}
    return {**meta, "counts": counts, "jobs": [asdict(r) for r in results]}
