"""Prompt cache keeper and CPU budget, without an engine: directories, records, the disk
budget's LRU, thread shares and the argv they become (issue 14, part A)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from routerd.catalog import ModelEntry
from routerd.config import Config, parse_config
from routerd.scheduler import cpu
from routerd.scheduler.cache import CacheKeeper, digest_file
from routerd.workers.backends import GpuAssignment, LaunchSpec, build_argv


def entry(name: str, path: str, **launch: object) -> ModelEntry:
    spec = LaunchSpec(model=name, path=path, backend=str(launch.pop("backend", "llama-server")),
                      **launch)  # type: ignore[arg-type]
    return ModelEntry(name=name, launch=spec, source="config")


def config(tmp_path: Path, **extra: object) -> Config:
    return parse_config({"state_dir": str(tmp_path / "state"), **extra})


class _Session:  # CacheKeeper only checks that one is there for these tests
    pass


def keeper() -> CacheKeeper:
    return CacheKeeper(_Session(), llama_server=None)  # type: ignore[arg-type]


def test_one_directory_per_file_engine_ctx_parallel(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"a" * 10)
    b.write_bytes(b"GGUF" + b"b" * 10)
    c = config(tmp_path)
    k = keeper()
    dirs = {k.directory(entry("m", str(a)), c), k.directory(entry("m", str(b)), c),
            k.directory(entry("m", str(a), ctx_size=8192), c),
            k.directory(entry("m", str(a), parallel=2), c)}
    assert len(dirs) == 4
    launched = k.launch(entry("m", str(a)), c)
    assert launched.launch.slot_save_path == str(k.directory(entry("m", str(a)), c))
    assert Path(launched.launch.slot_save_path).is_dir()
    a.write_bytes(b"GGUF" + b"c" * 20)  # the file changed: its old slots never apply
    assert k.directory(entry("m", str(a)), c) != Path(launched.launch.slot_save_path)


def test_kept_only_for_llama_server_and_keep_cache(tmp_path: Path) -> None:
    c = config(tmp_path, models={"off": {"model": "x.gguf", "keep_cache": False}})
    k = keeper()
    assert k.launch(entry("off", "x.gguf"), c).launch.slot_save_path is None
    assert k.launch(entry("lf", "x.gguf", backend="llamafile"), c).launch.slot_save_path is None
    assert k.launch(entry("own", "x.gguf", backend="llama-cpp-python"),
                    c).launch.slot_save_path is None
    off = config(tmp_path, cache={"enabled": False})
    assert k.launch(entry("on", "x.gguf"), off).launch.slot_save_path is None
    assert CacheKeeper(None, llama_server=None).launch(entry("on", "x.gguf"),
                                                        c).launch.slot_save_path is None


def _saved(d: Path, sid: int, size: int, mtime: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"slot-{sid}.bin"
    f.write_bytes(os.urandom(size))
    (d / f"slot-{sid}.json").write_text(json.dumps(
        {"slot": sid, "tokens": 1, "bytes": size, "digest": digest_file(f)}))
    os.utime(f, (mtime, mtime))
    return f


def test_record_guards_the_restore(tmp_path: Path) -> None:
    d = tmp_path / "m"
    f = _saved(d, 0, 4096, 1000)
    assert CacheKeeper._check(d, 0) is None
    with open(f, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0" * 64)
    assert "digest" in (CacheKeeper._check(d, 0) or "")
    f.write_bytes(f.read_bytes()[:100])  # truncated: llama.cpp would abort on it
    assert "size" in (CacheKeeper._check(d, 0) or "")
    (d / "slot-0.json").unlink()
    assert "record" in (CacheKeeper._check(d, 0) or "")


def test_disk_budget_removes_least_recently_used_across_models(tmp_path: Path) -> None:
    c = config(tmp_path, cache={"disk_budget": 10_000})
    root = keeper().root(c)
    old = _saved(root / "a-1", 0, 4000, 1000)
    mid = _saved(root / "b-2", 0, 4000, 2000)
    new = _saved(root / "a-1", 1, 4000, 3000)
    for d, name in ((root / "a-1", "a"), (root / "b-2", "b")):
        (d / "model.json").write_text(json.dumps({"model": name}))
    assert keeper().cached_bytes(c) == {"a": 8000, "b": 4000}
    removed = keeper().enforce_budget(c)
    assert removed == [old]
    assert not old.exists() and not old.with_suffix(".json").exists()
    assert mid.exists() and new.exists()
    assert keeper().cached_bytes(c) == {"a": 4000, "b": 4000}


def test_a_half_written_temp_file_is_swept_not_restored(tmp_path: Path) -> None:
    c = config(tmp_path)
    k = keeper()
    e = entry("m", str(tmp_path / "m.gguf"))
    d = k.directory(e, c)
    d.mkdir(parents=True)
    (d / "slot-0.bin.tmp").write_bytes(b"half")
    k.launch(e, c)
    assert not (d / "slot-0.bin.tmp").exists()


# ---------------------------------------------------------------- CPU budget


def test_threads_shared_among_expected_co_residents(tmp_path: Path) -> None:
    one = config(tmp_path, cpu={"threads": 2}, max_loaded=1)
    two = config(tmp_path, cpu={"threads": 2}, max_loaded=2)
    free = config(tmp_path, cpu={"threads": 4})
    a = LaunchSpec(model="a", path="", backend="llama-server")
    assert cpu.threads_for(a, [], one) == 2
    assert cpu.threads_for(a, [], two) == 1  # set at start for the co-resident to come
    assert cpu.threads_for(a, [replace(a, threads=1)], two) == 1
    # Without max_loaded: the workers loaded now plus this one, within what they left.
    assert cpu.threads_for(a, [], free) == 4
    assert cpu.threads_for(a, [replace(a, threads=2)], free) == 2
    assert cpu.threads_for(a, [replace(a, threads=4)], free) == 1  # logged as oversubscribed
    assert cpu.threads_for(a, [], parse_config({})) == cpu.physical_cores()


def test_explicit_threads_win_and_gpu_workers_book_few(tmp_path: Path,
                                                       model_path: Path) -> None:
    c = config(tmp_path, cpu={"threads": 2}, max_loaded=2)
    own = LaunchSpec(model="a", path="", backend="llama-server", args=("-t", "1"))
    assert cpu.threads_for(own, [], c) is None
    assert cpu.booked(own) == 1
    other = LaunchSpec(model="b", path="", backend="llama-server")
    assert cpu.threads_for(other, [own], c) == 1
    gpu = LaunchSpec(model="g", path=str(model_path), backend="llama-server",
                     placement=GpuAssignment(gpu_layers=999, devices=(0,)))
    assert cpu.on_gpu(gpu)
    assert cpu.threads_for(gpu, [], c) == 1
    partial = replace(gpu, placement=GpuAssignment(gpu_layers=3, devices=(0,)))
    assert not cpu.on_gpu(partial)
    cmd = LaunchSpec(model="c", path="", backend="command", command=("x",))
    assert cpu.threads_for(cmd, [], c) is None


@pytest.mark.parametrize("backend,flags", [
    ("llama-server", ["--threads", "3", "--threads-batch", "3", "--slot-save-path", "/s"]),
    ("llama-cpp-python", ["--threads", "3", "--threads-batch", "3"]),
    ("llamafile", ["--threads", "3"]),
])
def test_argv(backend: str, flags: list[str]) -> None:
    spec = LaunchSpec(model="m", path="/m.gguf", backend=backend, threads=3,
                      slot_save_path="/s")
    argv = build_argv(spec, host="127.0.0.1", port=1, api_key="k",
                      llama_server="/bin/llama-server").argv
    for f in flags:
        assert f in argv
    if backend != "llama-server":
        assert "--slot-save-path" not in argv
    i = argv.index("--threads")
    assert argv[i + 1] == "3"
    mine = replace(spec, args=("-t", "1"))
    argv = build_argv(mine, host="127.0.0.1", port=1, api_key="k",
                      llama_server="/bin/llama-server").argv
    assert "--threads" not in argv and argv[-2:] == ["-t", "1"]
