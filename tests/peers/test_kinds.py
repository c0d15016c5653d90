"""What each kind of peer answers, read into one shape (routerd/peers/kinds.py), and the
`peers:` config section."""

from __future__ import annotations

import pytest

from routerd.config import ConfigError, parse_config
from routerd.peers import kinds


def test_a_routerd_peer_lists_its_tags_loaded_from_ps_without_aliases_or_its_own_peers() -> None:
    answers = {
        "/api/tags": {"models": [
            {"name": "smol", "size": 10, "routerd": {"source": "config"}},
            {"name": "s", "routerd": {"alias_of": "smol"}},
            {"name": "far", "routerd": {"peer": "c"}},
            {"name": "big", "size": 99}]},
        "/api/ps": {"models": [{"name": "smol", "routerd": {"state": "ready", "parallel": 4,
                                                           "booked": {"ram": 30}}}],
                    "routerd": {"budget": {"ram": 100}}},
    }
    models = {m.name: m for m in kinds.read_models("routerd", answers)}
    assert set(models) == {"smol", "big"}
    assert models["smol"].loaded and models["smol"].slots == 4 and models["smol"].size == 10
    assert not models["big"].loaded
    assert kinds.budget_free(answers["/api/ps"]) == 70


def test_an_ollama_peer_without_ps_lists_nothing_loaded() -> None:
    models = kinds.read_models("ollama", {"/api/tags": {"models": [{"name": "llama3:latest"}]},
                                          "/api/ps": None})
    assert [(m.name, m.loaded) for m in models] == [("llama3:latest", False)]


def test_llama_server_router_mode_status_and_slots_from_props() -> None:
    answers = {"/models": {"data": [{"id": "a", "status": {"value": "loaded"}},
                                    {"id": "b", "status": {"value": "unloaded"}}]},
               "/props": {"total_slots": 4}}
    models = {m.name: m for m in kinds.read_models("llama-server", answers)}
    assert models["a"].loaded and not models["b"].loaded and models["a"].slots == 4


def test_an_openai_peer_counts_every_listed_model_as_loaded() -> None:
    models = kinds.read_models("openai", {"/models": {"data": [{"id": "gpt"}]}})
    assert [(m.name, m.loaded) for m in models] == [("gpt", True)]


def test_detection_by_what_the_peer_answers() -> None:
    assert kinds.detect({"version": "0.12.0", "routerd": "1"}, None) == "routerd"
    assert kinds.detect({"version": "0.12.0"}, None) == "ollama"
    assert kinds.detect(None, {"default_generation_settings": {}}) == "llama-server"
    assert kinds.detect(None, None) is None


def test_forwarding_paths_per_kind() -> None:
    assert kinds.forward_url("routerd", "http://b:1", "/v1/chat/completions") == \
        "http://b:1/v1/chat/completions"
    assert kinds.forward_url("openai", "http://v:8000/v1", "/v1/chat/completions") == \
        "http://v:8000/v1/chat/completions"


def test_peers_config_parses_with_defaults() -> None:
    c = parse_config({"peers": [{"name": "b", "url": "http://b:11434/", "models": ["llama*"],
                                 "prefix": "b-", "weight": 2, "interval": "2s"}]})
    (p,) = c.peers
    assert (p.url, p.kind, p.models, p.prefix, p.weight, p.interval) == \
        ("http://b:11434", "auto", ("llama*",), "b-", 2.0, 2.0)


@pytest.mark.parametrize(("peer", "field"), [
    ({"url": "http://b"}, "peers[0].name"),
    ({"name": "a/b", "url": "http://b"}, "peers[0].name"),
    ({"name": "b", "url": "b:1"}, "peers[0].url"),
    ({"name": "b", "url": "http://b", "kind": "vllm"}, "peers[0].kind"),
    ({"name": "b", "url": "http://b", "weight": 0}, "peers[0].weight"),
    ({"name": "b", "url": "http://b", "interval": "0s"}, "peers[0].interval"),
    ({"name": "b", "url": "http://b", "api_key": "k", "api_key_file": "/etc/hostname"},
     "peers[0].api_key_file"),
    ({"name": "b", "url": "http://b", "api_key_file": "/nonexistent/key"},
     "peers[0].api_key_file"),
    ({"name": "b", "url": "http://b", "colour": "red"}, "peers[0].colour"),
])
def test_a_bad_peer_names_its_field(peer: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"peers": [peer]})
    assert e.value.key == field


def test_two_peers_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"peers": [{"name": "b", "url": "http://b"}, {"name": "b", "url": "http://c"}]})
    assert e.value.key == "peers[1].name"
