"""The Responses store: atomic files under state_dir, bounded by count, bytes and age."""

from __future__ import annotations

import json
from pathlib import Path

from routerd.api.response_store import ResponseStore

IDS = [f"resp_{i:032x}" for i in range(10)]


def resp(rid: str, text: str = "x") -> dict:
    return {"id": rid, "object": "response", "output": [{"type": "message", "text": text}]}


def test_put_get_delete_and_restart(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "responses")
    assert store.get(IDS[0]) is None
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    store.put(resp(IDS[0]), history)
    got = store.get(IDS[0])
    assert got is not None and got.response == resp(IDS[0]) and got.history == history
    # a new store over the same folder (a restart) finds it
    again = ResponseStore(tmp_path / "responses")
    assert len(again) == 1 and again.get(IDS[0]) is not None
    assert again.delete(IDS[0]) and not again.delete(IDS[0])
    assert again.get(IDS[0]) is None and not list((tmp_path / "responses").iterdir())


def test_ids_are_checked_before_paths(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path)
    (tmp_path / "secret.json").write_text("{}")
    for bad in ("../secret", "secret", "resp_../../x", "resp_" + "g" * 32):
        assert store.get(bad) is None and not store.delete(bad)
    assert (tmp_path / "secret.json").exists()


def test_bounded_by_count_oldest_first(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, max_count=3)
    for rid in IDS[:5]:
        store.put(resp(rid), [])
    assert len(store) == 3
    assert [store.get(r) is not None for r in IDS[:5]] == [False, False, True, True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{r}.json" for r in IDS[2:5]]


def test_bounded_by_bytes(tmp_path: Path) -> None:
    one = len(json.dumps({"response": resp(IDS[0], "y" * 1000), "history": []},
                         separators=(",", ":")))
    store = ResponseStore(tmp_path, max_bytes=int(one * 2.5))
    for rid in IDS[:4]:
        store.put(resp(rid, "y" * 1000), [])
    assert len(store) == 2 and store.bytes <= one * 2.5
    assert store.get(IDS[3]) is not None and store.get(IDS[0]) is None
    # one response larger than the whole budget is not kept, and evicts nothing
    store.put(resp(IDS[9], "z" * 10_000), [])
    assert store.get(IDS[9]) is None and len(store) == 2


def test_ttl(tmp_path: Path) -> None:
    now = [1000.0]
    store = ResponseStore(tmp_path, ttl=60, clock=lambda: now[0])
    store.put(resp(IDS[0]), [])
    now[0] += 30
    store.put(resp(IDS[1]), [])
    assert store.get(IDS[0]) is not None
    now[0] += 31  # IDS[0] is 61 s old, IDS[1] 31 s
    assert store.get(IDS[0]) is None and store.get(IDS[1]) is not None
    assert not (tmp_path / f"{IDS[0]}.json").exists()


def test_restart_sweeps_temp_files_and_expired(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path)
    store.put(resp(IDS[0]), [])
    (tmp_path / ".tmpabc").write_bytes(b"half a fi")
    (tmp_path / "notes.txt").write_text("left alone")
    again = ResponseStore(tmp_path, ttl=-1)  # everything on disk is past its TTL
    assert len(again) == 0 and not (tmp_path / ".tmpabc").exists()
    assert (tmp_path / "notes.txt").exists()
