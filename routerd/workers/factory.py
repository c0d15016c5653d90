"""Builds the Worker for a catalog entry: its argv from the backend, the shared HTTP session,
and the registry that remembers spawned engines (so a routerd killed with SIGKILL finds and
reaps them on its next start)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import aiohttp

from .backends import Argv, build_argv
from .process import Worker
from .registry import WorkerRegistry

if TYPE_CHECKING:
    from ..catalog import ModelEntry


class WorkerFactory:
    def __init__(self, session: aiohttp.ClientSession, registry: WorkerRegistry, *,
                 llama_server: str | None) -> None:
        self.session, self.registry, self.llama_server = session, registry, llama_server

    def __call__(self, entry: ModelEntry, on_exit: Callable[[Worker], None]) -> Worker:
        launch, llama_server, registry = entry.launch, self.llama_server, self.registry

        def build(host: str, port: int, api_key: str) -> Argv:
            return build_argv(launch, host=host, port=port, api_key=api_key,
                              llama_server=llama_server)

        def exited(worker: Worker) -> None:
            registry.forget(worker)
            on_exit(worker)

        return Worker(entry.name, build, self.session, on_exit=exited, on_spawn=registry.record)
