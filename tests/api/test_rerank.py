"""Rerank: the Jina/Cohere shape translated to llama-server's /v1/rerank and back, and the
whole path through a live routerd: the fake worker's /v1/rerank (word overlap scores), and the
real llama-server started with --reranking. No reranker GGUF can be had on these machines:
the real engine runs SmolLM2 (a chat model) with rank pooling, so its scores are not a trained
reranker's; the test checks the path and the shape, not the ranking."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from routerd.api.translate import rerank as tx
from routerd.errors import BadRequest
from routerd.catalog import entry_from_config
from routerd.config import ConfigError, parse_config
from routerd.store.gguf import header, is_reranker
from routerd.workers.backends import build_argv
from tests.conftest import Daemon, fake_model
from tests.discovery import tiny_gguf_bytes

DOCS = ["the moon is made of rock", "bananas are yellow", {"text": "men walked on the moon"}]


def test_request_and_response() -> None:
    body, docs, back = tx.rerank_request({"model": "r", "query": "moon walk", "documents": DOCS,
                                          "top_n": 2, "return_documents": True})
    assert body == {"query": "moon walk", "documents": [DOCS[0], DOCS[1], DOCS[2]["text"]],
                    "top_n": 2}
    assert back is True
    reply = {"model": "engine-name", "object": "list", "usage": {"prompt_tokens": 12,
                                                                 "total_tokens": 12},
             "results": [{"index": 0, "relevance_score": 0.2},
                         {"index": 2, "relevance_score": 0.9}]}
    out = tx.rerank_response(reply, "asked", docs, back, 2)
    assert out["model"] == "asked" and out["usage"]["total_tokens"] == 12
    assert out["results"] == [
        {"index": 2, "relevance_score": 0.9, "document": {"text": "men walked on the moon"}},
        {"index": 0, "relevance_score": 0.2, "document": {"text": DOCS[0]}}]


@pytest.mark.parametrize("bad", [{"documents": ["x"]}, {"query": "q"},
                                 {"query": "q", "documents": [1]},
                                 {"query": "q", "documents": ["x"], "top_n": 0}])
def test_bad_requests(bad: dict) -> None:
    with pytest.raises(BadRequest):
        tx.rerank_request(bad)


def test_live_through_the_fake_worker(tmp_path: Path) -> None:
    d = Daemon({"models": {"ranker": fake_model()}}, tmp_path)
    try:
        for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
            r = httpx.post(d.base_url + path, timeout=30, json={
                "model": "ranker", "query": "moon", "documents": DOCS, "top_n": 2,
                "return_documents": True})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["model"] == "ranker" and len(out["results"]) == 2
            assert {x["index"] for x in out["results"]} == {0, 2}
            assert all(x["document"]["text"] for x in out["results"])
        bad = httpx.post(d.base_url + "/v1/rerank", json={"model": "ranker", "query": "q"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    finally:
        assert d.stop() == 0


def test_a_gguf_with_rank_pooling_is_started_with_reranking(tmp_path: Path) -> None:
    ranker = tmp_path / "ranker.gguf"  # rank pooling: llama.cpp's pooling_type 4
    ranker.write_bytes(tiny_gguf_bytes(arch="bert", uint32s=(("bert.pooling_type", 4),)))
    plain = tmp_path / "plain.gguf"
    plain.write_bytes(tiny_gguf_bytes())
    assert is_reranker(header(ranker)) and not is_reranker(header(plain))
    cfg = parse_config({"models": {
        "ranker": {"model": str(ranker), "backend": "llama-server"},
        "forced": {"model": str(plain), "backend": "llama-server", "rerank": True},
        "plain": {"model": str(plain), "backend": "llama-server"},
        "off": {"model": str(ranker), "backend": "llama-server", "rerank": False}}})
    for name, want in (("ranker", True), ("forced", True), ("plain", False), ("off", False)):
        entry = entry_from_config(cfg.models[name], store=None, llama_server="/bin/true")
        assert entry.launch.rerank is want, name
        argv = build_argv(entry.launch, host="127.0.0.1", port=1, api_key="k",
                          llama_server="/bin/true").argv
        assert ("--reranking" in argv) is want, argv
        assert ("--pooling" in argv) is not want  # rank pooling replaces mean-pooled embeddings
    with pytest.raises(ConfigError, match="rerank"):
        parse_config({"models": {"x": {"model": str(plain), "rerank": "yes"}}})


def test_live_on_llama_server_started_with_reranking(tmp_path: Path, model_path: Path) -> None:
    d = Daemon({"models": {"ranker": {"model": str(model_path), "backend": "llama-server",
                                      "ctx_size": 512, "rerank": True}}}, tmp_path)
    try:
        r = httpx.post(d.base_url + "/v1/rerank", timeout=120, json={
            "model": "ranker", "query": "moon", "documents": DOCS, "top_n": 2,
            "return_documents": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "ranker" and len(out["results"]) == 2
        scores = [x["relevance_score"] for x in out["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(isinstance(x["index"], int) and x["document"]["text"] for x in out["results"])
        assert out["usage"]["total_tokens"] > 0
    finally:
        assert d.stop() == 0
