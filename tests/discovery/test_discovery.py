"""Discovery unit tests: each tool's layout in a temporary HOME, scanned in milliseconds."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from routerd.catalog import Catalog
from routerd.config import Config, DiscoveryConfig, parse_config
from routerd.discovery import Discovery, format_sources, naming, scan
from routerd.errors import ModelNotFound
from routerd.store import gguf

from . import add_broken, build_home, hf_repo, link, snapshot, tiny_gguf, valid_name

LLAMA_SERVER = "/opt/llama/llama-server"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """structlog events from discovery (a fresh logger, whatever caching others set up)."""
    with capture_logs() as captured:
        monkeypatch.setattr(scan, "log", structlog.get_logger("routerd.discovery.scan"))
        yield captured


def skipped(logs: list[dict]) -> list[str]:
    return [e["path"] for e in logs if e["event"] == "discovery.skipped"]


def discovery(home: Path, *, platform: str = "linux", env: dict | None = None,
              **config: object) -> Discovery:
    cfg = parse_config({"model_dirs": [str(home / "mymodels")], **config})
    return Discovery(cfg, {"HOME": str(home), **(env or {})}, platform=platform)


def by_name(d: Discovery, llama_server: str | None = LLAMA_SERVER) -> dict:
    return {e.name: e for e in d.entries(llama_server)}


# ---------------------------------------------------------------- every source


def test_every_source_is_listed_with_name_and_details(home: Path, model_path: Path) -> None:
    expected = build_home(home, model_path)
    got = by_name(discovery(home))
    assert set(got) == set(expected)
    info = gguf.read_gguf(model_path)
    for name, path in expected.items():
        e = got[name]
        assert valid_name(name), name
        assert e.location == str(path) and e.launch.path == str(path)
        assert e.launch.model == name and e.launch.backend == "llama-server"
        assert e.launch.ctx_size == min(4096, info.context_length) == 4096
        assert e.launch.projector is None
        assert e.size == model_path.stat().st_size and e.digest == ""
        assert e.modified_at is not None and e.modified_at.timestamp() == pytest.approx(
            path.stat().st_mtime)
        assert gguf.details(gguf.read_gguf(e.launch.path))["quantization_level"] == "Q4_1"
    sources = {name: e.source for name, e in got.items()}
    assert sources["gpt4all/smollm2-135m-instruct:q4_1"] == "discovered:gpt4all"
    assert sources["hf/huggingfacetb/smollm2-135m-instruct-gguf:q4_1"] == "discovered:huggingface"
    assert sources["llamacpp/bartowski/smollm2-135m-instruct-gguf:q4_1"] == "discovered:llama_cpp"
    assert sources["local/mymodels/smollm2-135m-instruct:q4_1"] == "discovered:model_dirs"
    assert {s for s in sources.values()} >= {"discovered:lmstudio"}


def test_without_llama_server_the_own_worker_serves(home: Path, model_path: Path) -> None:
    build_home(home, model_path)
    assert {e.launch.backend for e in discovery(home).entries(None)} == {"llama-cpp-python"}


def test_macos_paths(home: Path, model_path: Path) -> None:
    link(model_path, home / "Library/Application Support/nomic.ai/GPT4All" / model_path.name)
    link(model_path, home / "Library/Caches/llama.cpp/ggml-org_SmolLM2-GGUF_smol-q4_1.gguf")
    link(model_path, home / ".local/share/nomic.ai/GPT4All" / model_path.name)  # Linux only
    assert set(by_name(discovery(home, platform="darwin"))) == {
        "gpt4all/smollm2-135m-instruct:q4_1", "llamacpp/ggml-org/smollm2-gguf:q4_1"}
    assert {e.location for e in discovery(home, platform="darwin").entries(None)} == {
        str(home / "Library/Application Support/nomic.ai/GPT4All" / model_path.name),
        str(home / "Library/Caches/llama.cpp/ggml-org_SmolLM2-GGUF_smol-q4_1.gguf")}


def test_environment_variables_move_the_folders(home: Path, model_path: Path,
                                                tmp_path: Path) -> None:
    hf_repo(tmp_path / "hubcache", "acme", "Tiny-GGUF", {"tiny-q4_1.gguf": model_path})
    hf_repo(tmp_path / "hfhome/hub", "other", "Small-GGUF", {"small.gguf": model_path})
    hf_repo(tmp_path / "llcache", "ggml-org", "Smol-GGUF", {"smol-q4_1.gguf": model_path})
    link(model_path, tmp_path / "xdgdata/nomic.ai/GPT4All/Smol.gguf")
    env = {"HF_HUB_CACHE": str(tmp_path / "hubcache"), "HF_HOME": str(tmp_path / "hfhome"),
           "LLAMA_CACHE": str(tmp_path / "llcache"), "XDG_DATA_HOME": str(tmp_path / "xdgdata"),
           "OLLAMA_MODELS": str(tmp_path / "ollama")}
    (tmp_path / "ollama").mkdir()
    (home / ".ollama/models").mkdir(parents=True)
    d = discovery(home, env=env)
    assert set(by_name(d)) == {"hf/acme/tiny-gguf:q4_1", "hf/other/small-gguf:q4_1",
                               "llamacpp/ggml-org/smol-gguf:q4_1", "gpt4all/smol:q4_1"}
    assert d.ollama_dirs()[:2] == [tmp_path / "ollama", home / ".ollama/models"]
    d_off = discovery(home, env=env, discovery={"ollama": False})
    assert d_off.ollama_dirs() == []
    assert discovery(home, env={"OLLAMA_MODELS": ""}).ollama_dirs()[:1] == [
        home / ".ollama/models"]


def test_hf_revision_refs_main_else_newest(home: Path, model_path: Path, tmp_path: Path) -> None:
    hub = home / ".cache/huggingface/hub"
    old, new = "a" * 40, "b" * 40
    hf_repo(hub, "org", "R-GGUF", {"r-q4_1.gguf": model_path}, rev=old)
    hf_repo(hub, "org", "R-GGUF", {"sub/r2-q4_1.gguf": model_path}, rev=new, main=False)
    (hub / "models--org--R-GGUF/refs/main").write_text(old + "\n")
    os.utime(hub / "models--org--R-GGUF/snapshots" / new, (2e9, 2e9))
    d = discovery(home)
    assert by_name(d)["hf/org/r-gguf:q4_1"].location.endswith(f"{old}/r-q4_1.gguf")
    (hub / "models--org--R-GGUF/refs/main").unlink()
    assert by_name(d)["hf/org/r-gguf:q4_1"].location.endswith(f"{new}/sub/r2-q4_1.gguf")


def test_llama_cpp_flat_names(home: Path, model_path: Path) -> None:
    cache = home / ".cache/llama.cpp"
    link(model_path, cache / "unsloth_Qwen_3-GGUF_Qwen_3-Q4_1.gguf")
    link(model_path, cache / "ggml-org_my_repo_model-q4_1.gguf")
    (cache / "manifest=ggml-org_my_repo=latest.json").write_text("{}")
    link(model_path, cache / "ai_smollm2_latest.gguf")  # a Docker model (-dr)
    (cache / "ai_smollm2_latest.gguf.etag").write_text("x")
    assert set(by_name(discovery(home))) == {
        "llamacpp/unsloth/qwen_3-gguf:q4_1", "llamacpp/ggml-org/my_repo:q4_1",
        "llamacpp/ai/smollm2:q4_1"}


# ---------------------------------------------------------------- broken, split, mmproj


def test_broken_files_are_skipped_with_one_log_line_each(home: Path, model_path: Path,
                                                         logs: list[dict]) -> None:
    expected = build_home(home, model_path)
    broken = add_broken(home, model_path)
    d = discovery(home)
    assert set(by_name(d)) == set(expected)
    assert sorted(skipped(logs)) == sorted(str(p) for p in broken)
    events = [e for e in logs if e["event"] == "discovery.skipped"]
    assert all(e["log_level"] == "warning" and e["reason"] and e["source"] for e in events)
    reasons = {Path(e["path"]).name: e["reason"] for e in events}
    assert "GGML" in reasons["ggml-gpt4all-j-v1.3-groovy.bin"]
    assert "unfinished" in reasons["SmolLM2-135M-Instruct-Q6_K.gguf.part"]
    assert "truncated" in reasons["SmolLM2-135M-Instruct-Q8_0.gguf"]
    assert "missing big-00003-of-00003.gguf" in reasons["big-00001-of-00003.gguf"]
    logs.clear()
    assert set(by_name(d)) == set(expected)  # a re-scan does not repeat them
    assert skipped(logs) == []


def test_split_gguf_is_one_model(home: Path) -> None:
    parts = [tiny_gguf(home / f"mymodels/big-{i:05d}-of-00003.gguf", split=(i, 3))
             for i in (1, 2, 3)]
    got = by_name(discovery(home))
    assert list(got) == ["local/mymodels/big:q4_0"]
    e = got["local/mymodels/big:q4_0"]
    assert e.launch.path == str(parts[0]) and e.launch.ctx_size == 2048
    assert e.size == sum(p.stat().st_size for p in parts)


def test_mmproj_is_attached_not_listed(home: Path, model_path: Path) -> None:
    lms = home / ".lmstudio/models/ggml-org/SmolVLM-GGUF"
    link(model_path, lms / "SmolVLM-Q4_1.gguf")
    tiny_gguf(lms / "mmproj-SmolVLM-Q8_0.gguf", arch="clip", file_type=7)
    proj = tiny_gguf(lms / "mmproj-SmolVLM-f16.gguf", arch="clip", file_type=1)
    cache = home / ".cache/llama.cpp"
    link(model_path, cache / "ggml-org_Vision-GGUF_vision-q4_1.gguf")
    proj2 = tiny_gguf(cache / "ggml-org_Vision-GGUF_mmproj-vision-f16.gguf", arch="clip",
                      file_type=1)
    got = by_name(discovery(home))
    assert set(got) == {"lmstudio/ggml-org/smolvlm-gguf:q4_1",
                        "llamacpp/ggml-org/vision-gguf:q4_1"}
    assert got["lmstudio/ggml-org/smolvlm-gguf:q4_1"].launch.projector == str(proj)
    assert got["llamacpp/ggml-org/vision-gguf:q4_1"].launch.projector == str(proj2)


def test_mmproj_in_a_mixed_folder_goes_with_its_own_model(home: Path) -> None:
    mine = home / "mymodels"
    tiny_gguf(mine / "Vision-7B-Q4_0.gguf")
    tiny_gguf(mine / "Other-1B-Q4_0.gguf")
    proj = tiny_gguf(mine / "mmproj-Vision-7B-f16.gguf", arch="clip", file_type=1)
    tiny_gguf(mine / "solo/Solo-Q4_0.gguf")
    solo = tiny_gguf(mine / "solo/mmproj-model-f16.gguf", arch="clip", file_type=1)
    got = {e.name: e.launch.projector for e in discovery(home).entries(None)}
    assert got == {"local/mymodels/vision-7b:q4_0": str(proj),
                   "local/mymodels/other-1b:q4_0": None,
                   "local/mymodels/solo:q4_0": str(solo)}


def test_collisions_within_discovery_get_distinct_stable_names(home: Path,
                                                              model_path: Path) -> None:
    repo = home / ".lmstudio/models/pub/Repo-GGUF"
    first = link(model_path, repo / "Repo-Q4_1.gguf")
    second = tiny_gguf(repo / "Repo-imatrix.gguf", file_type=3)  # also Q4_1
    os.utime(first, ns=(10**18, 10**18))
    os.utime(second, ns=(2 * 10**18, 2 * 10**18))  # newer: it takes the longer name
    for _ in range(2):
        got = {e.name: e.location for e in discovery(home).entries(None)}
        assert got == {"lmstudio/pub/repo-gguf:q4_1": str(first),
                       "lmstudio/pub/repo-gguf:q4_1-repo-imatrix": str(second)}
    assert naming.distinct([("a:t", "x", (2,)), ("a:t", "y", (1,)), ("a:t-x", "z", (0,))]) == [
        "a:t-x-2", "a:t", "a:t-x"]


# ---------------------------------------------------------------- toggles, read-only, gone


@pytest.mark.parametrize("tool,prefix", [("gpt4all", "gpt4all/"), ("lmstudio", "lmstudio/"),
                                         ("huggingface", "hf/"), ("llama_cpp", "llamacpp/")])
def test_toggles_turn_sources_off(home: Path, model_path: Path, tool: str, prefix: str) -> None:
    expected = build_home(home, model_path)
    got = by_name(discovery(home, discovery={tool: False}))
    assert set(got) == {n for n in expected if not n.startswith(prefix)}
    assert all(e.source != f"discovered:{tool}" for e in got.values())


def test_model_dirs_only_when_configured(home: Path, model_path: Path) -> None:
    build_home(home, model_path)
    d = Discovery(replace(Config(), discovery=DiscoveryConfig()), {"HOME": str(home)},
                  platform="linux")
    assert not any(n.startswith("local/") for n in by_name(d))
    d = discovery(home, model_dirs=["~/mymodels"])
    assert "local/mymodels/smollm2-135m-instruct:q4_1" in by_name(d)


def test_a_missing_model_dir_is_reported_once(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import routerd.discovery.discovery as disc

    with capture_logs() as logs:
        monkeypatch.setattr(disc, "log", structlog.get_logger("routerd.discovery.discovery"))
        d = discovery(home, model_dirs=["~/nowhere"])
        assert d.entries(None) == [] and d.entries(None) == []
    assert [(e["event"], e["path"]) for e in logs] == [
        ("discovery.model_dir_missing", str(home / "nowhere"))]


def test_nothing_under_the_folders_changes(home: Path, model_path: Path) -> None:
    build_home(home, model_path)
    add_broken(home, model_path)
    before = snapshot(home)
    d = discovery(home)
    for _ in range(3):
        d.entries(LLAMA_SERVER)
    discovery(home, platform="darwin").entries(None)
    assert snapshot(home) == before


def test_a_model_that_disappears_is_dropped_and_named_in_the_404(home: Path,
                                                                 model_path: Path) -> None:
    expected = build_home(home, model_path)
    d = discovery(home)
    catalog = Catalog(d.config, discovered=lambda: d.entries(None))
    name = "gpt4all/smollm2-135m-instruct:q4_1"
    assert catalog.resolve(name).location == str(expected[name])
    expected[name].unlink()
    catalog.refresh()
    assert name not in catalog.names() and len(catalog.names()) == len(expected) - 1
    with pytest.raises(ModelNotFound, match=str(expected[name])):
        catalog.resolve(name)


# ---------------------------------------------------------------- cheap


def test_thousand_files_rescan_reads_no_header_and_is_fast(home: Path) -> None:
    for i in range(1000):
        tiny_gguf(home / f"mymodels/set{i % 20:02d}/model-{i:04d}-q4_0.gguf")
    d = discovery(home)
    t0 = time.perf_counter()
    assert len(d.entries(LLAMA_SERVER)) == 1000
    cold = time.perf_counter() - t0
    reads = d.headers.reads
    assert reads == 1000
    t0 = time.perf_counter()
    entries = d.entries(LLAMA_SERVER)
    warm = time.perf_counter() - t0
    assert len(entries) == 1000 and d.headers.reads == reads  # nothing re-read
    assert warm < 1.0, f"warm re-scan of 1,000 files took {warm:.3f}s (cold {cold:.3f}s)"
    changed = home / "mymodels/set07/model-0007-q4_0.gguf"
    os.utime(changed, ns=(1, 1))
    d.entries(LLAMA_SERVER)
    assert d.headers.reads == reads + 1
    print(f"\n1,000 files: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms")


def test_format_sources() -> None:
    text = format_sources([
        {"name": "smollm2", "routerd": {"source": "config", "location": "/m/s.gguf"}},
        {"name": "hf/org/repo:q4_1", "routerd": {"source": "discovered:huggingface",
                                                 "location": "/h/x.gguf"}},
        {"name": "bare"}])
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "LOCATION"]
    assert lines[1].split() == ["smollm2", "config", "/m/s.gguf"]
    assert lines[2].split() == ["hf/org/repo:q4_1", "discovered:huggingface", "/h/x.gguf"]
    assert lines[3] == "bare"
    assert lines[1].index("config") == lines[2].index("discovered")

