"""``python -m causvid_core <command>``: see ``causvid_core.cli``."""

from .cli import main

raise SystemExit(main())
