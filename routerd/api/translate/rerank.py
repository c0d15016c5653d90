"""Rerank (Jina / Cohere shape) <-> llama-server's /v1/rerank (pure).

Request: `query`, `documents` (strings, or objects with `text` as Cohere and Jina accept),
`top_n`, `return_documents`. llama-server scores every document and honours `top_n`; it does
not echo documents, so `rerank_response` puts them back (`document: {"text": ...}`) when asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routerd.api.translate.fields import get_bool, json_type, require_object
from routerd.errors import BadRequest

__all__ = ["rerank_request", "rerank_response"]


def _documents(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise BadRequest('"documents" must be a non-empty array of strings or {"text": ...}')
    out = []
    for i, doc in enumerate(value):
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            out.append(doc["text"])
        else:
            raise BadRequest(f'"documents[{i}]" must be a string or {{"text": ...}}, '
                             f"got {json_type(doc)}")
    return out


def rerank_request(body: Any) -> tuple[dict[str, Any], list[str], bool]:
    """A rerank body -> (the engine's body, the documents as text, return_documents)."""
    body = require_object(body)
    query = body.get("query")
    if isinstance(query, dict) and isinstance(query.get("text"), str):
        query = query["text"]
    if not isinstance(query, str) or not query:
        raise BadRequest('"query" must be a non-empty string')
    docs = _documents(body.get("documents"))
    top_n = body.get("top_n")
    if top_n is not None and (type(top_n) is not int or top_n < 1):
        raise BadRequest('"top_n" must be an integer >= 1')
    out: dict[str, Any] = {"query": query, "documents": docs}
    if top_n is not None:
        out["top_n"] = top_n
    return out, docs, get_bool(body, "return_documents", False)


def rerank_response(reply: Mapping[str, Any], model: str, docs: list[str],
                    return_documents: bool, top_n: int | None = None) -> dict[str, Any]:
    """The engine's answer -> results sorted by relevance, the model name asked for."""
    results = []
    for r in reply.get("results") or []:
        idx = int(r.get("index", 0))
        item: dict[str, Any] = {"index": idx,
                                "relevance_score": float(r.get("relevance_score",
                                                               r.get("score", 0.0)))}
        if return_documents and 0 <= idx < len(docs):
            item["document"] = {"text": docs[idx]}
        results.append(item)
    results.sort(key=lambda r: -r["relevance_score"])
    if top_n is not None:
        results = results[:top_n]
    usage = reply.get("usage") or {}
    return {"id": reply.get("id") or "rerank", "object": "list", "model": model,
            "results": results,
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "total_tokens": int(usage.get("total_tokens") or 0)}}
