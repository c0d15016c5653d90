"""Every configured peer: started, reconfigured on SIGHUP, and asked by name.

Names (README, "Several hosts"): a peer's model is known as `prefix + its name` and, always,
as `<peer>/<its name>`. A local model keeps its name (local wins in the catalog: its settings
are the ones shown); a peer serving the same name is a replica of it, and requests are shared
by the replica policy (replicas.py). Several peers exposing one name are replicas of each
other. `<peer>/<name>` reaches that peer only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Iterable

import aiohttp
import structlog

from ..catalog import ModelEntry
from ..config import PeerConfig
from ..metrics import Metrics
from ..workers.backends import LaunchSpec
from .peer import Peer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Offer:
    peer: Peer
    remote: str  # the peer's own name for the model


class Peers:
    def __init__(self, configs: Iterable[PeerConfig], session: aiohttp.ClientSession,
                 metrics: Metrics | None = None) -> None:
        self.session, self.metrics = session, metrics
        self.by_name: dict[str, Peer] = {}
        self._pending = list(configs)
        self._stopping: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.reconfigure(self._pending)

    def reconfigure(self, configs: Iterable[PeerConfig]) -> list[Peer]:
        """Start new peers, restart changed ones, stop removed ones (in the background);
        returns the peers stopped, for a caller that wants to await them."""
        wanted = {c.name: c for c in configs}
        gone = []
        for name, peer in list(self.by_name.items()):
            if wanted.get(name) != peer.config:
                gone.append(self.by_name.pop(name))
        for name, c in wanted.items():
            if name not in self.by_name:
                peer = Peer(c, self.session, self.metrics)
                self.by_name[name] = peer
                peer.start()
        for peer in gone:  # owned here: close() waits for them
            task = asyncio.get_running_loop().create_task(peer.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        if gone or wanted:
            log.info("peers.configured", peers=sorted(self.by_name),
                     stopped=sorted(p.name for p in gone))
        return gone

    async def close(self) -> None:
        peers, self.by_name = list(self.by_name.values()), {}
        await asyncio.gather(*(p.stop() for p in peers), *self._stopping)

    async def wait_polled(self, timeout: float) -> None:
        await asyncio.gather(*(p.wait_polled(timeout) for p in self.by_name.values()))

    # ------------------------------------------------------------------ names

    def offers(self, name: str) -> list[Offer]:
        """Every peer place serving `name` (up or not): `<peer>/<model>` names that peer
        alone; any other name, every peer exposing it."""
        head, sep, rest = name.partition("/")
        peer = self.by_name.get(head) if sep else None
        if peer is not None:
            for candidate in (rest, f"{rest}:latest"):
                if candidate in peer.models:
                    return [Offer(peer, candidate)]
        out = []
        for p in self.by_name.values():
            exposed = p.exposed()
            for candidate in (name, f"{name}:latest"):
                if candidate in exposed:
                    out.append(Offer(p, exposed[candidate]))
                    break
        return out

    def entry(self, name: str) -> ModelEntry | None:
        """A catalog entry for a name only peers serve (the catalog asks after its own)."""
        offers = self.offers(name)
        if not offers:
            return None
        first = offers[0]
        m = first.peer.models[first.remote]
        return ModelEntry(
            name=name, launch=LaunchSpec(model=name, path="", backend="peer"),
            source="peer:" + ",".join(o.peer.name for o in offers), size=m.size,
            location=" ".join(o.peer.api_root for o in offers))

    def listing(self, local: set[str]) -> list[dict[str, Any]]:
        """One row per name peers serve: the name, its peers and hosts, loaded where. A name a
        local model holds is listed as `<peer>/<model>` (the local one is listed already)."""
        rows: dict[str, dict[str, Any]] = {}
        for p in self.by_name.values():
            for exposed, remote in p.exposed().items():
                m = p.models[remote]
                shown = exposed if exposed not in local else f"{p.name}/{remote}"
                row = rows.setdefault(shown, {"name": shown, "peers": [], "size": m.size,
                                              "modified_at": m.modified_at})
                row["peers"].append({"peer": p.name, "host": p.api_root, "model": remote,
                                     "up": p.up, "loaded": m.loaded, "kind": p.kind,
                                     "inflight": p.inflight.get(remote, 0)})
        return list(rows.values())

    def status(self) -> list[dict[str, Any]]:
        """Each peer's health, for /api/ps and the dashboard."""
        return [{"name": p.name, "url": p.api_root, "kind": p.kind or "auto", "up": p.up,
                 "error": p.error, "latency_ms": None if p.latency is None
                 else round(p.latency * 1000, 1), "polled_at": p.polled_at,
                 "models": len(p.exposed()), "budget": p.budget,
                 "loaded": sorted(n for n, r in p.exposed().items() if p.models[r].loaded),
                 "inflight": sum(p.inflight.values())} for p in self.by_name.values()]
