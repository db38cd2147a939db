"""``python -m sidecar`` is the same CLI as ``secret-sidecar``."""

from sidecar.cli import main

raise SystemExit(main())
