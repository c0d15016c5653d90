"""SSE decoding at odd byte boundaries, the encoders, and a whole llama-server stream
re-encoded as Ollama NDJSON however its bytes are split."""

from __future__ import annotations

import json
import random

import pytest

from routerd.api.translate import (
    DONE,
    ChatStream,
    SSEDecoder,
    encode_ndjson,
    encode_sse,
    error_chunk_ollama,
    error_event_openai,
)
from bench.translate import bench


def decode_all(pieces: list[bytes]) -> list[str]:
    d = SSEDecoder()
    out: list[str] = []
    for p in pieces:
        out += d.feed(p)
    return out


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given sorted offsets."""
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def every_split(data: bytes):
    """Every way to cut `data` once, plus one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


def test_single_and_several_events_in_one_read():
    assert decode_all([b'data: {"a":1}\n\n']) == ['{"a":1}']
    assert decode_all([b'data: 1\n\ndata: 2\n\ndata: [DONE]\n\n']) == ["1", "2", DONE]


def test_incomplete_event_waits_for_blank_line():
    d = SSEDecoder()
    assert d.feed(b"data: 1\n") == []
    assert d.feed(b"\n") == ["1"]


def test_comments_other_fields_and_empty_events_skipped():
    data = b": ping\n\nevent: message\nid: 7\nretry: 100\ndata: x\n\n:\n\n\n\n"
    assert decode_all([data]) == ["x"]


def test_multi_line_data_joined_with_newline_and_space_rules():
    data = b"data: line1\ndata:line2\ndata\ndata:  two spaces\n\n"
    assert decode_all([data]) == ["line1\nline2\n\n two spaces"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol):
    data = b"data: a" + eol + eol + b": c" + eol + b"data: b" + eol + eol
    assert decode_all([data]) == ["a", "b"]


def test_crlf_split_between_cr_and_lf_is_one_line_end():
    pieces = [b"data: a\r", b"\n\r", b"\ndata: b\r\n", b"\r", b"\n"]
    assert decode_all(pieces) == ["a", "b"]
    assert decode_all([b"data: a\r", b"\r"]) == ["a"]  # lone CRs: two line ends
    assert decode_all([b"data: a\r", b"", b"\n", b"data: b\n\n"]) == ["a\nb"]


def test_utf8_split_inside_a_character():
    payload = json.dumps({"content": "héllo 😀 世界"}, ensure_ascii=False)
    data = encode_sse(json.loads(payload))
    for pieces in every_split(data):
        assert [json.loads(p) for p in decode_all(pieces)] == [json.loads(payload)]


def test_every_split_of_a_mixed_stream_gives_the_same_events():
    data = (b": keepalive\r\n\r\ndata: {\"x\": \"a\\nb\"}\r\n\r\ndata: 1\ndata: 2\n\n"
            b"event: e\ndata:3\r\rdata: [DONE]\n\n")
    want = ['{"x": "a\\nb"}', "1\n2", "3", DONE]
    for pieces in every_split(data):
        assert decode_all(pieces) == want, pieces
    rng = random.Random(1234)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        assert decode_all(cut(data, cuts)) == want


def test_flush_returns_an_unterminated_last_event():
    d = SSEDecoder()
    assert d.feed(b"data: 1\n\ndata: 2") == ["1"]
    assert d.flush() == ["2"]
    assert d.flush() == []
    d = SSEDecoder()
    d.feed(b"data: 3\n")
    assert d.flush() == ["3"]
    d = SSEDecoder()
    d.feed(b": comment only")
    assert d.flush() == []


def test_encoders():
    assert encode_sse({"a": [1, 2], "é": "ü"}) == 'data: {"a":[1,2],"é":"ü"}\n\n'.encode()
    assert encode_sse(DONE) == b"data: [DONE]\n\n"
    line = encode_ndjson({"done": False, "response": "ü"})
    assert line == '{"done":false,"response":"ü"}\n'.encode()
    assert encode_ndjson(error_chunk_ollama("x")) == b'{"error":"x"}\n'
    assert encode_ndjson({"t": "a\ud83db"}) == b'{"t":"a?b"}\n'  # a lone surrogate never raises


def test_bench_smoke():
    result = bench(50)
    assert result["chunks"] == 50 and result["out_bytes"] > 0


def test_error_event_openai():
    raw = error_event_openai("engine died")
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    (payload,) = decode_all([raw])
    assert json.loads(payload) == {"error": {"message": "engine died", "type": "server_error",
                                             "code": "upstream_error"}}
    raw = error_event_openai("full", code="queue_full")
    assert json.loads(decode_all([raw])[0])["error"]["code"] == "queue_full"


def _llama_server_chat_stream() -> bytes:
    """Bytes as llama-server sends them for a streamed chat with include_usage."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**base, "choices": [{"index": 0, "finish_reason": None,
                                    "delta": {"role": "assistant", "content": None}}]}]
    for piece in ["Bon", "jour", " à", " 🌍"]:
        events.append({**base, "choices": [{"index": 0, "finish_reason": None,
                                            "delta": {"content": piece}}]})
    events.append({**base, "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4},
                   "timings": {"prompt_n": 9, "prompt_ms": 3.0, "predicted_n": 4,
                               "predicted_ms": 8.0}})
    return b"".join(encode_sse(e) for e in events) + encode_sse(DONE)


def _relay(pieces: list[bytes]) -> list[dict]:
    decoder, stream, out = SSEDecoder(), ChatStream("m"), []
    for piece in pieces:
        for payload in decoder.feed(piece):
            if payload == DONE:
                out.append(stream.finish(load_ns=0, total_ns=20_000_000))
                return [json.loads(encode_ndjson(o)) for o in out]
            out.extend(stream.feed(json.loads(payload)))
    raise AssertionError("no [DONE]")


def _strip_time(objs: list[dict]) -> list[dict]:
    return [{k: v for k, v in o.items() if k != "created_at"} for o in objs]


def test_whole_stream_relayed_identically_at_any_split():
    data = _llama_server_chat_stream()
    want = _strip_time(_relay([data]))
    assert "".join(o["message"]["content"] for o in want) == "Bonjour à 🌍"
    assert want[-1]["done"] is True and want[-1]["eval_duration"] == 8_000_000
    assert [o["done"] for o in want] == [False] * 4 + [True]
    for i in range(0, len(data) + 1, 7):
        assert _strip_time(_relay([data[:i], data[i:]])) == want
    rng = random.Random(99)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), 25))
        assert _strip_time(_relay(cut(data, cuts))) == want


def test_model_renamer_sets_the_asked_name_on_every_event_split_anywhere():
    from routerd.api.translate.sse import ModelRenamer
    stream = (b'data: {"model":"smollm2","choices":[{"text":"a"}]}\n\n'
              b': a comment\n\ndata: {"model":"smollm2","choices":[]}\n\ndata: [DONE]\n\n')
    for cut in range(len(stream)):
        r = ModelRenamer("smol")
        out = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert out == (b'data: {"model":"smol","choices":[{"text":"a"}]}\n\n'
                       b'data: {"model":"smol","choices":[]}\n\ndata: [DONE]\n\n')
