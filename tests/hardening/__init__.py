"""Issue 12 hardening: hostile files and bodies, bookkeeping that fails, metrics that stay
monotonic; each test drives a real daemon over HTTP."""
