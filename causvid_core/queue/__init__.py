"""Queue helper: fill a running ComfyUI server's queue from an API workflow and a file of substitutions.

``python -m causvid_core.queue WORKFLOW_API.json JOBS.csv|JOBS.json [--dry-run] ...``; see docs/queue.md.
Standard library only, except aiohttp (imported lazily) for the websocket that shows progress.
"""

from .cli import main

__all__ = ["main"]
