"""Command line of the queue helper: parse arguments, build the jobs, dry-run or run them, print the summary.

Exit status: 0 when every job succeeded (or, with --dry-run, is valid); 1 when any job failed or is
invalid; 2 when the workflow, the jobs file or the server cannot be used at all; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import uuid
from collections.abc import Sequence
from pathlib import Path

from .client import Server, ServerDown
from .jobs import Job, JobError, build_jobs, load_rows, load_workflow
from .runner import JobResult, Runner, format_table, summary
from .validate import validate_prompt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m causvid_core.queue",
        description="Queue one ComfyUI job per row of a CSV/JSON file of substitutions, follow each to its end, "
        "retry when the server drops, and print a summary. See docs/queue.md.",
    )
    parser.add_argument("workflow", help="workflow in ComfyUI's API format (Workflow > Export (API))")
    parser.add_argument("jobs", help="jobs: a .csv with a header row, or a .json list of objects")
    parser.add_argument(
        "--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check every job against GET /object_info; queue nothing"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="reconnect/resubmit tries per job (default %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=7200.0,
        help="seconds one job may take, waits included (default %(default)g)",
    )
    parser.add_argument("--summary-json", type=Path, help="also write the summary to this JSON file")
    parser.add_argument("--client-id", help="websocket client id (default: a random one)")
    parser.add_argument(
        "--poll", action="store_true", help="follow jobs by polling /history instead of the websocket"
    )
    return parser


def dry_run(jobs: list[Job], object_info: dict[str, dict]) -> list[JobResult]:
    """Validate every job against the server's node definitions; prints OK or the problems per job."""
    results = []
    for job in jobs:
        errors = [job.error] if job.error else validate_prompt(job.prompt, object_info)
        result = JobResult(job.index, job.name, status="invalid" if errors else "ok")
        result.error = "; ".join(errors) or None
        print(f"{job.label}: " + ("OK" if not errors else "INVALID"))
        for error in errors:
            print(f"  - {error}")
        results.append(result)
    return results


def _object_info(server: Server, required: bool) -> dict | None:
    """The server's node definitions; None (with a note) when it cannot be read and they are optional."""
    try:
        return server.object_info()
    except (ServerDown, urllib.error.HTTPError, ValueError) as e:
        if required:
            raise ServerDown(f"cannot read the node list from {server.base}/object_info: {e}") from None
        print(
            f"note: cannot read {server.base}/object_info ({e}); values take the workflow's types",
            file=sys.stderr,
        )
        return None


def _run(
    server: Server, jobs: list[Job], args: argparse.Namespace, client_id: str
) -> tuple[list[JobResult], int]:
    """Run the jobs; on Ctrl-C the finished ones are kept and the rest reported as not run."""
    runner = Runner(
        server, client_id=client_id, retries=args.retries, timeout=args.timeout, websocket=not args.poll
    )
    try:
        return runner.run(jobs), 0
    except KeyboardInterrupt:
        done = {r.index for r in runner.results}
        stopped = []
        current = runner.current
        if current is not None and current.index not in done and current.prompt_id is not None:
            server.cancel(current.prompt_id)  # it was queued: stop it there too, as the user asked
            current.error = f"cancelled on the server (Ctrl-C; was queued as {current.prompt_id})"
            stopped = [current]
        done |= {r.index for r in stopped}
        rest = [JobResult(j.index, j.name, error="not run (Ctrl-C)") for j in jobs if j.index not in done]
        return runner.results + stopped + rest, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the queue helper; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.retries < 0 or args.timeout <= 0:
        print("error: --retries must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    if args.summary_json and (args.summary_json.is_dir() or args.summary_json.parent.is_file()):
        print(f"error: --summary-json {args.summary_json} cannot be written there (a folder, or under a file); "
              "give a file path such as runs/summary.json", file=sys.stderr)  # fmt: skip
        return 2
    try:
        server = Server(args.server)
        workflow = load_workflow(args.workflow)
        rows = load_rows(args.jobs)
        build_jobs(workflow, rows)  # unknown columns are reported before the server is asked anything
        object_info = _object_info(server, required=args.dry_run)
        jobs = build_jobs(workflow, rows, object_info)
        client_id = args.client_id or uuid.uuid4().hex
        if args.dry_run:
            results, code = dry_run(jobs, object_info or {}), 0
        else:
            results, code = _run(server, jobs, args, client_id)
    except (JobError, ValueError, ServerDown, ImportError) as e:
        hint = "; is ComfyUI running there?" if isinstance(e, ServerDown) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    meta = {"server": server.base, "workflow": str(args.workflow), "jobs_file": str(args.jobs)}
    print(format_table(results))
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.summary_json.with_name(f".{args.summary_json.name}.tmp")
        tmp.write_text(
            json.dumps(summary(results, **meta, dry_run=args.dry_run, client_id=client_id), indent=2) + "\n"
        )
        tmp.replace(args.summary_json)
    return code or (0 if all(r.status == "ok" for r in results) else 1)
