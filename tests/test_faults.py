"""Worker faults through a real daemon: killed mid-stream on every dialect, failures before the
first byte, hung workers, crash loops, SIGTERM-deaf workers, clients that leave.

Fake workers (tests/fakes) do what an engine will not do on demand; the SIGKILL and
client-leaves cases also run against a real llama-server. Each test prints `RECOVERY ...`
lines with the measured times (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.conftest import MODEL, Daemon, fake_model

pytestmark = pytest.mark.timeout(120)

FAST = {"probe_interval": "0.5s", "probe_timeout": "0.5s", "request_idle": "2s", "stop": "1s",
        "drain": "10s", "load": "60s"}
USER = [{"role": "user", "content": "Tell me a story."}]
# a real engine on a shared 2-core machine can pause for seconds: no idle timeout, no prober
REAL_TIMEOUTS = {"request_idle": "60s", "probe_interval": "60s", "probe_timeout": "30s"}
LONG = 1000  # tokens a real engine is asked for: far more than a test waits for


def report(what: str, **values: Any) -> None:
    print("RECOVERY", what, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in values.items()), flush=True)


def first_start_only(marker: Path, *flags: str, **extra: Any) -> dict[str, Any]:
    """A fake model whose first worker runs with `flags` and every later one without."""
    entry = fake_model(**extra)
    script = (f'if mkdir "$0" 2>/dev/null; then exec "$@" {shlex.join(flags)}; '
              'else exec "$@"; fi')
    entry["command"] = ["sh", "-c", script, str(marker), *entry["command"]]
    return entry


def real_model(**extra: Any) -> dict[str, Any]:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} missing: run `make install`")
    entry = {"model": str(MODEL), "backend": "llama-server", "ctx_size": 4096, "parallel": 2,
             **extra}
    if entry["backend"] == "llama-server":
        # One thread: on a shared, busy 2-core machine two threads meeting at every barrier
        # make a token take seconds, and llama-server notices a client gone only per token.
        entry["args"] = ["-t", "1"]
    return entry


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def start(models: dict[str, Any], *, timeouts: dict[str, str] | None = None,
              port: int | None = None, env: dict[str, str] | None = None,
              **extra: Any) -> Daemon:
        config = {"keep_alive": "10m", "timeouts": {**FAST, **(timeouts or {})},
                  "models": models, **extra}
        d = Daemon(config, tmp_path / f"daemon{len(made)}", port=port, env=env)
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


def log_events(d: Daemon, event: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            obj = json.loads(line)
            if obj.get("event") == event:
                out.append(obj)
    return out


def stamp(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


async def ps(http: aiohttp.ClientSession, d: Daemon) -> dict[str, Any]:
    async with http.get(d.base_url + "/api/ps") as r:
        return await r.json()


async def pid_of(http: aiohttp.ClientSession, d: Daemon, model: str) -> int:
    models = {m["name"]: m for m in (await ps(http, d))["models"]}
    return int(models[model]["routerd"]["pid"])


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll `check` (sync or async) until truthy; the seconds it took."""
    t0 = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- dialects

DIALECTS: dict[str, tuple[str, Callable[[str, int | None], dict[str, Any]]]] = {
    # n: tokens to ask a real engine for (None: the fake's own length)
    "ollama-chat": ("/api/chat", lambda m, n: {
        "model": m, "messages": USER, "stream": True,
        **({"options": {"num_predict": n}} if n else {})}),
    "ollama-generate": ("/api/generate", lambda m, n: {
        "model": m, "prompt": "1, 2, 3, 4, 5," if n else "hi", "stream": True,
        **({"raw": True, "options": {"num_predict": n}} if n else {})}),
    "openai": ("/v1/chat/completions", lambda m, n: {
        "model": m, "messages": USER, "stream": True,
        **({"max_tokens": n, "ignore_eos": True} if n else {})}),
    "native": ("/completion", lambda m, n: {
        "model": m, "prompt": "Once upon a time", "stream": True,
        **({"n_predict": n, "ignore_eos": True} if n else {})}),
}


