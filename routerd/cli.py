"""routerd's command line: serve | check-config | pull | list | ps | show | rm | cp | run | stop | logs
| rpc-worker."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import warnings
from typing import Any, Coroutine, Sequence

import structlog

from . import __version__
from .config import Config, ConfigError, load_config

log = structlog.get_logger("routerd")


def _load(path: str | None) -> Config:
    return load_config(path or os.environ.get("ROUTERD_CONFIG"))


# ------------------------------------------------------------------ serve


async def _serve(config: Config) -> int:
    from aiohttp import web

    from . import keys
    from .app import make_app
    from .reload import apply_reload
    from .sdnotify import notify
    from .tlsctx import ssl_context
    from .workers.registry import WorkerRegistry

    swept = WorkerRegistry(config.expand(config.state_dir) / "workers.json").sweep()
    if swept:
        log.warning("routerd.swept_orphans", count=swept)
    app = make_app(config)
    # keepalive_timeout bounds a connection that has not sent a whole request (a client
    # dribbling its headers) as well as an idle keep-alive one: aiohttp's default is 3630 s.
    runner = web.AppRunner(app, handler_cancellation=True,
                           shutdown_timeout=config.timeouts.drain, access_log=None,
                           keepalive_timeout=config.timeouts.client_idle)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config),
                       reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        log.error("routerd.bind_failed", host=config.host, port=config.port, error=str(e))
        await runner.cleanup()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("routerd.forced_exit", signal=sig.name)
            for r in list(app[keys.SCHEDULER].runners.values()):
                r.worker.kill_now()
            os._exit(1)
        log.info("routerd.stopping", signal=sig.name)
        stop.set()

    reloads: set[asyncio.Task[bool]] = set()  # owned here: the loop keeps only weak refs

    def on_hup() -> None:
        if stop.is_set():
            return
        task = loop.create_task(apply_reload(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    addresses = runner.addresses  # (host, port, ...) per bound socket
    port = addresses[0][1] if addresses else config.port
    log.info("routerd.listening", host=config.host, port=port, version=__version__,
             loop=type(loop).__module__.split(".")[0])
    notify("READY=1")
    await stop.wait()
    notify("STOPPING=1")
    await site.stop()  # stop accepting; requests in flight go on
    # Drain in-flight requests (bounded by timeouts.drain), then stop the workers: a stream
    # still running at the deadline ends with an in-band error, not a silent cut.
    await app[keys.SCHEDULER].close(config.timeouts.drain)
    await runner.cleanup()  # close idle connections, let the handlers finish, clean up
    log.info("routerd.stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .log import setup_logging

    try:
        config = _load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.host:
        config = replace(config, host=args.host)
    if args.port is not None:
        config = replace(config, port=args.port)
    setup_logging(config.log_level)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="aiohttp")
    return run_loop(_serve(config))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (a dependency on Linux and macOS: about 7 % more
    requests/s and less CPU per relayed token, see docs/performance.md); the standard loop
    otherwise, or when ROUTERD_LOOP=asyncio asks for it."""
    if os.environ.get("ROUTERD_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return int(uvloop.run(main))
    return asyncio.run(main)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    missing = [m.name for m in config.models.values()
               if m.backend != "command" and "/" in m.model and m.model.endswith(
                   (".gguf", ".llamafile")) and not os.path.exists(os.path.expanduser(m.model))]
    for name in missing:
        print(f"warning: models.{name}.model: file not found", file=sys.stderr)
    print(f"{args.path}: ok ({len(config.models)} models)")
    return 0


# ------------------------------------------------------------------ client commands


def _client(args: argparse.Namespace) -> int:
    from .client import api as client
    from .client import progress

    base = client.resolve_base()
    cmd = args.cmd
    if cmd == "pull":
        return asyncio.run(progress.run_pull(base, args.name, args.insecure))
    if cmd == "rm":
        return asyncio.run(progress.run_rm(base, args.name))
    if cmd == "cp":
        return asyncio.run(progress.run_cp(base, args.src, args.dst))
    if cmd == "list" and args.sources:
        return client.execute(_list_sources(base))
    if cmd == "list":
        return client.execute(client.list_models(base))
    if cmd == "ps":
        return client.execute(client.ps(base))
    if cmd == "show":
        return client.execute(client.show(base, args.name))
    if cmd == "run":
        prompt = " ".join(args.prompt) if args.prompt else None
        return client.execute(client.run(base, args.name, prompt))
    if cmd == "stop":
        return client.execute(client.stop(base, args.name))
    if cmd == "logs":
        return client.execute(client.logs(base, args.name, args.follow))
    raise AssertionError(cmd)


async def _list_sources(base: str) -> int:
    import aiohttp

    from .discovery import format_sources

    try:
        async with aiohttp.ClientSession() as s, s.get(f"{base}/api/tags") as r:
            data = await r.json(content_type=None)
    except aiohttp.ClientError as e:
        print(f"Error: could not reach routerd at {base}: {e}", file=sys.stderr)
        return 1
    print(format_sources(data.get("models", [])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routerd", description=__doc__)
    p.add_argument("--version", action="version", version=f"routerd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="YAML config (default: $ROUTERD_CONFIG)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    c = sub.add_parser("check-config", help="validate a config file without starting anything")
    c.add_argument("path")
    sp = sub.add_parser("pull", help="pull a model from a registry")
    sp.add_argument("name")
    sp.add_argument("--insecure", action="store_true", help="allow plain http")
    for name in ("rm", "show", "stop"):
        sub.add_parser(name).add_argument("name")
    cp = sub.add_parser("cp")
    cp.add_argument("src")
    cp.add_argument("dst")
    ls = sub.add_parser("list", aliases=["ls"])
    ls.add_argument("--sources", action="store_true", help="show where each model comes from")
    sub.add_parser("ps")
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("prompt", nargs="*")
    lg = sub.add_parser("logs")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    from .workers.rpcworker import add_arguments as rpc_worker_arguments
    rpc_worker_arguments(sub.add_parser("rpc-worker", help="run and supervise a llama.cpp "
                                        "rpc-server (README: Several hosts)"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "ls":
        args.cmd = "list"
    if args.cmd == "serve":
        return cmd_serve(args)
    if args.cmd == "check-config":
        return cmd_check_config(args)
    if args.cmd == "rpc-worker":
        from .workers.rpcworker import run as rpc_worker
        return rpc_worker(args)
    return _client(args)


if __name__ == "__main__":
    sys.exit(main())
