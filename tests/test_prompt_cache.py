"""Prompt caches that survive a swap (issue 14, part A), with real llama-server workers.

Two models and room for one (max_loaded: 1): a ~2,000-token conversation on A, A evicted by
B, the next turn on A. The engine's own `timings.cache_n` says whether the restored prefix
was used. No timings are asserted (the bench's "cache" scenario measures them).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from routerd.scheduler.cache import CacheKeeper
from tests.conftest import LLAMA_SERVER, Daemon

# make install builds llama-server: it is required here, never skipped
assert LLAMA_SERVER.exists(), f"{LLAMA_SERVER} missing: run `make install`"
pytestmark = [pytest.mark.timeout(900)]  # bounded; a busy shared machine is slow
# About 2,000 tokens of history (135 notes); ROUTERD_TEST_CACHE_NOTES makes it shorter on a
# machine too busy for that (the assertions scale with it).
NOTES = int(os.environ.get("ROUTERD_TEST_CACHE_NOTES", "135"))


def history(sentences: int) -> list[dict[str, str]]:
    text = " ".join(f"Note {i}: the weather in town {i % 17} was mild on day {i}."
                    for i in range(sentences))
    return [{"role": "user", "content": text + "\nWhich town is mentioned most?"}]


def chat(d: Daemon, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return d.post("/v1/chat/completions", {"model": model, "messages": messages,
                                           "max_tokens": 4, "temperature": 0}, timeout=300)


def next_turn(messages: list[dict[str, str]], answer: dict[str, Any]) -> list[dict[str, str]]:
    said = answer["choices"][0]["message"]["content"]
    return [*messages, {"role": "assistant", "content": said},
            {"role": "user", "content": "And the least?"}]


def slot_files(state: Path, model: str) -> list[Path]:
    return sorted(state.glob(f"prompt-cache/{model}-*/slot-*.bin*"))


def wait_for(pred: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := pred()):
            return got
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def swap(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    spec = {"model": str(model_path), "ctx_size": 4096, "parallel": 1, "embeddings": False}
    d = Daemon({"max_loaded": 1, "keep_alive": "10m",
                "cache": {"disk_budget": "2GiB"},
                "models": {"a": spec, "b": spec, "c": {**spec, "keep_cache": False}}},
               tmp_path_factory.mktemp("prompt-cache"))
    try:
        yield d
    finally:
        d.stop()


def state(d: Daemon) -> Path:
    return d.workdir / "state"


def count(d: Daemon, event: str) -> int:
    return d.log_path.read_text(errors="replace").count(event)


def test_returning_conversation_reuses_restored_prefix(swap: Daemon) -> None:
    msgs = history(NOTES)
    first = chat(swap, "a", msgs)
    assert first["timings"]["prompt_n"] >= NOTES * 13  # about 2,000 tokens of history
    saved = count(swap, "cache.saved")
    chat(swap, "b", history(3))  # room for one: A is evicted, its slot saved
    wait_for(lambda: count(swap, "cache.saved") > saved)
    ps = swap.get("/api/ps")
    assert ps["routerd"]["prompt_cache_bytes"]["a"] > 0
    again = chat(swap, "a", next_turn(msgs, first))  # B evicted, A loaded and restored
    t = again["timings"]
    assert t["cache_n"] >= first["timings"]["prompt_n"]  # the whole first prompt reused
    assert t["prompt_n"] < 100
    assert "cache.restored" in swap.log_path.read_text()
    ps = swap.get("/api/ps")
    (a,) = [m for m in ps["models"] if m["name"] == "a"]
    assert a["routerd"]["prompt_cache_bytes"] > 0


def test_keep_cache_false_is_not_kept(swap: Daemon) -> None:
    msgs = history(30)
    first = chat(swap, "c", msgs)
    chat(swap, "b", history(3))
    again = chat(swap, "c", next_turn(msgs, first))
    assert again["timings"]["cache_n"] == 0
    assert not list(state(swap).glob("prompt-cache/c-*"))


def test_corrupted_file_is_deleted_and_the_model_serves(swap: Daemon) -> None:
    msgs = history(20)
    chat(swap, "a", msgs)
    saved = count(swap, "cache.saved")
    chat(swap, "b", history(3))
    wait_for(lambda: count(swap, "cache.saved") > saved)
    (f,) = [p for p in slot_files(state(swap), "a") if p.name == "slot-0.bin"]
    with open(f, "r+b") as fh:  # same size, other bytes: only the digest can tell
        fh.seek(f.stat().st_size // 2)
        fh.write(os.urandom(4096))
    answer = chat(swap, "a", msgs)
    assert answer["choices"][0]["message"]["content"] is not None
    assert answer["timings"]["cache_n"] == 0  # nothing restored
    log = swap.log_path.read_text()
    assert "cache.restore_failed" in log and "digest differs" in log
    assert not f.exists() and not f.with_suffix(".json").exists()


def test_worker_killed_during_save(swap: Daemon) -> None:
    msgs = history(NOTES)
    chat(swap, "a", msgs)
    (pid,) = [m["routerd"]["pid"] for m in swap.get("/api/ps")["models"] if m["name"] == "a"]
    saving = count(swap, "cache.saving")
    asked = threading.Thread(target=chat, args=(swap, "b", history(3)))
    asked.start()  # A is evicted: its save begins; kill A's engine as it starts writing
    wait_for(lambda: count(swap, "cache.saving") > saving, timeout=60)
    os.kill(pid, signal.SIGKILL)
    asked.join(120)
    d = slot_files(state(swap), "a")
    whole = [p for p in d if p.name == "slot-0.bin"]
    log = swap.log_path.read_text()
    print("save finished before the kill" if whole else "killed mid-save")  # -s shows which
    if whole:  # the save won the race: then the file is whole (it matches its record)
        assert CacheKeeper._check(whole[0].parent, 0) is None
    else:
        assert "cache.save_failed" in log or "cache.save_abandoned" in log
    answer = chat(swap, "a", msgs)  # loads (restoring only a whole file) and serves
    assert answer["choices"][0]["message"]["content"] is not None
    if not whole:
        assert answer["timings"]["cache_n"] == 0
    assert not [p for p in slot_files(state(swap), "a") if p.name.endswith(".tmp")]


def other_history(items: int) -> list[dict[str, str]]:
    text = " ".join(f"Item {i}: a red box on shelf {i % 5} holds {i * 3} apples."
                    for i in range(items))
    return [{"role": "user", "content": text + "\nHow many apples in all?"}]


def test_two_conversations_return_to_their_own_slots(tmp_path: Path, model_path: Path) -> None:
    """parallel 2: both slots saved and restored into their ids; llama-server's prompt
    similarity (default 0.10) sends each returning conversation to its own."""
    spec = {"model": str(model_path), "ctx_size": 4096, "parallel": 2, "embeddings": False}
    d = Daemon({"max_loaded": 1, "keep_alive": "10m",
                "models": {"p": spec, "b": {**spec, "parallel": 1}}}, tmp_path)
    try:
        x, y = history(30), other_history(30)
        fx, fy = chat(d, "p", x), chat(d, "p", y)
        saved = count(d, "cache.saved")
        chat(d, "b", history(3))
        wait_for(lambda: count(d, "cache.saved") >= saved + 2)
        assert {p.name for p in slot_files(state(d), "p")} >= {"slot-0.bin", "slot-1.bin"}
        ay = chat(d, "p", next_turn(y, fy))  # Y first: it must not take X's slot
        ax = chat(d, "p", next_turn(x, fx))
        assert ay["timings"]["cache_n"] >= fy["timings"]["prompt_n"]
        assert ax["timings"]["cache_n"] >= fx["timings"]["prompt_n"]
    finally:
        d.stop()
