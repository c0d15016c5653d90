"""A real routerd with a HOME full of other tools' downloads: they are listed, they answer,
a configured model keeps its name, a deleted file answers 404 naming where it was, and
nothing under those folders changes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from routerd.discovery import format_sources
from tests.conftest import MOON, Daemon

from . import add_broken, build_home, link, snapshot

pytestmark = pytest.mark.timeout(300)

CLASH = "gpt4all/smollm2-135m-instruct:q4_1"  # a configured model takes this name first
HF = "hf/huggingfacetb/smollm2-135m-instruct-gguf:q4_1"
GONE = "local/mymodels/gone:q4_1"
# Whatever the outer environment points at, the daemon sees only the temporary HOME.
CLEAN_ENV = {k: "" for k in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "LLAMA_CACHE",
                             "XDG_CACHE_HOME", "XDG_DATA_HOME", "OLLAMA_MODELS")}


class Served:
    def __init__(self, daemon: Daemon, home: Path, expected: dict[str, Path],
                 before: dict[str, tuple]) -> None:
        self.daemon, self.home, self.expected, self.before = daemon, home, expected, before

    def tags(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.daemon.get("/api/tags")["models"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("discovery-home")
    expected = build_home(home, model_path)
    expected[GONE] = link(model_path, home / "mymodels/extra/Gone-Q4_1.gguf")
    add_broken(home, model_path)
    before = snapshot(home)
    daemon = Daemon({
        "model_dirs": [str(home / "mymodels")], "keep_alive": "10m",
        "models": {CLASH: {"model": str(model_path), "backend": "llama-server",
                           "ctx_size": 2048}},
    }, tmp_path_factory.mktemp("discovery-daemon"), env={**CLEAN_ENV, "HOME": str(home)})
    yield Served(daemon, home, expected, before)
    assert daemon.stop() == 0, daemon.log()


def test_discovered_models_are_listed_with_details(served: Served, model_path: Path) -> None:
    tags = served.tags()
    discovered = {m["routerd"]["location"]: (name, m) for name, m in tags.items()
                  if m["routerd"]["source"].startswith("discovered:")}
    assert set(discovered) == {str(p) for p in served.expected.values()}
    for name, path in served.expected.items():
        got_name, m = discovered[str(path)]
        if name != CLASH:
            assert got_name == name
        assert m["size"] == model_path.stat().st_size
        assert m["details"]["family"] == "llama"
        assert m["details"]["quantization_level"] == "Q4_1"
        assert m["details"]["parameter_size"].endswith("M")
    ids = {m["id"] for m in served.daemon.get("/v1/models")["data"]}
    assert {n for n in served.expected if n != CLASH} <= ids


def test_a_configured_model_keeps_its_name(served: Served) -> None:
    tags = served.tags()
    assert tags[CLASH]["routerd"]["source"] == "config"
    clashing = [n for n, m in tags.items()
                if m["routerd"]["location"] == str(served.expected[CLASH]) and n != CLASH]
    assert len(clashing) == 1 and tags[clashing[0]]["routerd"]["source"] == "discovered:gpt4all"
    table = format_sources(list(tags.values()))
    assert any(line.split()[:2] == [CLASH, "config"] for line in table.splitlines())
    assert any(line.split() == [clashing[0], "discovered:gpt4all", str(served.expected[CLASH])]
               for line in table.splitlines())


def test_a_discovered_model_answers_a_chat(served: Served) -> None:
    r = served.daemon.post("/api/chat", {
        "model": HF, "stream": False, "messages": [{"role": "user", "content": MOON}],
        "options": {"temperature": 0, "num_predict": 24, "seed": 1}}, timeout=180)
    assert "Armstrong" in r["message"]["content"], r
    ps = served.daemon.get("/api/ps")["models"]
    assert [m["name"] for m in ps] == [HF]


def test_nothing_under_the_folders_changed(served: Served) -> None:
    served.daemon.post("/api/refresh", {})
    assert snapshot(served.home) == served.before


def test_a_deleted_file_answers_404_naming_where_it_was(served: Served) -> None:
    path = served.expected[GONE]
    assert GONE in served.tags()
    path.unlink()
    served.daemon.post("/api/refresh", {})
    assert GONE not in served.tags()
    req = urllib.request.Request(
        served.daemon.base_url + "/api/chat",
        data=json.dumps({"model": GONE, "messages": [{"role": "user", "content": "hi"}],
                         "stream": False}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 404
    body = json.loads(err.value.read())
    assert str(path) in body["error"], body


def test_sighup_applies_discovery_toggles(served: Served) -> None:
    """Turning a source off in the config and sending SIGHUP drops its models."""
    import time

    assert any(n.startswith("local/") for n in served.tags())
    served.daemon.reload({"model_dirs": []})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(n.startswith("local/") for n in served.tags()):
        time.sleep(0.1)
    assert not any(n.startswith("local/") for n in served.tags())
    served.daemon.reload({"model_dirs": [str(served.home / "mymodels")]})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(n.startswith("local/")
                                                  for n in served.tags()):
        time.sleep(0.1)
    assert any(n.startswith("local/") for n in served.tags())