def parse(dialect: str, raw: bytes) -> Any:
    raw = raw.strip()
    if dialect.startswith("ollama"):
        return json.loads(raw) if raw else None
    if not raw.startswith(b"data:"):
        return None
    data = raw[5:].strip()
    return "[DONE]" if data == b"[DONE]" else json.loads(data)


def is_error(obj: Any) -> bool:
    return isinstance(obj, dict) and "error" in obj


def is_final(dialect: str, obj: Any) -> bool:
    if dialect.startswith("ollama"):
        return isinstance(obj, dict) and obj.get("done") is True
    if dialect == "openai":
        return obj == "[DONE]"
    return isinstance(obj, dict) and obj.get("stop") is True


def has_text(obj: Any) -> bool:
    if not isinstance(obj, dict) or obj.get("done") or obj.get("stop"):
        return False
    if "message" in obj:
        return bool(obj["message"].get("content"))
    if "response" in obj:
        return bool(obj["response"])
    if "choices" in obj:
        return any(c.get("delta", {}).get("content") for c in obj["choices"])
    return bool(obj.get("content"))


class Stream:
    """One streaming request read line by line, with every parsed event kept."""

    def __init__(self, http: aiohttp.ClientSession, d: Daemon, dialect: str, model: str, *,
                 n: int | None = None) -> None:
        path, body = DIALECTS[dialect]
        self.dialect, self.events = dialect, []  # type: ignore[var-annotated]
        self._cm = http.post(d.base_url + path, json=body(model, n))
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> Stream:
        self.resp = await self._cm.__aenter__()
        assert self.resp.status == 200, await self.resp.text()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._cm.__aexit__(*exc)

    async def until_text(self, n: int = 3, timeout: float = 30) -> None:
        assert self.resp is not None
        async with asyncio.timeout(timeout):
            while sum(map(has_text, self.events)) < n:
                line = await self.resp.content.readline()
                assert line, f"stream ended early: {self.events[-3:]}"
                if (obj := parse(self.dialect, line)) is not None:
                    self.events.append(obj)

    async def rest(self, timeout: float = 10) -> list[Any]:
        assert self.resp is not None
        async with asyncio.timeout(timeout):
            async for line in self.resp.content:
                if (obj := parse(self.dialect, line)) is not None:
                    self.events.append(obj)
        return self.events


async def full_stream(http: aiohttp.ClientSession, d: Daemon, dialect: str, model: str, *,
                      n: int | None = None) -> list[Any]:
    async with Stream(http, d, dialect, model, n=n) as s:
        return await s.rest(timeout=60)


# ---------------------------------------------------------------- killed mid-stream


async def kill_mid_stream(http: aiohttp.ClientSession, d: Daemon, dialect: str, model: str,
                          *, real: bool = False) -> None:
    async with Stream(http, d, dialect, model, n=LONG if real else None) as s:
        await s.until_text(3)
        pid = await pid_of(http, d, model)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        events = await s.rest(timeout=10)
        ended = time.monotonic() - t0
    assert is_error(events[-1]), events[-3:]
    assert not any(is_final(dialect, e) for e in events), events[-3:]
    assert ended < 3, ended
    t1 = time.monotonic()
    async with Stream(http, d, dialect, model, n=8 if real else None) as s:
        await s.until_text(1)
        first_token = time.monotonic() - t1  # the model was loaded again
        again = await s.rest(timeout=60)
    assert is_final(dialect, again[-1]) and not any(map(is_error, again)), again[-3:]
    assert await pid_of(http, d, model) != pid
    report(f"sigkill-mid-stream {dialect}{' real' if real else ''}", stream_end_s=ended,
           next_first_token_s=first_token)


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_worker_sigkill_mid_stream(daemons: Callable[..., Daemon],
                                         http: aiohttp.ClientSession, dialect: str) -> None:
    d = daemons({"fake": fake_model("--tokens", "100", "--token-delay", "0.02")})
    await kill_mid_stream(http, d, dialect, "fake")


