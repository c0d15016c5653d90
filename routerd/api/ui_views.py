"""The dashboard's JSON views, built from the scheduler, the accountant and the catalog.

Pure reads (no awaits, no I/O beyond what the accountant caches), so the overview can be
rebuilt on every event without cost. Field names here are the dashboard's, not a dialect's.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import sys
import time
from typing import Any

from .. import __version__

def _state_of(snap: Any) -> str:
    """The lifecycle state, with READY split into ready and busy (a request in flight)."""
    state = snap.state.value
    if state == "ready" and snap.inflight > 0:
        return "busy"
    return str(state)


def model_view(snap: Any, runner: Any, expected_load: float | None,
               default_keep_alive: float = 300.0) -> dict[str, Any]:
    """One loaded (or loading) model: a scheduler RunnerSnapshot, plus its keep-alive."""
    state = _state_of(snap)
    keep_alive = getattr(runner, "keep_alive", default_keep_alive)
    pinned = math.isinf(keep_alive)
    view: dict[str, Any] = {
        "name": snap.name, "state": state, "backend": snap.backend, "pid": snap.pid,
        "ctx_size": snap.ctx_size, "parallel": snap.parallel, "in_flight": snap.inflight,
        "queued": max(0, snap.in_use - snap.inflight), "booked": dict(snap.booked),
        "estimate": dict(snap.estimate), "measured": dict(snap.measured or {}),
        "pinned": pinned, "keep_alive": None if pinned else keep_alive,
        # keep_alive 0 on a busy model (Ollama's unload): it stops when its requests end
        "unload_when_idle": keep_alive == 0 and snap.in_use > 0,
        "expires_at": snap.expires_at,
        "expires_in": None if snap.expires_at is None else max(0.0, snap.expires_at - time.time()),
        "load_seconds": round(snap.load_seconds, 3), "source": snap.entry.source,
    }
    entry_keep = snap.entry.keep_alive
    keep = entry_keep if entry_keep is not None else default_keep_alive
    # What "unpin" sets: the model's own keep-alive, or 5 minutes when that is forever too.
    view["keep_alive_default"] = 300.0 if math.isinf(keep) or keep <= 0 else keep
    worker = getattr(runner, "worker", None)
    if state == "loading" and worker is not None:
        elapsed = max(0.0, time.monotonic() - getattr(worker, "started_at", time.monotonic()))
        view["loading_for"] = round(elapsed, 2)
        if expected_load:
            # The engine does not report progress: elapsed over the last load's duration.
            view["progress"] = round(min(0.95, elapsed / expected_load), 3)
    return view


def _gpus(acct: Any) -> list[dict[str, Any]]:
    try:
        return list(acct.gpus())
    except Exception:  # noqa: BLE001 - a probe that fails shows the budgets alone
        return []


def budgets_view(acct: Any, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One bar per budget: booked per model, free, memory other processes hold (GPUs), and
    the reserve routerd keeps out of its budget; the parts add up to the resource's total."""
    budget = acct.budget()
    totals: dict[str, int] = {}
    others: dict[str, int] = {}
    labels: dict[str, str] = {"ram": "RAM"}
    try:
        totals["ram"] = int(acct.ram.total())
    except Exception:  # noqa: BLE001
        totals["ram"] = budget.get("ram", 0)
    for g in _gpus(acct):
        res = f"gpu{g['index']}"
        totals[res], others[res] = int(g["total"]), int(g.get("other_processes", 0))
        labels[res] = f"GPU {g['index']} · {g['name']}"
    out = []
    for res, cap in budget.items():
        held = []
        for m in models:
            booked = m["booked"].get(res, 0)
            if booked:
                held.append({"name": m["name"], "booked": booked, "state": m["state"],
                             "estimate": m["estimate"].get(res),
                             "measured": m["measured"].get(res)})
        used = sum(h["booked"] for h in held)
        other = others.get(res, 0)
        total = max(totals.get(res, cap), cap + other)
        out.append({"resource": res, "label": labels.get(res, res.upper()), "total": total,
                    "budget": cap, "other": other, "reserve": total - cap - other,
                    "booked": used, "free": max(0, cap - used), "models": held})
    return out


def host_view(acct: Any, engines: dict[str, str]) -> dict[str, Any]:
    gpus = [{k: g.get(k) for k in ("index", "name", "total", "used")} for g in _gpus(acct)]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    try:
        ram = int(acct.ram.total())
        available = int(acct.ram.available())
    except Exception:  # noqa: BLE001
        ram = available = 0
    return {"hostname": socket.gethostname(), "cores": os.cpu_count() or 0,
            "ram_total": ram, "ram_available": available, "gpus": gpus, "load": load,
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
            "python": sys.version.split()[0], "routerd": __version__, "engines": engines}


def overview(scheduler: Any, catalog: Any, acct: Any, engines: dict[str, str],
             expected_load: dict[str, float], default_keep_alive: float) -> dict[str, Any]:
    models = []
    cached = scheduler.cache.cached_bytes(scheduler.config)  # saved prompt caches (issue 14)
    for snap in scheduler.snapshot():
        runner = scheduler.runners.get(snap.name)
        if runner is not None and runner.state.value is not snap.state:
            runner = None  # a runner still stopping while its successor loads
        view = model_view(snap, runner, expected_load.get(snap.name), default_keep_alive)
        view["prompt_cache_bytes"] = cached.get(snap.name, 0)
        models.append(view)
    names = {m["name"] for m in models}
    failed = []
    for n in catalog.names():
        reason = scheduler.failed_reason(n)
        if reason:
            failed.append({"name": n, "reason": reason})
        elif n not in names and scheduler.model_state(n).value == "loading":
            # Queued for a load: waiting for its turn, for room, or a restart's backoff.
            models.append({"name": n, "state": "reloading" if n in scheduler.last_logs
                           else "loading", "booked": {}, "estimate": {}, "measured": {},
                           "in_flight": 0, "queued": 0, "pinned": False})
    return {"time": time.time(), "models": models, "failed": failed,
            "queue": scheduler.waiting,
            "budgets": budgets_view(acct, models), "host": host_view(acct, engines)}


def model_detail(entry: Any, acct: Any, runner: Any, llama_server: str | None) -> dict[str, Any]:
    """What the Models page shows under a model: argv, estimate vs last measured."""
    from ..workers.backends import build_argv

    try:
        argv = build_argv(entry.launch, host="127.0.0.1", port=0, api_key="<per-worker key>",
                          llama_server=llama_server).argv
        argv = ["<port>" if a == "0" and i and argv[i - 1] == "--port" else a
                for i, a in enumerate(argv)]
    except Exception as e:  # noqa: BLE001 - a model that cannot start still has details
        argv = [f"(cannot build: {e})"]
    try:
        booked, estimate = acct.need(entry)
    except Exception:  # noqa: BLE001
        booked, estimate = {}, {}
    last: dict[str, int] = {}
    key = acct._key(entry) if hasattr(acct, "_key") else None
    if key is not None:
        for res in estimate:
            n = acct.book.measured(key, res)
            if n is not None:
                last[res] = n
    launch = entry.launch
    return {"name": entry.name, "source": entry.source, "location": entry.location,
            "file": launch.path, "backend": launch.backend, "ctx_size": launch.ctx_size,
            "parallel": launch.parallel, "gpu_layers": launch.gpu_layers,
            "aliases": list(entry.aliases), "options": dict(entry.options),
            "system": entry.system, "size": entry.size, "argv": argv, "estimate": estimate,
            "booked": booked, "last_measured": last,
            "loaded": None if runner is None else model_view(runner.snapshot(), runner, None)}
