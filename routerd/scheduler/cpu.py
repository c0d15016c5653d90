"""CPU threads are a budget too: each worker's `--threads` / `--threads-batch`.

`cpu.threads` (default: the machine's physical cores) is shared among the loaded workers.
The count is set when a worker starts, from the co-residents expected then, and is never
changed while it runs (llama-server cannot change it live, and a restart costs a load):

- a worker fully offloaded to GPUs books `cpu.gpu_threads` (1): the GPU does the work;
- the others share what is left: `max_loaded` of them when `max_loaded` is set (so the
  shares always add up to at most the budget), else the CPU workers loaded now plus this one;
- never more than what the workers already loaded left free, and at least 1.

Only without `max_loaded`, when the workers already loaded hold every thread, can a newcomer
(which gets 1) take the total past the budget: it is logged (`cpu.oversubscribed`).
A model whose own `args` set `-t` keeps it, and that number is what it books.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable

import psutil
import structlog

from ..config import Config
from ..workers.backends import LaunchSpec, explicit_threads
from .accounting import read_info
from .memory import offloaded

if TYPE_CHECKING:
    from ..catalog import ModelEntry

log = structlog.get_logger(__name__)


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def budget(config: Config) -> int:
    return config.cpu.threads or physical_cores()


def on_gpu(launch: LaunchSpec) -> bool:
    """Every layer (the output one too) offloaded to a GPU."""
    p = launch.placement
    if p is None or not p.devices or p.gpu_layers <= 0:
        return False
    info = read_info(launch.path) if launch.path else None
    return info is not None and offloaded(info.n_layer, p.gpu_layers) >= info.n_layer + 1


def booked(launch: LaunchSpec) -> int:
    """The threads a loaded worker holds (0: routerd cannot tell, e.g. a `command`)."""
    own = explicit_threads(launch.args)
    if own is not None:
        return own
    return launch.threads or 0


def threads_for(launch: LaunchSpec, others: Iterable[LaunchSpec], config: Config) -> int | None:
    """The threads to give a worker about to start, next to `others` (loaded)."""
    if launch.backend == "command" or explicit_threads(launch.args) is not None:
        return None
    if on_gpu(launch):
        return config.cpu.gpu_threads
    total = budget(config)
    others = list(others)
    gpu_held = sum(booked(o) for o in others if on_gpu(o))
    cpu_others = [o for o in others if not on_gpu(o)]
    k = config.max_loaded - (len(others) - len(cpu_others)) if config.max_loaded else 0
    if k < 1:
        k = len(cpu_others) + 1
    share = max(1, (total - gpu_held) // k)
    free = total - sum(booked(o) for o in others)
    return max(1, min(share, free))


def launch(entry: ModelEntry, others: Iterable[LaunchSpec], config: Config) -> ModelEntry:
    """The entry with its threads booked (unchanged when routerd does not set them)."""
    others = list(others)
    n = threads_for(entry.launch, others, config)
    if n is None:
        return entry
    held = sum(booked(o) for o in others)
    if held + n > budget(config):
        log.warning("cpu.oversubscribed", model=entry.name, threads=n, others=held,
                    budget=budget(config))
    return replace(entry, launch=replace(entry.launch, threads=n))
