"""One worker process: spawn, readiness, log capture, drain, SIGTERM → SIGKILL.

Each worker gets a free loopback port, its own process group, a random API key, and dies with
the daemon: PR_SET_PDEATHSIG on Linux plus a lifeline pipe whose write end only routerd holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import re
import resource
import secrets
import signal
import socket
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Callable

import aiohttp
import structlog

from ..errors import ModelFailed, RouterdError
from .backends import Argv
from .state import StateBox, WorkerState

log = structlog.get_logger(__name__)

ArgvBuilder = Callable[[str, int, str], Argv]  # (host, port, api_key) -> Argv
_OOM_RE = re.compile(r"out of memory|failed to allocate|bad_alloc|cudaMalloc failed|"
                     r"unable to allocate|cannot allocate memory", re.IGNORECASE)
_PR_SET_PDEATHSIG = 1
# A line an engine prints once it serves: llama-server "model loaded" / "listening on",
# llamafile "llama server listening at", routerd's engine "engine.listening". Seeing one
# probes /health at once; the slow fallback poll covers engines that print none of these.
_READY_HINT_RE = re.compile(r"listening|model loaded|running on|slots are idle", re.IGNORECASE)
_POLL_FIRST, _POLL_MAX = 0.005, 0.025
# While requests are in flight the engine's output pipes are not read (see Worker.begin):
# they are read when a request ends, and for a moment every _HOLD_MAX seconds.
_HOLD_MAX, _HOLD_GAP = 0.25, 0.005


class WorkerLoadError(ModelFailed):
    """The engine exited or never became healthy while loading."""

    def __init__(self, message: str, *, oom: bool = False, stderr: str = "") -> None:
        super().__init__(message)
        self.oom, self.stderr = oom, stderr


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_setup(data_limit: int | None = None) -> Callable[[], None]:
    """What a worker's child runs between fork and exec: it dies with its parent (PDEATHSIG),
    and exits at once if the parent died before that was set. The parent's pid is compared,
    not "is it 1": routerd may itself be PID 1 (a container without an init)."""
    parent = os.getpid()

    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except OSError:
                pass
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)
        if data_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))
    return setup


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Reports the exit itself. asyncio's `Process.wait()` only returns once every pipe is
    closed too, so a child the engine left behind (holding stdout) would hide its exit."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exit_code: asyncio.Future[int] = loop.create_future()

    def process_exited(self) -> None:
        transport = self._transport  # type: ignore[attr-defined]  # the base drops it
        code = transport.get_returncode() if transport else None
        super().process_exited()
        if not self.exit_code.done():
            self.exit_code.set_result(code if code is not None else -1)


class Worker:
    """A supervised engine process serving one model on 127.0.0.1:<port>."""

    def __init__(self, model: str, build: ArgvBuilder, session: aiohttp.ClientSession, *,
                 host: str = "127.0.0.1", log_lines: int = 1000,
                 on_exit: Callable[[Worker], None] | None = None,
                 on_spawn: Callable[[Worker], None] | None = None) -> None:
        self.model, self._build, self._session, self.host = model, build, session, host
        self.state: StateBox[WorkerState] = StateBox(WorkerState.STOPPED)
        # hex: a key starting with "-" would be taken for a flag by the engine's argv parser
        self.api_key = secrets.token_hex(24)
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._protocol: _ExitProtocol | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._exited = asyncio.get_running_loop().create_future()
        self._lifeline: int | None = None
        self._on_exit, self._on_spawn = on_exit, on_spawn
        self.inflight = 0
        self.progress = 0  # bumped per chunk relayed from this engine (liveness evidence)
        self._pipes: list[asyncio.BaseTransport] = []
        self._held = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._ready_hint = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.started_at = 0.0
        self.load_seconds = 0.0
        self.returncode: int | None = None
        self.failure: str | None = None
        self._key_file: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def ready(self) -> bool:
        return self.state.value is WorkerState.READY

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self._exited.done()

    def stderr_tail(self, n: int = 12) -> str:
        return "\n".join(list(self.lines)[-n:])

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float) -> None:
        """Spawn and wait until /health answers 200; raise WorkerLoadError otherwise."""
        if not self.state.swap(WorkerState.STOPPED, WorkerState.STARTING):
            raise RouterdError(f"worker for {self.model} is {self.state.value.value}")
        self.started_at = time.monotonic()
        try:
            await self._spawn()
            await self._wait_ready(timeout)
        except BaseException as e:
            self._remove_key_file()
            failure = e if isinstance(e, WorkerLoadError) else None
            if self.state.swap((WorkerState.STARTING,), WorkerState.FAILED):
                self.failure = failure.message if failure else f"load aborted: {e!r}"
            await self._kill_group()
            raise
        self.load_seconds = time.monotonic() - self.started_at
        self._remove_key_file()  # read at startup: no need to leave it on disk
        self.state.swap(WorkerState.STARTING, WorkerState.READY)
        log.info("worker.ready", model=self.model, pid=self.pid, port=self.port,
                 load_s=round(self.load_seconds, 3))

    async def _spawn(self) -> None:
        self.port = free_port(self.host)
        argv = self._build(self.host, self.port, self.api_key)
        read_end, self._lifeline = os.pipe()
        cmd = list(argv.argv)
        if argv.lifeline_flag:
            cmd += ["--lifeline-fd", str(read_end)]
        if argv.key_file_flag:
            cmd += [argv.key_file_flag, self._write_key_file()]
        # A worker must not talk to systemd as if it were routerd.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | argv.env
        loop = asyncio.get_running_loop()
        try:
            transport, self._protocol = await loop.subprocess_exec(
                lambda: _ExitProtocol(loop), *cmd, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=child_setup(), pass_fds=(read_end,), env=env)
            self.proc = asyncio.subprocess.Process(transport, self._protocol, loop)
            self._pipes = [p for p in map(transport.get_pipe_transport, (1, 2)) if p is not None]
        except OSError as e:
            raise WorkerLoadError(f"cannot start {cmd[0]}: {e.strerror or e}") from None
        finally:
            os.close(read_end)
        log.info("worker.spawned", model=self.model, pid=self.proc.pid, port=self.port,
                 argv0=cmd[0])
        if self._on_spawn:
            self._on_spawn(self)
        assert self.proc.stdout and self.proc.stderr
        self._tasks = [asyncio.create_task(self._read(self.proc.stdout, "stdout")),
                       asyncio.create_task(self._read(self.proc.stderr, "stderr")),
                       asyncio.create_task(self._monitor())]

    def _write_key_file(self) -> str:
        """The API key in a file only this user can read (mkstemp makes it 0600), for
        engines that take `--api-key-file`; removed once the engine has read it (ready)."""
        fd, path = tempfile.mkstemp(prefix="routerd-worker-", suffix=".key")
        with os.fdopen(fd, "w") as f:
            f.write(self.api_key + "\n")
        self._key_file = path
        return path

    def _remove_key_file(self) -> None:
        if self._key_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._key_file)
            self._key_file = None

    async def _wait_ready(self, timeout: float) -> None:
        """Probe /health when the engine says it serves (a log line, see _READY_HINT_RE),
        when it exits, or on a short backoff poll (5 ms doubling to 25 ms), whichever comes
        first: no coarse sleep between "listening" and the first request."""
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST
        url = f"{self.base_url}/health"
        hint: asyncio.Future[Any] | None = None
        try:
            while True:
                self._ready_hint.clear()
                if await self._probe_once(url, deadline, timeout):
                    return
                if hint is None or hint.done():
                    hint = asyncio.ensure_future(self._ready_hint.wait())
                waiters: set[asyncio.Future[Any]] = {self._exited, hint}
                left = deadline - time.monotonic()
                await asyncio.wait(waiters, timeout=min(delay, left),
                                   return_when=asyncio.FIRST_COMPLETED)
                delay = min(delay * 2, _POLL_MAX)
        finally:
            if hint is not None and not hint.done():
                hint.cancel()

    async def _probe_once(self, url: str, deadline: float, timeout: float) -> bool:
        """One readiness check: raise if the engine exited or the deadline passed."""
        if self._exited.done():
            await self._drain_readers()
            tail = self.stderr_tail()
            raise WorkerLoadError(
                f"model {self.model!r} failed to load: engine exited with code "
                f"{self.returncode}" + (f": {tail}" if tail else ""),
                oom=bool(_OOM_RE.search(tail)) or self.returncode == -signal.SIGKILL,
                stderr=tail)
        try:
            async with self._session.get(
                    url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        if deadline - time.monotonic() <= 0:
            raise WorkerLoadError(f"model {self.model!r} did not become ready within "
                                  f"{timeout:.0f}s; last output: {self.stderr_tail(5)}")
        return False

    async def stop(self, *, drain: float = 30.0, kill_after: float = 10.0,
                   on_drained: Callable[[], object] | None = None) -> None:
        """Drain in-flight requests (bounded), SIGTERM the group, SIGKILL after a timeout.
        `on_drained` is called once the drain is over, before the SIGTERM."""
        moved = self.state.swap((WorkerState.READY, WorkerState.STARTING), WorkerState.STOPPING)
        if moved and self.inflight:
            log.info("worker.draining", model=self.model, inflight=self.inflight)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain)
        if on_drained is not None:
            on_drained()
        if self.alive:
            self._signal_group(signal.SIGTERM)
            done, _ = await asyncio.wait({self._exited}, timeout=kill_after)
            if not done:
                log.warning("worker.kill", model=self.model, pid=self.pid,
                            reason=f"no exit {kill_after}s after SIGTERM")
        await self._kill_group()
        self.state.swap(WorkerState.STOPPING, WorkerState.STOPPED)
        log.info("worker.stopped", model=self.model, pid=self.pid, code=self.returncode)

    def kill_now(self) -> None:
        """SIGKILL the whole group at once, without waiting (the daemon's forced exit)."""
        self._signal_group(signal.SIGKILL)

    async def kill(self) -> None:
        """Immediate SIGKILL of the whole group (hung worker, forced shutdown)."""
        self.state.swap((WorkerState.READY, WorkerState.STARTING, WorkerState.STOPPING),
                        WorkerState.FAILED)
        await self._kill_group()

    async def _kill_group(self) -> None:
        self._signal_group(signal.SIGKILL)  # also reaps children the leader left behind
        if self.proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), 10)
        await self._drain_readers()
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None

    def _signal_group(self, sig: int, *, sweep: bool = False) -> None:
        """Signal the engine's process group. Once the exit is seen and the group swept, the
        pid may be reused: leave it alone."""
        if self.proc is None or (self._exited.done() and not sweep):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _drain_readers(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2)
            for t in pending:
                t.cancel()

    async def _monitor(self) -> None:
        assert self.proc is not None and self._protocol is not None
        self.returncode = await self._protocol.exit_code
        self._release_output()  # the last lines (the crash reason) are read now
        # Whatever the engine left in its group goes with it (and lets go of the pipes).
        self._signal_group(signal.SIGKILL, sweep=True)
        await self._drain_readers_except_monitor()
        if not self._exited.done():
            self._exited.set_result(self.returncode)
        if self.state.swap(WorkerState.READY, WorkerState.FAILED):
            self.failure = (f"engine exited with code {self.returncode}: "
                            f"{self.stderr_tail(5)}")
            log.warning("worker.crashed", model=self.model, pid=self.proc.pid,
                        code=self.returncode, tail=self.stderr_tail(5))
        for q in self._subscribers:
            q.put_nowait(None)
        if self._on_exit:
            self._on_exit(self)

    async def _drain_readers_except_monitor(self) -> None:
        readers = [t for t in self._tasks[:2] if not t.done()]
        if readers:
            await asyncio.wait(readers, timeout=1)

    async def _read(self, stream: asyncio.StreamReader, name: str) -> None:
        bound = log.bind(model=self.model, stream=name)
        while True:
            try:
                raw = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):  # an over-long line
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self.state.value is WorkerState.STARTING and _READY_HINT_RE.search(line):
                self._ready_hint.set()
            for q in self._subscribers:
                if q.qsize() < 1000:
                    q.put_nowait(line)
            bound.debug("worker.output", line=line)

    # ------------------------------------------------------------------ requests

    def begin(self) -> None:
        """Count an in-flight request (drain waits for these); paired with `end`.

        While requests are in flight, routerd does not read the engine's stdout/stderr pipes
        as each line comes: the lines wait in the pipe and are read when a request ends, and
        every 0.25 s for a moment while requests stay in flight (so a long stream's logs stay
        near-live and a chatty engine never fills its pipe). llama-server prints about nine
        lines per request; reading each one as it came woke routerd mid-request, on cores
        the engine's threads were using (bench A/B: 0.3 to 2.7 ms per warm request)."""
        self.inflight += 1
        self._idle.clear()
        if self.inflight == 1:
            self._hold_output()

    def end(self) -> None:
        self.inflight -= 1
        self._release_output()
        if self.inflight == 0:
            self._idle.set()
        else:  # others still in flight: read what waits, then hold again
            self._hold_timer = asyncio.get_running_loop().call_later(_HOLD_GAP,
                                                                     self._hold_again)

    def _hold_output(self) -> None:
        if self._held or not self._pipes or self._exited.done():
            return
        for pipe in self._pipes:
            if not pipe.is_closing():
                pipe.pause_reading()  # type: ignore[attr-defined]
        self._held = True
        self._hold_timer = asyncio.get_running_loop().call_later(_HOLD_MAX, self._read_held)

    def _release_output(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if not self._held:
            return
        self._held = False
        for pipe in self._pipes:
            if not pipe.is_closing():
                pipe.resume_reading()  # type: ignore[attr-defined]

    def _read_held(self) -> None:
        self._hold_timer = None
        self._release_output()
        if self.inflight:
            self._hold_timer = asyncio.get_running_loop().call_later(_HOLD_GAP,
                                                                     self._hold_again)

    def _hold_again(self) -> None:
        self._hold_timer = None
        if self.inflight:
            self._hold_output()

    async def follow(self) -> AsyncIterator[str]:
        """The ring buffer, then live lines until the process exits."""
        q: asyncio.Queue[str | None] = asyncio.Queue()
        backlog = list(self.lines)
        self._subscribers.add(q)
        try:
            for line in backlog:
                yield line
            if self._exited.done():
                return
            while (live := await q.get()) is not None:
                yield live
        finally:
            self._subscribers.discard(q)

    async def exited(self) -> int:
        return await asyncio.shield(self._exited)
