"""`routerd rpc-worker`: run and supervise a local llama.cpp rpc-server, so a second box that
lends its memory (and CPU or GPU) to a model served elsewhere needs only routerd.

RPC is unauthenticated: anyone who reaches the port can allocate memory and run graphs
there. So rpc-worker binds only the address it is given (127.0.0.1 by default) and refuses
0.0.0.0 unless --allow-all-interfaces says so. The child runs in its own process group with
PR_SET_PDEATHSIG (it dies with rpc-worker); SIGTERM/SIGINT reach it as SIGTERM, then SIGKILL
after a bounded wait; a crash is restarted after a backoff (0.5 s doubling to 30 s, reset once
it ran for a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from . import rpc
from .process import child_setup

log = structlog.get_logger("routerd.rpc")

BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 0.5, 30.0, 60.0
STOP_WAIT = 5.0
# --mem caps the rpc-server's data segment (RLIMIT_DATA: its heap and private writable
# mappings, where the CPU backend's buffers live) at SIZE plus this much for the process
# itself and each thread's stack.
MEM_SLACK, STACK_PER_THREAD = 64 * 1024**2, 8 * 1024**2


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    threads: int | None = None
    cache: bool = False
    mem: int | None = None
    devices: str | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address to bind (default 127.0.0.1; RPC is unauthenticated)")
    p.add_argument("--port", type=int, default=rpc.DEFAULT_PORT)
    p.add_argument("--mem", help="cap the rpc-server's memory (e.g. 8GiB): allocations past it "
                                 "fail, so the load on the serving host fails cleanly")
    p.add_argument("--threads", type=int, help="CPU threads (rpc-server -t)")
    p.add_argument("--cache", action="store_true",
                   help="rpc-server's local tensor cache (-c, under ~/.cache/llama.cpp/rpc)")
    p.add_argument("--device", help="rpc-server -d: comma-separated backend devices")
    p.add_argument("--rpc-server", default="auto", help="the rpc-server binary (default: "
                                                        "PATH, then beside routerd)")
    p.add_argument("--allow-all-interfaces", action="store_true",
                   help="allow --host 0.0.0.0 (exposes an unauthenticated service)")


def rpc_argv(binary: str, opts: Options) -> list[str]:
    argv = [binary, "--host", opts.host, "--port", str(opts.port)]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if opts.cache:
        argv.append("--cache")
    if opts.devices:
        argv += ["--device", opts.devices]
    return argv


def data_limit(opts: Options) -> int | None:
    if opts.mem is None:
        return None
    threads = opts.threads or max(1, (os.cpu_count() or 2) // 2)
    return opts.mem + MEM_SLACK + (threads + 4) * STACK_PER_THREAD




def _preexec(limit: int | None) -> Callable[[], None]:
    return child_setup(limit)  # dies with rpc-worker; RLIMIT_DATA = --mem


def next_delay(delay: float, ran_for: float) -> float:
    """The wait before the next restart: doubled per quick crash, reset after a healthy run."""
    if ran_for >= HEALTHY_AFTER:
        return BACKOFF_FIRST
    return min(BACKOFF_MAX, delay * 2)


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_WAIT)
    except asyncio.TimeoutError:
        log.warning("rpc.kill", pid=proc.pid, after=STOP_WAIT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group, whatever the leader did
    await proc.wait()


async def supervise(argv: list[str], stop: asyncio.Event, *, limit: int | None = None,
                    max_restarts: int | None = None) -> int:
    """Run `argv` until `stop` is set, restarting it when it exits. Returns 0 on a stop, or
    the last exit code once `max_restarts` (None = no bound) restarts are used up."""
    delay, restarts = BACKOFF_FIRST, 0
    while True:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_preexec(limit))
        log.info("rpc.started", pid=proc.pid, argv=argv)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()
            if stop.is_set() or proc.returncode is None:
                await _stop_child(proc)
        if stop.is_set():
            log.info("rpc.stopped", pid=proc.pid)
            return 0
        rc = proc.returncode if proc.returncode is not None else -1
        ran = time.monotonic() - started
        delay = next_delay(delay, ran) if restarts else BACKOFF_FIRST
        if max_restarts is not None and restarts >= max_restarts:
            log.error("rpc.gave_up", exit_code=rc, restarts=restarts)
            return rc or 1
        restarts += 1
        log.warning("rpc.exited", exit_code=rc, ran_s=round(ran, 1), restart_in_s=delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return 0


def options_from(args: argparse.Namespace) -> Options:
    """Checked options; ValueError says what is wrong (0.0.0.0 without the flag included)."""
    from ..config import ConfigError, parse_size

    host = rpc.bind_address(args.host)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    if rpc.is_wildcard(host) and not args.allow_all_interfaces:
        raise ValueError("refusing --host 0.0.0.0: llama.cpp RPC is unauthenticated, anyone "
                         "who reaches the port can use this machine; give the address of a "
                         "trusted network's interface, or --allow-all-interfaces")
    mem = None
    if args.mem is not None:
        try:
            mem = parse_size(args.mem, "--mem")
        except ConfigError as e:
            raise ValueError(str(e)) from None
    return Options(host=host, port=args.port, threads=args.threads, cache=args.cache,
                   mem=mem, devices=args.device)


def run(args: argparse.Namespace) -> int:
    """The command: check, then supervise until SIGTERM/SIGINT."""
    from ..log import setup_logging

    setup_logging("info")
    try:
        opts = options_from(args)
    except ValueError as e:
        print(f"routerd rpc-worker: {e}", file=sys.stderr)
        return 2
    binary = rpc.find_rpc_server(args.rpc_server)
    if binary is None:
        print("routerd rpc-worker: no rpc-server binary (run `make install`, or --rpc-server "
              "PATH)", file=sys.stderr)
        return 2
    if rpc.is_wildcard(opts.host):
        log.warning("rpc.all_interfaces", host=opts.host, port=opts.port,
                    note="unauthenticated: reachable from every network this host is on")
    elif opts.host != "127.0.0.1":
        log.warning("rpc.listening_beyond_loopback", host=opts.host, port=opts.port,
                    note="unauthenticated: only on a trusted network")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await supervise(rpc_argv(binary, opts), stop, limit=data_limit(opts))

    return asyncio.run(main())