@pytest.mark.engine
@pytest.mark.parametrize("dialect", ["ollama-generate", "openai", "native"])
async def test_real_worker_sigkill_mid_stream(daemons: Callable[..., Daemon],
                                              http: aiohttp.ClientSession, dialect: str) -> None:
    d = daemons({"smol": real_model()}, timeouts=REAL_TIMEOUTS)
    await kill_mid_stream(http, d, dialect, "smol", real=True)


# ---------------------------------------------------------------- before the first byte


async def test_failure_before_first_byte_retried_on_fresh_worker(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession, tmp_path: Path) -> None:
    # the first worker dies on its first token: before any byte of the answer
    d = daemons({"flaky": first_start_only(tmp_path / "started", "--crash-at-token", "0")})
    t0 = time.monotonic()
    async with http.post(d.base_url + "/api/chat",
                         json={"model": "flaky", "messages": USER, "stream": False}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["done"] is True
    took = time.monotonic() - t0
    spawns = log_events(d, "worker.spawned")
    assert len(spawns) == 2, spawns
    assert log_events(d, "request.retry")
    report("retry-before-first-byte non-stream", answered_s=took, spawns=len(spawns))


async def test_stream_broken_before_first_chunk_retried(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession, tmp_path: Path) -> None:
    # llama.cpp's native stream sends its headers, then dies before the first token (as a
    # crash in prompt processing does): nothing reached the client, so it is retried
    d = daemons({"flaky": first_start_only(tmp_path / "started", "--crash-at-token", "0")})
    t0 = time.monotonic()
    events = await full_stream(http, d, "native", "flaky")
    took = time.monotonic() - t0
    assert is_final("native", events[-1]) and not any(map(is_error, events)), events[-3:]
    assert len(log_events(d, "worker.spawned")) == 2
    report("retry-before-first-byte native-stream", answered_s=took)


async def test_retried_only_once(daemons: Callable[..., Daemon],
                                 http: aiohttp.ClientSession) -> None:
    d = daemons({"doomed": fake_model("--crash-at-token", "0")})
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "doomed", "prompt": "hi", "stream": False}) as r:
        assert r.status == 502, await r.text()
        assert "error" in await r.json()
    # two attempts, each on a fresh worker that died of it; no third
    assert len(log_events(d, "request.retry")) == 1
    await wait_for(lambda: len(log_events(d, "worker.crashed")) == 2, 5, "both attempts seen")


async def test_an_engine_that_says_busy_is_a_503_with_its_retry_after(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession) -> None:
    # a peer's full queue (or llama-server still loading) is "retry later", not a bad gateway
    d = daemons({"busy": fake_model("--busy-requests")})
    for path, body in (("/api/generate", {"model": "busy", "prompt": "hi", "stream": False}),
                       ("/v1/chat/completions", {"model": "busy", "messages": [
                           {"role": "user", "content": "hi"}]})):
        async with http.post(d.base_url + path, json=body) as r:
            assert r.status == 503, await r.text()
            assert r.headers["Retry-After"] == "7"
            assert "all slots busy" in await r.text()
    assert not log_events(d, "worker.crashed")


# ---------------------------------------------------------------- hung workers


