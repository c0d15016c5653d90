"""The placement handed to the dispatcher: local engines (the scheduler) and peers behind one
`acquire`/`release`, so handlers never know where a model runs (dispatch.Placement).

A name only the local catalog serves goes straight to the scheduler, as before peers existed.
A name peers serve too (or only) is placed by replicas.choose over routerd's own view of each
place: loaded, slots, requests in flight there, room to load without evicting.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import aiohttp
import structlog

from ..catalog import ModelEntry
from ..errors import RouterdError
from ..scheduler import policy
from ..scheduler.lifecycle import ModelState
from ..scheduler.runner import Runner
from ..scheduler.scheduler import Scheduler
from . import replicas
from .peer import Peer
from .peers import Offer, Peers

log = structlog.get_logger(__name__)


class PeerDown(RouterdError):
    """Every place serving the model is down: 503 at once, with when to retry."""

    status = 503
    code = "peer_unavailable"
    type = "server_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class PeerTarget:
    """dispatch.Target for one model on one peer: the peer's URL and key, the body's `model`
    rewritten to the peer's own name."""

    __slots__ = ("peer", "remote", "name", "_counted")

    def __init__(self, peer: Peer, remote: str, name: str) -> None:
        self.peer, self.remote, self.name = peer, remote, name
        self._counted = True

    @property
    def base_url(self) -> str:
        return self.peer.api_root

    @property
    def auth_headers(self) -> Mapping[str, str]:
        return self.peer.headers  # the peer's key; the client's never leaves routerd

    @property
    def alive(self) -> bool:
        return self.peer.up

    def forward(self, path: str, body: bytes | None) -> tuple[str, bytes | None]:
        """The URL on the peer and the body it gets (`model` set to the peer's name)."""
        if body:
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and "model" in obj and obj["model"] != self.remote:
                obj["model"] = self.remote
                body = json.dumps(obj, ensure_ascii=False).encode()
        return self.peer.forward_url(path), body

    def note_progress(self) -> None:
        pass

    async def activity(self, session: aiohttp.ClientSession, timeout: float) -> bytes | None:
        """A waiting non-streamed request: the peer's good polls count as progress."""
        return b"%d" % self.peer.generation if self.peer.up else None

    async def exit_code(self, wait: float) -> int | None:
        """A request failed here: probe the peer at once (marks it down when gone)."""
        self.peer.metrics.inc_peer_failure(self.peer.name)
        await self.peer.check(wait)
        return None


def _local_key(i: int) -> str:
    return "local" if i == 0 else f"local#{i + 1}"


class Router:
    """dispatch.Placement over the scheduler and the peers."""

    def __init__(self, scheduler: Scheduler, peers: Peers) -> None:
        self.scheduler, self.peers = scheduler, peers

    @property
    def closing(self) -> bool:
        return self.scheduler.closing

    async def acquire(self, name: str, *, keep_alive: float | None = None,
                      entry: Any = None) -> Runner | PeerTarget:
        offers = self.peers.offers(entry.name if entry is not None else name) \
            if self.peers.by_name else []
        copies = self._copies(name, entry)
        if not offers and len(copies) <= 1:
            return await self.scheduler.acquire(name, keep_alive=keep_alive, entry=entry)
        entry = entry or self.scheduler.catalog.resolve(name)
        local = not entry.source.startswith("peer")
        up = [o for o in offers if o.peer.up]
        places = [self._peer_place(o) for o in up]
        if local:
            copies = copies or [entry]
            places += [self._local_place(c, _local_key(i)) for i, c in enumerate(copies)]
        choice = replicas.choose(places)
        if choice is None:
            raise self._down(name, offers)
        if choice.local:
            chosen = copies[[_local_key(i) for i in range(len(copies))].index(choice.key)]
            if chosen is copies[0]:
                return await self.scheduler.acquire(name, keep_alive=keep_alive, entry=entry)
            return await self.scheduler.acquire(chosen.name, keep_alive=keep_alive,
                                                entry=chosen)
        offer = next(o for o in up if o.peer.name == choice.key)
        return self._lease(offer, name)

    def _copies(self, name: str, entry: ModelEntry | None) -> list[ModelEntry]:
        """The local engines for a name: the model and its `replicas:` copies ([] or one when
        it has none). A request with its own load options (Ollama num_ctx) gets the model
        only: a copy is started with the model's configured options."""
        catalog = self.scheduler.catalog
        main = catalog.get(entry.name if entry is not None else name)
        if main is None or not main.replicas or (entry is not None and entry is not main):
            return []
        return [main, *(c for c in map(catalog.get, main.replicas) if c is not None)]

    def _lease(self, offer: Offer, name: str) -> PeerTarget:
        peer = offer.peer
        peer.inflight[offer.remote] = peer.inflight.get(offer.remote, 0) + 1
        peer.metrics.inc_peer_request(peer.name)
        return PeerTarget(peer, offer.remote, name)

    def release(self, target: Runner | PeerTarget, keep_alive: float | None = None) -> None:
        if isinstance(target, PeerTarget):
            if target._counted:
                target._counted = False
                left = target.peer.inflight.get(target.remote, 1) - 1
                if left > 0:
                    target.peer.inflight[target.remote] = left
                else:
                    target.peer.inflight.pop(target.remote, None)
            return
        self.scheduler.release(target, keep_alive)

    async def kill_hung(self, target: Runner | PeerTarget, reason: str) -> None:
        if isinstance(target, PeerTarget):
            log.warning("peer.hung", peer=target.peer.name, model=target.remote, reason=reason)
            target.peer.mark_down(reason)
            return
        await self.scheduler.kill_hung(target, reason)

    # ------------------------------------------------------------------ views

    @staticmethod
    def _peer_place(o: Offer) -> replicas.Place:
        m = o.peer.models[o.remote]
        return replicas.Place(
            o.peer.name, loaded=m.loaded, slots=m.slots,
            inflight=o.peer.inflight.get(o.remote, 0),
            fits=bool(m.size and o.peer.free >= m.size), weight=o.peer.config.weight)

    def _local_place(self, entry: ModelEntry, key: str = "local") -> replicas.Place:
        s = self.scheduler
        runner = s.runners.get(entry.name)
        loaded = runner is not None and runner.state.value in (ModelState.READY,
                                                                ModelState.LOADING)
        return replicas.Place(key, local=True, loaded=loaded,
                              slots=entry.launch.parallel,
                              inflight=runner.refs if runner is not None else 0,
                              fits=not loaded and self._local_fits(entry))

    def _local_fits(self, entry: ModelEntry) -> bool:
        """Whether the local engine could load it now without evicting (a what-if)."""
        s = self.scheduler
        if s.config.max_loaded and len(s.runners) >= s.config.max_loaded:
            return False
        try:
            need, _ = s.acct.need(entry)
            views = [r.view() for r in s.runners.values()]
            return policy.fits_alongside(need, views, s.acct.budget())
        except Exception:  # noqa: BLE001 - a model that cannot be read does not "fit"
            return False

    def _down(self, name: str, offers: list[Offer]) -> PeerDown:
        now = time.monotonic()
        wait = min((max(0.0, o.peer.retry_at - now) for o in offers), default=1.0)
        why = "; ".join(f"{o.peer.name}: {o.peer.error or 'down'}" for o in offers)
        return PeerDown(f"model {name!r} is served only by peers that are down ({why})",
                        retry_after=max(1, math.ceil(wait)))
