"""Ollama `logprobs` / `top_logprobs` on /api/chat and /api/generate, both ways."""

from __future__ import annotations

import pytest

from routerd.api.translate import ollama as tx
from routerd.api.translate import ollama_response as rx
from routerd.api.translate.ollama_stream import ChatStream, GenerateStream
from routerd.errors import BadRequest

# llama-server's choice logprobs (shape recorded from /v1/chat/completions, logprobs: true)
LP = {"content": [{"id": 9, "token": "Hi", "bytes": [72, 105], "logprob": -0.1,
                   "top_logprobs": [{"id": 9, "token": "Hi", "bytes": [72, 105],
                                     "logprob": -0.1},
                                    {"id": 7, "token": "Hey", "bytes": [72, 101, 121],
                                     "logprob": -2.5}]}]}
OLLAMA = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
    {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}]}]


def test_request_fields() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": 2}
    out = tx.chat_request(body)
    assert out["logprobs"] is True and out["top_logprobs"] == 2
    path, gen = tx.generate_request({"model": "m", "prompt": "hi", "logprobs": True})
    assert gen["logprobs"] is True and "top_logprobs" not in gen
    assert "logprobs" not in tx.chat_request({"messages": []})
    with pytest.raises(BadRequest, match="top_logprobs"):
        tx.chat_request({**body, "top_logprobs": 99})


def test_replies_and_streams() -> None:
    reply = {"choices": [{"finish_reason": "stop", "logprobs": LP,
                          "message": {"role": "assistant", "content": "Hi"}}]}
    assert rx.chat_response(reply, "m", load_ns=0, total_ns=1)["logprobs"] == OLLAMA
    assert rx.generate_response(reply, "m", load_ns=0, total_ns=1)["logprobs"] == OLLAMA
    assert "logprobs" not in rx.chat_response(
        {"choices": [{"message": {"content": "x"}}]}, "m", load_ns=0, total_ns=1)
    chunk = {"choices": [{"delta": {"content": "Hi"}, "logprobs": LP}]}
    assert ChatStream("m").feed(chunk)[0]["logprobs"] == OLLAMA
    assert GenerateStream("m").feed(chunk)[0]["logprobs"] == OLLAMA
