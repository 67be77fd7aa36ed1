"""``python -m heimdex_clip_export``: see :mod:`heimdex_clip_export.cli`."""

from .cli import main

raise SystemExit(main())
