"""Rerank: the Jina/Cohere shape translated to llama-server's /v1/rerank and back, and the
whole path through a live routerd. No reranker GGUF can be had on these machines, so the live
test runs the fake worker's /v1/rerank (word overlap scores); no real reranker was run."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from routerd.api.translate import rerank as tx
from routerd.errors import BadRequest
from tests.conftest import Daemon, fake_model

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