async def test_hung_worker_detected_and_replaced(daemons: Callable[..., Daemon],
                                                 http: aiohttp.ClientSession,
                                                 tmp_path: Path) -> None:
    hang_after = 1.0
    d = daemons({"hangs": first_start_only(tmp_path / "started", "--hang-after-ready",
                                            str(hang_after), "--tokens", "400",
                                            "--token-delay", "0.02")})
    async with Stream(http, d, "ollama-chat", "hangs") as s:
        await s.until_text(3)
        pid = await pid_of(http, d, "hangs")
        events = await s.rest(timeout=10)  # the stream stops with the hang; the prober kills
    assert is_error(events[-1]), events[-3:]
    await wait_for(lambda: pid_gone(pid), 5, "hung worker killed")
    hang_start = stamp(log_events(d, "worker.ready")[0]) + hang_after
    hung = log_events(d, "worker.hung")
    assert hung, d.log()
    detected = stamp(hung[0]) - hang_start
    assert detected < 0.5 + 0.5 + 1.0, detected  # probe interval + timeout + slack
    # replaced without waiting for a request (after the first backoff step, 0.5 s)
    await wait_for(lambda: len(log_events(d, "worker.ready")) == 2, 10, "replacement ready")
    replaced = stamp(log_events(d, "worker.ready")[1]) - hang_start
    assert replaced < 0.5 + 0.5 + 0.5 + 3.0, replaced
    t1 = time.monotonic()
    again = await full_stream(http, d, "ollama-chat", "hangs")
    assert again[-1].get("done") is True
    assert len(log_events(d, "worker.spawned")) == 2
    report("hung-after-ready", detected_after_hang_s=detected, replacement_ready_s=replaced,
           next_answer_s=time.monotonic() - t1)


async def test_requests_hang_behind_healthy_health(daemons: Callable[..., Daemon],
                                                   http: aiohttp.ClientSession,
                                                   tmp_path: Path) -> None:
    d = daemons({"deaf": first_start_only(tmp_path / "started", "--hang-requests")})
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "deaf", "prompt": ""}) as r:  # load only
        assert r.status == 200
    pid = await pid_of(http, d, "deaf")
    t0 = time.monotonic()
    async with http.post(d.base_url + "/api/chat",
                         json={"model": "deaf", "messages": USER, "stream": False}) as r:
        assert r.status == 502
        body = await r.json()
    failed_after = time.monotonic() - t0
    assert "did not answer in time" in body["error"]
    assert failed_after < 2 + 2, failed_after  # request_idle + slack
    await wait_for(lambda: pid_gone(pid), 3, "deaf worker killed")
    events = await full_stream(http, d, "ollama-chat", "deaf")
    assert events[-1].get("done") is True
    assert await pid_of(http, d, "deaf") != pid
    report("hang-requests", failed_after_s=failed_after)


# ---------------------------------------------------------------- crash loops


async def _request_failures(http: aiohttp.ClientSession, d: Daemon, model: str,
                            n: int) -> list[tuple[float, int, str]]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        async with http.post(d.base_url + "/api/generate",
                             json={"model": model, "prompt": "hi"}) as r:
            text = await r.text()
        out.append((time.monotonic() - t0, r.status, text))
    return out


def _backoff_gaps(d: Daemon) -> list[float]:
    spawns = [stamp(e) for e in log_events(d, "worker.spawned")]
    failures = [stamp(e) for e in log_events(d, "worker.failure")]
    # from each failure to the next spawn
    return [round(s - f, 3) for f, s in zip(failures, spawns[1:])]


async def test_crash_loop_on_start(daemons: Callable[..., Daemon],
                                   http: aiohttp.ClientSession) -> None:
    oom = "failed to allocate buffer: out of memory"
    d = daemons({"crashy": fake_model("--exit-on-start", "1", "--stderr", oom)})
    results = await _request_failures(http, d, "crashy", 3)
    assert all(status == 503 and oom in text for _, status, text in results), results
    # now marked failed: the reason at once, no new spawn, many times over
    burst = await asyncio.gather(*(_request_failures(http, d, "crashy", 5) for _ in range(8)))
    fast = [r for batch in burst for r in batch]
    assert all(status == 503 and oom in text and "failing" in text for _, status, text in fast)
    slowest = max(t for t, _, _ in fast)
    assert slowest < 1.0, slowest
    spawns = log_events(d, "worker.spawned")
    assert len(spawns) == 3, len(spawns)  # no busy loop
    gaps = _backoff_gaps(d)
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[1] > gaps[0], gaps
    failed = (await ps(http, d))["routerd"]["failed"]
    assert failed and failed[0]["name"] == "crashy" and oom in failed[0]["reason"]
    report("crash-loop on-start", backoff_gaps_s=gaps, spawns=len(spawns),
           failed_answer_max_s=slowest)


