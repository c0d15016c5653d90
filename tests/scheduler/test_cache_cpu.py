"""CPU budget with real llama-server workers: the threads routerd gives two co-resident
workers (cpu.threads 2, room for two: one thread each), and one alone (max_loaded 1: both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import LLAMA_SERVER, Daemon

# make install builds llama-server: it is required here, never skipped
assert LLAMA_SERVER.exists(), f"{LLAMA_SERVER} missing: run `make install`"
pytestmark = [pytest.mark.timeout(300)]


def argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("max_loaded,each", [(2, "1"), (1, "2")])
def test_threads_given_to_workers(tmp_path: Path, model_path: Path, max_loaded: int,
                                  each: str) -> None:
    spec = {"model": str(model_path), "ctx_size": 512, "embeddings": False}
    d = Daemon({"max_loaded": max_loaded, "cpu": {"threads": 2},
                "models": {"a": spec, "b": spec, "own": {**spec, "args": ["-t", "1"]}}},
               tmp_path)
    try:
        d.post("/api/generate", {"model": "a"})
        d.post("/api/generate", {"model": "b"})
        models = {m["name"]: m for m in d.get("/api/ps")["models"]}
        assert set(models) == ({"a", "b"} if max_loaded == 2 else {"b"})
        for m in models.values():
            args = argv(m["routerd"]["pid"])
            assert flag(args, "--threads") == each
            assert flag(args, "--threads-batch") == each
            assert m["routerd"]["threads"] == int(each)
        d.post("/api/generate", {"model": "own"})  # its own -t wins: routerd adds none
        (own,) = [m for m in d.get("/api/ps")["models"] if m["name"] == "own"]
        args = argv(own["routerd"]["pid"])
        assert "--threads" not in args and flag(args, "-t") == "1"
    finally:
        d.stop()
