"""``python -m causvid_core.queue``: see ``causvid_core.queue.cli``."""

from .cli import main

raise SystemExit(main())