async def test_crash_loop_mid_stream(daemons: Callable[..., Daemon],
                                     http: aiohttp.ClientSession) -> None:
    d = daemons({"crashy": fake_model("--crash-at-token", "2", "--token-delay", "0.01")})
    for _ in range(3):  # each stream starts, then its worker dies
        events = await full_stream(http, d, "ollama-generate", "crashy")
        assert is_error(events[-1]), events[-3:]
    t0 = time.monotonic()
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "crashy", "prompt": "hi"}) as r:
        assert r.status == 503
        text = await r.text()
    assert time.monotonic() - t0 < 1.0
    assert "crashing as asked" in text
    failed = (await ps(http, d))["routerd"]["failed"]
    assert "crashing as asked" in failed[0]["reason"]
    assert len(log_events(d, "worker.spawned")) == 3
    report("crash-loop mid-stream", backoff_gaps_s=_backoff_gaps(d))


# ---------------------------------------------------------------- stop escalation


async def test_sigterm_deaf_worker_is_killed_after_stop_timeout(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession) -> None:
    d = daemons({"deaf": fake_model("--ignore-sigterm")}, timeouts={"stop": "1s"})
    async with http.post(d.base_url + "/api/generate", json={"model": "deaf"}) as r:
        assert r.status == 200
    pid = await pid_of(http, d, "deaf")
    t0 = time.monotonic()
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "deaf", "keep_alive": 0}) as r:
        assert r.status == 200 and (await r.json())["done_reason"] == "unload"
    took = time.monotonic() - t0
    assert pid_gone(pid)
    assert 1.0 <= took < 3, took
    kills = log_events(d, "worker.kill")
    assert kills and kills[0]["pid"] == pid
    assert (await ps(http, d))["models"] == []
    report("ignore-sigterm unload", took_s=took)


# ---------------------------------------------------------------- clients that leave


async def slots_busy(http: aiohttp.ClientSession, d: Daemon, model: str) -> bool:
    async with http.get(f"{d.base_url}/upstream/{model}/slots") as r:
        assert r.status == 200, await r.text()
        return any(s.get("is_processing") for s in await r.json())


async def client_leaves(http: aiohttp.ClientSession, d: Daemon, dialect: str, model: str, *,
                        real: bool) -> float:
    async with Stream(http, d, dialect, model, n=LONG if real else None) as s:
        await s.until_text(3)
        assert await slots_busy(http, d, model)
        assert s.resp is not None
        s.resp.close()  # the client hangs up mid-stream

    async def idle() -> bool:
        return not await slots_busy(http, d, model)

    took = await wait_for(idle, 2, "engine stopped generating")
    report(f"client-leaves {dialect}{' real' if real else ''}", engine_idle_after_s=took)
    # and the model keeps serving
    async with http.post(d.base_url + "/completion",
                         json={"model": model, "prompt": "Hi", "n_predict": 4}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["stop"] is True
    return took


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count >= n)


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_client_leaves_fake(daemons: Callable[..., Daemon], http: aiohttp.ClientSession,
                                  dialect: str) -> None:
    d = daemons({"fake": fake_model("--tokens", "2000", "--token-delay", "0.01", parallel=2)})
    await client_leaves(http, d, dialect, "fake", real=False)

    async def posts() -> int:  # the worker's output is read a moment after a request ends
        async with http.get(d.base_url + "/api/logs", params={"model": "fake"}) as r:
            return (await r.text()).count("request POST")

    await wait_for(lambda: _at_least(posts(), 2), 5, "both requests in the worker's log")
    assert await posts() == 2  # the one that was left (never re-sent), the next


@pytest.mark.engine
@pytest.mark.parametrize("dialect", ["native", "ollama-generate"])
async def test_client_leaves_real(daemons: Callable[..., Daemon], http: aiohttp.ClientSession,
                                  dialect: str) -> None:
    d = daemons({"smol": real_model()}, timeouts=REAL_TIMEOUTS)
    await client_leaves(http, d, dialect, "smol", real=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
