"""`python -m routerd.engine --model PATH --port N ...`: see routerd.engine.server."""

from __future__ import annotations

from routerd.engine.server import main

raise SystemExit(main())
