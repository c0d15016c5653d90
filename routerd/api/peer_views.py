"""Peers' models in routerd's listings: /api/tags, /v1/models, /api/ps (routerd/peers/).

Each row names its peer(s) and host(s) under `routerd`; a name that a local model holds is
listed as `<peer>/<model>` (local wins the plain name; see routerd/peers/peers.py).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import keys
from .security import model_visible


def _local_names(catalog: Any) -> set[str]:
    names: set[str] = set()
    for e in catalog.entries():
        names.update((e.name, *e.aliases))
        if e.name.endswith(":latest"):
            names.add(e.name[: -len(":latest")])
    return names


def _rows(request: web.Request) -> list[dict[str, Any]]:
    peers = request.app.get(keys.PEERS)
    if peers is None or not peers.by_name:
        return []
    rows = peers.listing(_local_names(request.app[keys.CATALOG]))
    return [r for r in rows if model_visible(request, r["name"])]


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    places = row["peers"]
    return {"source": "peer:" + ",".join(p["peer"] for p in places),
            "location": " ".join(p["host"] for p in places), "aliases": [],
            "peer": places[0]["peer"], "host": places[0]["host"], "peers": places}


def tags(request: web.Request) -> list[dict[str, Any]]:
    out = []
    for row in _rows(request):
        out.append({"name": row["name"], "model": row["name"],
                    "modified_at": row.get("modified_at") or "1970-01-01T00:00:00Z",
                    "size": row.get("size") or 0, "digest": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "",
                                "families": None, "parameter_size": "",
                                "quantization_level": ""},
                    "routerd": _extra(row)})
    return out


def openai_models(request: web.Request) -> list[dict[str, Any]]:
    return [{"id": row["name"], "object": "model", "created": 0,
             "owned_by": "peer:" + row["peers"][0]["peer"], "routerd": _extra(row)}
            for row in _rows(request)]


def ps(request: web.Request) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the peers' loaded models as /api/ps rows, each peer's health and budget)."""
    peers = request.app.get(keys.PEERS)
    if peers is None:
        return [], []
    models = []
    for row in _rows(request):
        for p in row["peers"]:
            if not p["loaded"]:
                continue
            models.append({"name": row["name"], "model": row["name"], "size": row.get("size") or 0,
                           "digest": "", "details": {}, "expires_at": "2318-01-01T00:00:00Z",
                           "size_vram": 0, "context_length": 0,
                           "routerd": {"state": "ready" if p["up"] else "down",
                                       "peer": p["peer"], "host": p["host"],
                                       "remote_name": p["model"], "inflight": p["inflight"],
                                       "backend": f"peer:{p['kind'] or 'auto'}"}})
    return models, peers.status()
