"""Anthropic Messages <-> chat completions: requests, replies and the stream's event order."""

from __future__ import annotations

import json

import pytest

from routerd.api.translate import anthropic as at
from routerd.api.translate.sse import SSEDecoder
from routerd.errors import BadRequest

# What the anthropic SDK sends for a tool round trip (shape as documented and as
# `anthropic.Anthropic().messages.create(...)` serialises it).
SDK_BODY = {
    "model": "smollm2", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
    "temperature": 0, "top_k": 5, "stop_sequences": ["###"], "metadata": {"user_id": "u1"},
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "They want weather.", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny"},
            {"type": "text", "text": "And tomorrow?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]},
    ],
    "tools": [{"name": "get_weather", "description": "Weather for a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
}


def test_request_translates_every_block() -> None:
    out = at.messages_request(SDK_BODY)
    assert out["max_tokens"] == 64 and out["temperature"] == 0 and out["top_k"] == 5
    assert out["stop"] == ["###"] and out["stream"] is False and "stream_options" not in out
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": SDK_BODY["tools"][0]["input_schema"]}}]  # the server tool is left out
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "They want weather.",
         "tool_calls": [{"id": "toolu_01", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18C, sunny"},
        {"role": "user", "content": [
            {"type": "text", "text": "And tomorrow?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
    ]


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "get_weather"},
     {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice(choice: dict, expected: object) -> None:
    out = at.messages_request({**SDK_BODY, "tool_choice": choice})
    assert out["tool_choice"] == expected


def test_tool_choice_none_offers_no_tools() -> None:
    out = at.messages_request({**SDK_BODY, "tool_choice": {"type": "none"}})
    assert "tools" not in out and "tool_choice" not in out


def test_stream_thinking_and_errors() -> None:
    out = at.messages_request({"model": "m", "max_tokens": 5, "stream": True,
                               "thinking": {"type": "enabled", "budget_tokens": 100},
                               "messages": [{"role": "user", "content": [
                                   {"type": "tool_result", "tool_use_id": "t", "is_error": True,
                                    "content": [{"type": "text", "text": "boom"}]}]}]})
    assert out["stream"] and out["stream_options"] == {"include_usage": True}
    assert out["chat_template_kwargs"] == {"enable_thinking": True}
    assert out["reasoning_budget_tokens"] == 100
    assert out["messages"] == [{"role": "tool", "tool_call_id": "t", "content": "Error: boom"}]


@pytest.mark.parametrize("bad,match", [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "audio"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tools": [{"name": "x"}]}, "input_schema"), ({"temperature": "hot"}, "temperature"),
    ({"system": [{"type": "image"}]}, "system"),
])
def test_bad_requests(bad: dict, match: str) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **bad}
    with pytest.raises(BadRequest, match=match):
        at.messages_request(body)


def test_count_request_needs_no_max_tokens() -> None:
    out = at.count_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert out == {"messages": [{"role": "user", "content": "hi"}]}


def load(name: str) -> dict:
    from pathlib import Path
    return json.loads((Path(__file__).parent / "payloads" / name).read_text())


def test_reply_text() -> None:
    reply = load("chat_reply.json")  # recorded from llama-server serving SmolLM2
    msg = at.message_response(reply, "smol", msg_id="msg_1")
    assert msg["id"] == "msg_1" and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == "smol"  # the name the client asked for, not the engine's
    assert msg["content"] == [{"type": "text", "text": reply["choices"][0]["message"]["content"]}]
    assert msg["stop_reason"] == {"length": "max_tokens"}.get(
        reply["choices"][0]["finish_reason"], "end_turn")
    assert msg["stop_sequence"] is None
    assert msg["usage"] == {"input_tokens": reply["usage"]["prompt_tokens"],
                            "output_tokens": reply["usage"]["completion_tokens"],
                            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def test_reply_tool_use_and_thinking() -> None:
    reply = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning_content": "hmm",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {
                "name": "get_weather", "arguments": "not json"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    msg = at.message_response(reply, "m")
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"] == [
        {"type": "thinking", "thinking": "hmm", "signature": ""},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"_raw": "not json"}},
    ]


def events(raw: bytes) -> list[tuple[str, dict]]:
    """Decode Anthropic SSE: (event name, data) pairs, the name checked against data.type."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def replay(stream: at.MessageStream, name: str) -> bytes:
    raw = stream.start()
    decoder = SSEDecoder()
    for payload in decoder.feed((__import__("pathlib").Path(__file__).parent / "payloads"
                                 / name).read_bytes()):
        if payload == "[DONE]":
            break
        raw += stream.feed(json.loads(payload))
    return raw + stream.finish()


def test_stream_event_order_text() -> None:
    # recorded: llama-server's /v1/chat/completions stream for SmolLM2 (include_usage)
    evs = events(replay(at.MessageStream("smol", "msg_1"), "chat_stream.sse"))
    names = [n for n, _ in evs]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["id"] == "msg_1" and start["model"] == "smol" and start["content"] == []
    assert evs[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text.strip()
    delta = evs[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert delta["usage"]["output_tokens"] > 0 and delta["usage"]["input_tokens"] > 0


def test_stream_thinking_text_and_tools_in_order() -> None:
    s = at.MessageStream("m")
    raw = s.start()
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "reasoning_content": "think"}}]},
        {"choices": [{"delta": {"reasoning_content": "ing"}}]},
        {"choices": [{"delta": {"content": "I'll call it."}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                "function": {"name": "f", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 1, "id": "call_b",
                                                "function": {"name": "g", "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 11}},
    ]
    for c in chunks:
        raw += s.feed(c)
    evs = events(raw + s.finish())
    seq = [(n, d.get("index"), (d.get("content_block") or d.get("delta") or {}).get("type"))
           for n, d in evs]
    assert seq == [
        ("message_start", None, None),
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"), ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"), ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    tool = evs[8][1]["content_block"]
    assert tool == {"type": "tool_use", "id": "call_a", "name": "f", "input": {}}
    assert "".join(d["delta"]["partial_json"] for n, d in evs[9:11]) == '{"a":1}'
    assert evs[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert evs[-2][1]["usage"]["output_tokens"] == 11


def test_error_event_shape() -> None:
    assert events(at.error_event("engine died")) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "engine died"}})]
    assert at.error_object("not_found_error", "no") == {
        "type": "error", "error": {"type": "not_found_error", "message": "no"}}


def test_a_system_role_message_is_folded_into_the_one_system_message():
    # Claude Code 2.1 sends context as {"role": "system"} inside `messages` (recorded, cut
    # down: tests/api/payloads/claude_code_2_1.json)
    out = at.count_request({"system": [{"type": "text", "text": "You are an agent."}],
                         "messages": [{"role": "user", "content": "Say hello."},
                                      {"role": "system", "content": "Agent types: claude."},
                                      {"role": "system", "content": [
                                          {"type": "text", "text": "More context."}]}]})
    assert out["messages"] == [
        {"role": "system", "content": "You are an agent.\n\nAgent types: claude.\n\nMore context."},
        {"role": "user", "content": "Say hello."}]


def test_claude_code_first_request_translates():
    # recorded from Claude Code 2.1.197 (`claude -p "Say hello."`), texts cut
    from pathlib import Path
    body = json.loads((Path(__file__).parent / "payloads/claude_code_2_1.json").read_text())
    out = at.messages_request(body)
    roles = [m["role"] for m in out["messages"]]
    assert roles[0] == "system" and "system" not in roles[1:]
    assert {t["function"]["name"] for t in out.get("tools", [])} == {"Bash", "Read"}
    assert out["max_tokens"] == body["max_tokens"] and out["stream"] is True
