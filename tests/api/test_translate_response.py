"""OpenAI (and llama.cpp native) replies -> Ollama replies: non-streamed, streamed, metrics.

Outputs are also validated with the `ollama` client's own response models."""

from __future__ import annotations

import re

import ollama
import pytest

from routerd.api.translate import (
    ChatStream,
    GenerateStream,
    chat_response,
    embed_response,
    embeddings_response,
    error_chunk_ollama,
    generate_response,
    load_response,
    now_rfc3339,
)
from routerd.api.translate.ollama_response import metrics
from routerd.errors import UpstreamError

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
TIMINGS = {"cache_n": 2, "prompt_n": 10, "prompt_ms": 12.5, "prompt_per_token_ms": 1.25,
           "predicted_n": 4, "predicted_ms": 40.25, "predicted_per_second": 99.4}
USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
MS = 1_000_000


def chunk(delta=None, finish=None, **extra):
    """A llama-server chat.completion.chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
            "choices": choices, **extra}


def tool_delta(index, *, id=None, name=None, args=None):
    fn = {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    d = {"index": index, "function": fn}
    if id:
        d.update(id=id, type="function")
    return {"tool_calls": [d]}


# --- timestamps and metrics -----------------------------------------------------------------


def test_rfc3339_nanoseconds_like_go():
    assert now_rfc3339(1717243200_123456789) == "2024-06-01T12:00:00.123456789Z"
    assert now_rfc3339(1717243200_120000000) == "2024-06-01T12:00:00.12Z"
    assert now_rfc3339(1717243200_000000000) == "2024-06-01T12:00:00Z"
    assert now_rfc3339(1717243201_000000001) == "2024-06-01T12:00:01.000000001Z"
    assert now_rfc3339(0) == "1970-01-01T00:00:00Z"
    assert STAMP.match(now_rfc3339())


def test_metrics_from_usage_and_timings():
    m = metrics(USAGE, TIMINGS, load_ns=5 * MS, total_ns=100 * MS)
    assert m == {"total_duration": 100 * MS, "load_duration": 5 * MS,
                 "prompt_eval_count": 12, "prompt_eval_duration": 12_500_000,
                 "eval_count": 4, "eval_duration": 40_250_000}


def test_metrics_counts_from_timings_when_no_usage():
    m = metrics(None, TIMINGS, load_ns=0, total_ns=1)
    assert m["prompt_eval_count"] == 12 and m["eval_count"] == 4  # prompt_n + cache_n


def test_metrics_without_timings_split_compute_time_by_tokens():
    m = metrics({"prompt_tokens": 30, "completion_tokens": 10}, None,
                load_ns=20 * MS, total_ns=100 * MS)
    assert m["prompt_eval_duration"] == 60 * MS and m["eval_duration"] == 20 * MS
    parts = m["prompt_eval_duration"] + m["eval_duration"] + m["load_duration"]
    assert parts == m["total_duration"]


def test_metrics_never_zero_duration_for_nonzero_count():
    m = metrics({"prompt_tokens": 1, "completion_tokens": 1}, None, load_ns=7, total_ns=7)
    assert m["prompt_eval_duration"] >= 1 and m["eval_duration"] >= 1
    m = metrics(None, None, load_ns=0, total_ns=50, eval_fallback=3)
    assert m["eval_count"] == 3 and m["prompt_eval_count"] == 0 and m["eval_duration"] == 50
    m = metrics(None, None, load_ns=10, total_ns=5)  # clock skew: no negative durations
    assert m["prompt_eval_duration"] == 0 and m["eval_duration"] == 0


# --- non-streamed chat / generate -----------------------------------------------------------


def test_chat_response():
    resp = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello!",
                                     "reasoning_content": "greet"}}],
            "usage": USAGE, "timings": TIMINGS}
    out = chat_response(resp, "smol", load_ns=3 * MS, total_ns=90 * MS)
    assert out["model"] == "smol" and STAMP.match(out["created_at"])
    assert out["message"] == {"role": "assistant", "content": "Hello!", "thinking": "greet"}
    assert out["done"] is True and out["done_reason"] == "stop"
    assert out["eval_count"] == 4 and out["eval_duration"] == 40_250_000
    assert out["total_duration"] == 90 * MS and out["load_duration"] == 3 * MS
    ollama.ChatResponse.model_validate(out)


def test_chat_response_tool_calls_arguments_become_objects():
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
             {"type": "function", "function": {"name": "now", "arguments": ""}},
             {"type": "function", "function": {"name": "bad", "arguments": "{oops"}}]
    resp = {"choices": [{"finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None, "tool_calls": calls}}]}
    out = chat_response(resp, "m", load_ns=0, total_ns=MS)
    assert out["done_reason"] == "stop"
    assert out["message"]["content"] == ""
    got = out["message"]["tool_calls"]
    assert got[0] == {"id": "c1", "function": {"index": 0, "name": "get_weather",
                                               "arguments": {"city": "Paris"}}}
    assert got[1] == {"function": {"index": 1, "name": "now", "arguments": {}}}
    assert got[2]["function"]["arguments"] == "{oops"  # not JSON: kept, not lost
    ollama.ChatResponse.model_validate({**out, "message": {**out["message"],
                                                           "tool_calls": got[:2]}})


@pytest.mark.parametrize("finish,reason", [("stop", "stop"), ("length", "length"),
                                           ("tool_calls", "stop"), (None, "stop")])
def test_done_reason(finish, reason):
    resp = {"choices": [{"finish_reason": finish, "message": {"content": "x"}}]}
    assert chat_response(resp, "m", load_ns=0, total_ns=1)["done_reason"] == reason


@pytest.mark.parametrize("resp,match", [
    ({"error": {"code": 500, "message": "boom", "type": "server_error"}}, "boom"),
    ({"error": "plain"}, "plain"),
    ({"choices": []}, "no choices"),
    ({}, "no choices"),
])
def test_chat_response_engine_errors(resp, match):
    with pytest.raises(UpstreamError, match=match):
        chat_response(resp, "m", load_ns=0, total_ns=1)


def test_generate_response_from_chat_completion_and_text_completion():
    chat = {"choices": [{"finish_reason": "length", "message": {"content": "Because.",
                                                                "reasoning_content": "hm"}}],
            "usage": USAGE}
    out = generate_response(chat, "m", load_ns=MS, total_ns=10 * MS)
    assert out["response"] == "Because." and out["thinking"] == "hm"
    assert out["done_reason"] == "length" and "context" not in out and "message" not in out
    ollama.GenerateResponse.model_validate(out)
    text = {"choices": [{"text": " world", "finish_reason": "stop"}], "usage": USAGE,
            "timings": TIMINGS}
    out = generate_response(text, "m", load_ns=0, total_ns=MS)
    assert out["response"] == " world" and out["prompt_eval_duration"] == 12_500_000


def test_generate_response_from_native_infill():
    native = {"content": "x + 1", "stop": True, "stop_type": "limit", "tokens_predicted": 3,
              "tokens_evaluated": 9, "timings": TIMINGS}
    out = generate_response(native, "m", load_ns=0, total_ns=MS)
    assert out["response"] == "x + 1" and out["done_reason"] == "length"
    assert out["prompt_eval_count"] == 9 and out["eval_count"] == 3
    native["stop_type"] = "eos"
    assert generate_response(native, "m", load_ns=0, total_ns=1)["done_reason"] == "stop"


def test_load_response():
    out = load_response("m", chat=True)
    assert out["message"] == {"role": "assistant", "content": ""} and out["done_reason"] == "load"
    out = load_response("m", chat=False, done_reason="unload")
    assert out["response"] == "" and out["done"] is True and out["done_reason"] == "unload"


# --- embeddings -----------------------------------------------------------------------------


def test_embed_response_orders_by_index():
    resp = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}}
    out = embed_response(resp, "e", load_ns=2, total_ns=9)
    assert out == {"model": "e", "embeddings": [[1.0, 0.0], [0.0, 1.0]], "total_duration": 9,
                   "load_duration": 2, "prompt_eval_count": 6}
    ollama.EmbedResponse.model_validate(out)


def test_embed_response_dimensions_cut_and_renormalised():
    resp = {"data": [{"index": 0, "embedding": [3.0, 4.0, 12.0]}]}
    out = embed_response(resp, "e", load_ns=0, total_ns=0, dimensions=2)
    assert out["embeddings"] == [[0.6, 0.8]]
    short = embed_response(resp, "e", load_ns=0, total_ns=0, dimensions=8)
    assert short["embeddings"] == [[3.0, 4.0, 12.0]]


def test_legacy_embeddings_response_and_errors():
    out = embeddings_response({"data": [{"index": 0, "embedding": [0.5, -0.5]}]})
    assert out == {"embedding": [0.5, -0.5]}
    ollama.EmbeddingsResponse.model_validate(out)
    assert embeddings_response({"data": []}) == {"embedding": []}
    with pytest.raises(UpstreamError, match="no data"):
        embeddings_response({"object": "list"})
    with pytest.raises(UpstreamError, match="too large"):
        embed_response({"error": {"message": "input is too large"}}, "e", load_ns=0, total_ns=0)


def test_error_chunk_ollama():
    assert error_chunk_ollama("model crashed") == {"error": "model crashed"}


# --- ChatStream -----------------------------------------------------------------------------


def test_chat_stream_like_llama_server():
    s = ChatStream("smol")
    assert s.feed(chunk({"role": "assistant", "content": None})) == []  # role-only
    a = s.feed(chunk({"content": "Hel"}))
    b = s.feed(chunk({"content": "lo"}))
    assert [o["message"] for o in a + b] == [{"role": "assistant", "content": "Hel"},
                                             {"role": "assistant", "content": "lo"}]
    assert all(o["done"] is False and o["model"] == "smol" for o in a + b)
    ollama.ChatResponse.model_validate(a[0])
    assert s.feed(chunk({}, "stop")) == []
    assert s.feed(chunk(None, usage=USAGE, timings=TIMINGS)) == []  # usage chunk, no choices
    final = s.finish(load_ns=MS, total_ns=70 * MS)
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["prompt_eval_count"], final["eval_count"]) == (12, 4)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (12_500_000, 40_250_000)
    ollama.ChatResponse.model_validate(final)


def test_chat_stream_reasoning_and_length():
    s = ChatStream("m")
    out = s.feed(chunk({"reasoning_content": "think"})) + s.feed(chunk({"content": "A"}, "length"))
    assert out[0]["message"] == {"role": "assistant", "content": "", "thinking": "think"}
    assert out[1]["message"]["content"] == "A"
    final = s.finish(load_ns=0, total_ns=10)
    assert final["done_reason"] == "length" and final["eval_count"] == 2  # counted chunks


def test_chat_stream_tool_call_fragments_emitted_once_complete():
    s = ChatStream("m")
    out = []
    for c in [chunk({"role": "assistant"}),
              chunk(tool_delta(0, id="call_a", name="get_weather", args="")),
              chunk(tool_delta(0, args='{"ci')),
              chunk(tool_delta(0, args='ty": "Pa')),
              chunk(tool_delta(1, id="call_b", name="get_time", args='{"tz"')),
              chunk(tool_delta(0, args='ris"}')),
              chunk(tool_delta(1, args=':"UTC"}'))]:
        out += s.feed(c)
    assert out == []  # nothing until the calls are complete
    out = s.feed(chunk({}, "tool_calls"))
    assert len(out) == 1 and out[0]["done"] is False
    assert out[0]["message"]["tool_calls"] == [
        {"id": "call_a", "function": {"index": 0, "name": "get_weather",
                                      "arguments": {"city": "Paris"}}},
        {"id": "call_b", "function": {"index": 1, "name": "get_time", "arguments": {"tz": "UTC"}}},
    ]
    ollama.ChatResponse.model_validate(out[0])
    final = s.finish(load_ns=0, total_ns=1)
    assert "tool_calls" not in final["message"] and final["done_reason"] == "stop"


def test_chat_stream_tool_calls_without_finish_reason_go_in_final_message():
    s = ChatStream("m")
    s.feed(chunk({"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}))
    s.feed(chunk({"tool_calls": [{"function": {"arguments": ""}}]}))  # no index: same call
    s.feed(chunk({"tool_calls": [{"id": "y", "function": {"name": "g",
                                                          "arguments": {"k": 1}}}]}))
    final = s.finish(load_ns=0, total_ns=1)
    assert final["message"]["tool_calls"] == [
        {"id": "x", "function": {"index": 0, "name": "f", "arguments": {}}},
        {"id": "y", "function": {"index": 1, "name": "g", "arguments": {"k": 1}}},
    ]


def test_chat_stream_in_band_error_raises():
    s = ChatStream("m")
    s.feed(chunk({"content": "a"}))
    with pytest.raises(UpstreamError, match="context shift disabled"):
        s.feed({"error": {"code": 500, "message": "context shift disabled", "type": "x"}})


# --- GenerateStream -------------------------------------------------------------------------


def test_generate_stream_from_chat_chunks():
    s = GenerateStream("m")
    out = s.feed(chunk({"role": "assistant"})) + s.feed(chunk({"content": "Sky"}))
    out += s.feed(chunk({"reasoning_content": "hmm"})) + s.feed(chunk({}, "stop"))
    assert [(o["response"], o.get("thinking")) for o in out] == [("Sky", None), ("", "hmm")]
    ollama.GenerateResponse.model_validate(out[0])
    s.feed(chunk(None, usage=USAGE))
    final = s.finish(load_ns=0, total_ns=16 * MS)
    assert final["response"] == "" and final["done"] is True and final["eval_count"] == 4
    ollama.GenerateResponse.model_validate(final)


def test_generate_stream_from_text_completion_chunks():
    s = GenerateStream("m")
    out = []
    for text, finish in [("Once", None), (" upon", None), ("", "length")]:
        out += s.feed({"choices": [{"text": text, "index": 0, "finish_reason": finish}]})
    assert [o["response"] for o in out] == ["Once", " upon"]
    s.feed({"choices": [], "usage": USAGE, "timings": TIMINGS})
    final = s.finish(load_ns=0, total_ns=MS)
    assert final["done_reason"] == "length" and final["eval_duration"] == 40_250_000


def test_generate_stream_from_native_infill_chunks():
    s = GenerateStream("m")
    out = s.feed({"content": "re", "stop": False}) + s.feed({"content": "turn", "stop": False})
    out += s.feed({"content": "", "stop": True, "stop_type": "word", "tokens_predicted": 2,
                   "tokens_evaluated": 20, "timings": TIMINGS})
    assert [o["response"] for o in out] == ["re", "turn"]
    final = s.finish(load_ns=0, total_ns=MS)
    assert final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (20, 2)


def test_generate_stream_ignores_chunks_without_text():
    s = GenerateStream("m")
    assert s.feed({"object": "ping"}) == [] and s.feed({"choices": []}) == []
    assert s.finish(load_ns=0, total_ns=0)["done_reason"] == "stop"
