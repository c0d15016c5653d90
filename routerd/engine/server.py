"""routerd's own engine worker: an aiohttp server speaking llama-server's HTTP API over
one `llama_cpp.Llama`.

Lifecycle: bind the port first (`/health` answers 503 "loading model"), load the model in
a thread, then answer 200. A load failure is logged with its reason and the process exits
1. SIGTERM/SIGINT stop it cleanly (exit 0; a second signal forces the exit). With
`--lifeline-fd`, EOF on that fd (the parent died) ends the process at once.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import structlog
from aiohttp import web

from routerd.engine import wire
from routerd.engine.handlers import ENGINE, ROUTES, EngineState
from routerd.engine.options import EngineOptions, parse_args
from routerd.engine.runner import ModelRunner
from routerd.errors import RouterdError, Unauthorized

if TYPE_CHECKING:
    from routerd.engine.llm import EngineLlama

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTDOWN_GRACE_S = 5.0
UNLOGGED_PATHS = frozenset({"/health", "/v1/health", "/slots"})


def _authorized(request: web.Request, key: bytes) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
        return True
    alt = request.headers.get("X-Api-Key")
    return alt is not None and hmac.compare_digest(alt.encode(), key)


def make_app(state: EngineState) -> web.Application:
    key = state.opts.api_key.encode() if state.opts.api_key else None

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            status = 499
            raise
        except web.HTTPException as exc:  # the router's 404/405, in llama-server's shape
            status = exc.status
            body = {"error": {"code": exc.status, "message": exc.reason,
                              "type": "not_found_error" if exc.status == 404
                              else "invalid_request_error"}}
            return web.json_response(body, status=exc.status)
        except Exception as exc:  # rendered like llama-server; unexpected ones logged
            err = wire.as_routerd_error(exc)
            status = err.status
            if status >= 500:
                log.error("engine.request_failed", path=request.path, error=err.message)
            return web.json_response(wire.error_body(err), status=err.status,
                                     headers=err.headers)
        finally:
            if request.path not in UNLOGGED_PATHS:
                log.info("engine.request", method=request.method, path=request.path,
                         status=status, ms=round((time.perf_counter() - started) * 1000, 1))

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if key is not None and request.path not in ("/health", "/v1/health"):
            if not _authorized(request, key):
                raise Unauthorized("Invalid API Key")
        return await handler(request)

    app = web.Application(middlewares=[errors, auth], client_max_size=64 * 1024 * 1024)
    app[ENGINE] = state
    app.add_routes(ROUTES)
    return app


def _watch_lifeline(fd: int) -> None:
    """EOF on `fd` means routerd died: leave at once, whatever is running."""

    def run() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                log.warning("engine.lifeline_closed", fd=fd)
                os._exit(1)

    threading.Thread(target=run, name="engine-lifeline", daemon=True).start()


def _load_in_thread(opts: EngineOptions,
                    loop: asyncio.AbstractEventLoop) -> asyncio.Future[EngineLlama]:
    """Load in a daemon thread (a SIGTERM during a long load must not wait for it)."""
    future: asyncio.Future[EngineLlama] = loop.create_future()

    def settle(value: EngineLlama | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        value, error = None, None
        try:
            from routerd.engine.llm import load_llama
            value = load_llama(opts)
        except BaseException as exc:  # reported by serve(), which exits 1
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop is gone: shutting down

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return future


def _install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("engine.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("engine.stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def _wait_loaded(state: EngineState, stop: asyncio.Event) -> bool:
    """True once the model serves; False when stopped first or the load failed."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    loading = _load_in_thread(state.opts, loop)
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not loading.done():
        return False
    error = loading.exception()
    if error is not None:
        log.error("engine.load_failed", model=state.opts.model,
                  reason=f"{type(error).__name__}: {error}")
        return False
    llm = loading.result()
    state.info = llm.info(state.opts.pooling)
    state.runner = ModelRunner(llm, state.opts.parallel)
    log.info("engine.ready", model=state.opts.model_name, n_ctx=state.info.n_ctx,
             slots=state.opts.parallel, seconds=round(time.perf_counter() - started, 2))
    return True


async def serve(opts: EngineOptions) -> int:
    """Run until SIGTERM (0) or a failed bind/load (1)."""
    state = EngineState(opts)
    runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, opts.host, opts.port).start()
    except OSError as exc:
        log.error("engine.bind_failed", host=opts.host, port=opts.port, reason=str(exc))
        await runner.cleanup()
        return 1
    log.info("engine.listening", host=opts.host, port=opts.port, model=opts.model)
    stop = asyncio.Event()
    _install_signals(asyncio.get_running_loop(), stop)
    loaded = await _wait_loaded(state, stop)
    if loaded:
        await stop.wait()
    if state.runner is not None:  # cancel running generations before draining handlers
        close = asyncio.ensure_future(state.runner.close(SHUTDOWN_GRACE_S))
    await runner.cleanup()
    if state.runner is not None:
        if await close:
            state.runner.model.close()
        else:
            log.warning("engine.model_busy_at_exit")
    log.info("engine.stopped")
    return 0 if stop.is_set() else 1


def main(argv: Sequence[str] | None = None) -> int:
    from routerd.log import setup_logging

    opts, unknown = parse_args(argv)
    setup_logging()
    if unknown:
        log.warning("engine.unknown_args", args=unknown)
    if opts.lifeline_fd is not None:
        _watch_lifeline(opts.lifeline_fd)
    code = asyncio.run(serve(opts))
    if any(t.name == "engine-load" for t in threading.enumerate()):
        sys.stderr.flush()
        os._exit(code)  # a load still running in C cannot be joined or interrupted
    return code
