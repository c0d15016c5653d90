"""routerd's llama-cpp-python worker, as a real subprocess over the real model.

One worker is shared by the module; the lifeline and SIGTERM tests start their own.
The runner and wire tests at the end need neither llama_cpp nor the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

MODEL = Path(os.environ.get("ROUTERD_TEST_MODEL", Path.home() / ".cache/routerd/models/"
                            "SmolLM2-135M-Instruct.Q4_1.gguf")).expanduser()
REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD_TIMEOUT = 60.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)
MOON = [{"role": "user", "content": "Who was the first man on the moon?"}]

HAVE_ENGINE = importlib.util.find_spec("llama_cpp") is not None and MODEL.is_file()
engine = pytest.mark.engine
# `make test` builds llama_cpp and fetches the model: missing them is a failure, not a skip.
needs_model = pytest.mark.usefixtures("engine_installed")


@pytest.fixture
def engine_installed() -> None:
    assert HAVE_ENGINE, "llama_cpp or the SmolLM2 model missing: run `make install`"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    port: int
    stderr: Path
    health_seen: list[int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]


async def start_worker(tmp: Path, *extra: str, pass_fds: tuple[int, ...] = ()) -> Worker:
    port = free_port()
    stderr = tmp / f"engine-{port}.log"
    argv = [sys.executable, "-m", "routerd.engine", "--model", str(MODEL), "--host",
            "127.0.0.1", "--port", str(port), "--ctx-size", "4096", "--parallel", "2",
            "--n-gpu-layers", "-1", "--alias", "smol", "--api-key", KEY, *extra]
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=err, pass_fds=pass_fds)
    return Worker(proc, port, stderr, [])


async def wait_healthy(worker: Worker, session: aiohttp.ClientSession) -> None:
    """Poll /health until 200, recording every status seen (bounded)."""
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        if worker.proc.returncode is not None:
            pytest.fail(f"worker exited {worker.proc.returncode}: {worker.log()}")
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(worker.url + "/health") as r:
                worker.health_seen.append(r.status)
                if r.status == 200:
                    return
        await asyncio.sleep(0.01)
    pytest.fail(f"worker not healthy after {LOAD_TIMEOUT}s: {worker.log()}")


async def stop_worker(worker: Worker) -> int:
    if worker.proc.returncode is None:
        worker.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(worker.proc.wait(), 15)
        except asyncio.TimeoutError:
            worker.proc.kill()
    return await worker.proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(tmp_path_factory: pytest.TempPathFactory,
                 session: aiohttp.ClientSession) -> AsyncIterator[Worker]:
    w = await start_worker(tmp_path_factory.mktemp("engine"), "--embeddings")
    try:
        await wait_healthy(w, session)
        yield w
    finally:
        await stop_worker(w)


async def post(session: aiohttp.ClientSession, worker: Worker, path: str,
               body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(worker.url + path, json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: "):]


# -- lifecycle and metadata ------------------------------------------------------------


@engine
@needs_model
async def test_health_goes_from_loading_to_ok(worker: Worker,
                                              session: aiohttp.ClientSession) -> None:
    assert worker.health_seen[-1] == 200
    assert 503 in worker.health_seen, worker.health_seen
    assert worker.health_seen.index(503) < len(worker.health_seen) - 1
    async with session.get(worker.url + "/health") as r:
        assert await r.json() == {"status": "ok"}


@engine
@needs_model
async def test_requests_without_the_key_are_refused(worker: Worker,
                                                    session: aiohttp.ClientSession) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        async with session.get(worker.url + "/v1/models", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
    async with session.post(worker.url + "/completion", json={"prompt": "x"}) as r:
        assert r.status == 401


@engine
@needs_model
async def test_models_props_and_slots(worker: Worker, session: aiohttp.ClientSession) -> None:
    async with session.get(worker.url + "/v1/models", headers=AUTH) as r:
        models = await r.json()
    assert [m["id"] for m in models["data"]] == ["smol"]
    async with session.get(worker.url + "/props", headers=AUTH) as r:
        props = await r.json()
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert props["total_slots"] == 2
    assert props["model_path"] == str(MODEL)
    assert "im_start" in props["chat_template"]
    async with session.get(worker.url + "/slots", headers=AUTH) as r:
        slots = await r.json()
    assert [s["id"] for s in slots] == [0, 1]


# -- generation --------------------------------------------------------------------------


def assert_timings(timings: dict[str, Any]) -> None:
    assert timings["prompt_n"] >= 1 and timings["predicted_n"] >= 1
    assert timings["prompt_ms"] >= 0 and timings["predicted_ms"] >= 0


@engine
@needs_model
async def test_chat_completion(worker: Worker, session: aiohttp.ClientSession) -> None:
    out = await post(session, worker, "/v1/chat/completions",
                     {"model": "smol", "messages": MOON, "temperature": 0, "max_tokens": 24})
    assert out["object"] == "chat.completion" and out["model"] == "smol"
    assert "Armstrong" in out["choices"][0]["message"]["content"]
    assert out["usage"]["prompt_tokens"] > 10 and out["usage"]["completion_tokens"] <= 24
    assert_timings(out["timings"])


@engine
@needs_model
async def test_chat_completion_stream(worker: Worker, session: aiohttp.ClientSession) -> None:
    body = {"messages": MOON, "temperature": 0, "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}, "unknown_field": 1}
    async with session.post(worker.url + "/v1/chat/completions", json=body,
                            headers=AUTH) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = [e async for e in sse_events(r)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Armstrong" in text
    last_choice = [c for c in chunks if c["choices"]][-1]
    assert last_choice["choices"][0]["finish_reason"] in ("stop", "length")
    assert_timings(last_choice["timings"])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1


@engine
@needs_model
async def test_text_completion(worker: Worker, session: aiohttp.ClientSession) -> None:
    out = await post(session, worker, "/v1/completions",
                     {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8})
    assert out["object"] == "text_completion"
    assert "Paris" in out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] >= 1
    assert_timings(out["timings"])


@engine
@needs_model
async def test_native_completion(worker: Worker, session: aiohttp.ClientSession) -> None:
    out = await post(session, worker, "/completion",
                     {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})
    assert out["stop"] is True and "Paris" in out["content"]
    assert 1 <= out["tokens_predicted"] <= 8 and out["tokens_evaluated"] >= 5
    assert_timings(out["timings"])


@engine
@needs_model
async def test_native_completion_stream(worker: Worker,
                                        session: aiohttp.ClientSession) -> None:
    body = {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0,
            "stream": True}
    async with session.post(worker.url + "/completion", json=body, headers=AUTH) as r:
        assert r.status == 200
        objs = [json.loads(e) async for e in sse_events(r)]
    assert all(o["stop"] is False for o in objs[:-1])
    final = objs[-1]
    assert final["stop"] is True and final["tokens_predicted"] >= 1
    assert_timings(final["timings"])
    assert "Paris" in "".join(o["content"] for o in objs)


@engine
@needs_model
async def test_embeddings_have_the_models_width(worker: Worker,
                                                session: aiohttp.ClientSession) -> None:
    async with session.get(worker.url + "/v1/models", headers=AUTH) as r:
        n_embd = (await r.json())["data"][0]["meta"]["n_embd"]
    out = await post(session, worker, "/v1/embeddings", {"input": ["hello", "the moon"]})
    vectors = [d["embedding"] for d in out["data"]]
    assert len(vectors) == 2 and all(len(v) == n_embd for v in vectors)
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3  # normalised
    assert out["usage"]["prompt_tokens"] >= 2
    # generation still works after an embedding on the same context
    chat = await post(session, worker, "/v1/chat/completions",
                      {"messages": MOON, "temperature": 0, "max_tokens": 24})
    assert "Armstrong" in chat["choices"][0]["message"]["content"]


@engine
@needs_model
async def test_tokenize_detokenize_round_trip(worker: Worker,
                                              session: aiohttp.ClientSession) -> None:
    text = "Hello world, how are you?"
    tokens = (await post(session, worker, "/tokenize", {"content": text}))["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = await post(session, worker, "/detokenize", {"tokens": tokens})
    assert back["content"] == text


@engine
@needs_model
async def test_bad_requests_are_400(worker: Worker, session: aiohttp.ClientSession) -> None:
    for path, body in (("/v1/chat/completions", {"messages": "nope"}),
                       ("/completion", {"prompt": "x", "temperature": "hot"}),
                       ("/tokenize", {"content": 5})):
        async with session.post(worker.url + path, json=body, headers=AUTH) as r:
            assert r.status == 400, path
            assert "message" in (await r.json())["error"]


# -- concurrency and cancellation --------------------------------------------------------


async def slots_idle(session: aiohttp.ClientSession, worker: Worker, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with session.get(worker.url + "/slots", headers=AUTH) as r:
            if not any(s["is_processing"] for s in await r.json()):
                return True
        await asyncio.sleep(0.02)
    return False


@engine
@needs_model
async def test_disconnect_mid_stream_frees_the_model(worker: Worker,
                                                     session: aiohttp.ClientSession) -> None:
    # A long generation (end tokens banned): without cancellation it would run for
    # minutes on two cores, far beyond the 2 s bound.
    eog = (await post(session, worker, "/tokenize",
                      {"content": "<|im_end|><|endoftext|>"}))["tokens"]
    body = {"prompt": "Count: 1, 2, 3, 4,", "n_predict": 3000, "temperature": 0,
            "stream": True, "logit_bias": [[t, False] for t in eog]}
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as own:
        r = await own.post(worker.url + "/completion", json=body, headers=AUTH)
        assert r.status == 200
        got = 0
        async for _ in sse_events(r):
            got += 1
            if got == 3:
                break
        async with session.get(worker.url + "/slots", headers=AUTH) as s:
            assert (await s.json())[0]["is_processing"] is True
        r.close()  # drop the connection mid-stream
    assert await slots_idle(session, worker, within=2.0), "generation kept the model"
    out = await post(session, worker, "/v1/completions",
                     {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 4})
    assert out["choices"][0]["text"]


@engine
@needs_model
async def test_concurrent_requests_are_serialised(worker: Worker,
                                                  session: aiohttp.ClientSession) -> None:
    body = {"messages": MOON, "temperature": 0, "max_tokens": 16}
    outs = await asyncio.gather(*(post(session, worker, "/v1/chat/completions", body)
                                  for _ in range(3)))
    texts = {o["choices"][0]["message"]["content"] for o in outs}
    assert len(texts) == 1  # greedy, one model, no interleaving


# -- process lifecycle -------------------------------------------------------------------


@engine
@needs_model
async def test_lifeline_eof_kills_the_worker(tmp_path: Path,
                                             session: aiohttp.ClientSession) -> None:
    read_end, write_end = os.pipe()
    try:
        w = await start_worker(tmp_path, "--lifeline-fd", str(read_end), pass_fds=(read_end,))
    finally:
        os.close(read_end)
    try:
        await wait_healthy(w, session)
        os.close(write_end)
        write_end = -1
        code = await asyncio.wait_for(w.proc.wait(), 2.0)
        assert code == 1, w.log()
    finally:
        if write_end >= 0:
            os.close(write_end)
        await stop_worker(w)


@engine
@needs_model
async def test_sigterm_exits_zero(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    w = await start_worker(tmp_path)
    try:
        await wait_healthy(w, session)
        w.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(w.proc.wait(), 15)
        assert code == 0, w.log()
        assert "engine.stopped" in w.log()
    finally:
        await stop_worker(w)


@engine
@needs_model
async def test_load_failure_exits_nonzero(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "routerd.engine", "--model", str(bogus), "--port", str(port),
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert b"engine.load_failed" in err


# -- the runner and the wire format, without llama_cpp -------------------------------------

from routerd.engine import wire  # noqa: E402
from routerd.engine.runner import ModelRunner, RunnerClosed  # noqa: E402
from routerd.engine.stats import GenerationControl, TokenStats  # noqa: E402
from routerd.errors import BadRequest  # noqa: E402


class FakeModel:
    """Counts the 'tokens' a job produced, like a model would."""

    def __init__(self) -> None:
        self.produced = 0


def counting_job(limit: int) -> Any:
    def job(model: FakeModel, control: GenerationControl) -> Any:
        for i in range(limit):
            if not control.on_token(False):
                return
            model.produced += 1
            yield {"i": i}
    return job


async def test_runner_streams_everything_with_back_pressure() -> None:
    runner = ModelRunner(FakeModel(), slots=2)
    items = [item async for item in runner.stream(counting_job(500))]  # > channel capacity
    assert [i["i"] for i in items] == list(range(500))
    assert not runner.busy


async def test_runner_stops_the_job_when_the_reader_leaves() -> None:
    model = FakeModel()
    runner = ModelRunner(model, slots=2)
    async with contextlib.aclosing(runner.stream(counting_job(10**9))) as items:
        async for item in items:
            if item["i"] == 3:
                break
    assert await runner.close(timeout=2.0) is True  # the model came back
    assert model.produced < 10**6
    with pytest.raises(RunnerClosed):
        await runner.call(counting_job(1))


async def test_runner_serialises_jobs_and_reports_slots() -> None:
    runner = ModelRunner(FakeModel(), slots=2)
    first = runner.stream(counting_job(10**9))
    assert (await anext(first))["i"] == 0
    waiting = asyncio.ensure_future(runner.call(counting_job(1)))
    await asyncio.sleep(0)  # let it queue on the lock
    assert runner.slot_states() == [True, True]
    assert not waiting.done()
    await first.aclose()
    assert await asyncio.wait_for(waiting, 2.0) == {"i": 0}
    assert runner.slot_states() == [False, False]


async def test_runner_reports_job_errors() -> None:
    def failing(model: FakeModel, control: GenerationControl) -> Any:
        raise ValueError("Requested tokens (9000) exceed context window of 4096")
        yield  # pragma: no cover

    runner = ModelRunner(FakeModel(), slots=1)
    with pytest.raises(ValueError):
        await runner.call(failing)
    assert wire.as_routerd_error(ValueError("x")).status == 400
    assert not runner.busy


def test_sampling_fields_are_parsed_and_validated() -> None:
    out = wire.sampling_kwargs({"temperature": 0, "top_k": 5, "seed": -1, "stop": "\n",
                                "n_predict": 16, "logit_bias": {"2": -100},
                                "mirostat": 2, "unknown": True})
    assert out["temperature"] == 0.0 and out["top_k"] == 5 and out["seed"] is None
    assert out["stop"] == ["\n"] and out["max_tokens"] == 16
    assert out["logit_bias"] == {2: -100.0}
    assert out["top_p"] == wire.SAMPLING_DEFAULTS["top_p"]
    assert wire.sampling_kwargs({"max_tokens": -1})["max_tokens"] is None
    assert wire.sampling_kwargs({"logit_bias": [[7, False]]})["logit_bias"][7] < -1e20
    for bad in ({"temperature": "hot"}, {"top_k": 1.5}, {"stop": [1]}, {"logit_bias": 3}):
        with pytest.raises(BadRequest):
            wire.sampling_kwargs(bad)


def test_chat_kwargs_flatten_text_parts_and_map_response_format() -> None:
    out = wire.chat_kwargs({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "f"}}]}, "smol")
    assert out["messages"] == [{"role": "user", "content": "ab"}]
    assert out["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert out["tools"] and out["model"] == "smol"
    with pytest.raises(BadRequest):
        wire.chat_kwargs({"messages": []}, "smol")
    assert wire.prompt_of({"prompt": ["only one"]}) == "only one"
    with pytest.raises(BadRequest):
        wire.prompt_of({"prompt": ["two", "prompts"]})


def test_timings_and_usage_follow_llama_server() -> None:
    stats = TokenStats(prompt_tokens=10, cached_tokens=4, predicted=5, prompt_ms=60.0,
                       predicted_ms=40.0, stopped_eos=True)
    t = stats.timings()
    assert (t["cache_n"], t["prompt_n"], t["predicted_n"]) == (4, 6, 5)
    assert t["prompt_per_token_ms"] == 10.0 and t["predicted_per_second"] == 125.0
    assert stats.usage() == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    final = wire.native_final("x", "stop", stats, "smol", [])
    assert final["stopped_eos"] and final["stop_type"] == "eos" and final["stop"] is True
    assert wire.native_final("", "length", stats, "smol", [])["stopped_limit"]
