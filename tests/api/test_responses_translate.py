"""OpenAI Responses <-> chat completions: input items, replies, and the stream's event order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routerd.api.translate import responses as rt
from routerd.api.translate.sse import SSEDecoder
from routerd.errors import BadRequest

PAYLOADS = Path(__file__).parent / "payloads"

# What Codex CLI / the openai SDK send for a tool round trip (stateless, store false).
CODEX_BODY = {
    "model": "smollm2", "instructions": "You are a coding agent.", "store": False,
    "stream": True, "parallel_tool_calls": False, "tool_choice": "auto",
    "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
    "input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "<env>cwd=/x</env>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xx"},
        {"type": "function_call", "name": "shell", "arguments": '{"command":["ls"]}',
         "call_id": "call_1"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.py\nb.py"},
    ],
    "tools": [{"type": "function", "name": "shell", "description": "Run a command",
               "strict": False, "parameters": {"type": "object", "properties": {
                   "command": {"type": "array", "items": {"type": "string"}}}}},
              {"type": "web_search"}],
}


def test_input_items_and_request() -> None:
    turn = rt.input_messages(CODEX_BODY)
    assert turn == [
        {"role": "system", "content": "<env>cwd=/x</env>"},
        {"role": "user", "content": "ls"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "shell", "arguments": '{"command":["ls"]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.py\nb.py"},
    ]
    out = rt.responses_request(CODEX_BODY, turn)
    assert out["messages"][0] == {"role": "system", "content": "You are a coding agent."}
    assert out["messages"][1:] == turn
    assert out["tools"] == [{"type": "function", "function": {
        "name": "shell", "description": "Run a command",
        "parameters": CODEX_BODY["tools"][0]["parameters"]}}]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is False
    assert out["reasoning_effort"] == "low"
    assert out["stream"] and out["stream_options"] == {"include_usage": True}


def test_string_input_format_and_limits() -> None:
    body = {"model": "m", "input": "hi", "max_output_tokens": 16, "temperature": 0.2,
            "text": {"format": {"type": "json_schema", "name": "person", "strict": True,
                                "schema": {"type": "object",
                                           "properties": {"name": {"type": "string"}}}}},
            "tool_choice": {"type": "function", "name": "f"},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    out = rt.responses_request(body, rt.input_messages(body))
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    assert out["max_tokens"] == 16 and out["temperature"] == 0.2 and out["stream"] is False
    assert out["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "person", "schema": body["text"]["format"]["schema"], "strict": True}}
    assert out["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    obj = rt.responses_request({"input": "x", "text": {"format": {"type": "json_object"}}},
                               [{"role": "user", "content": "x"}])
    assert obj["response_format"] == {"type": "json_object"}


def test_image_parts_stay_parts() -> None:
    body = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBO"}]}]}
    assert rt.input_messages(body) == [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]


@pytest.mark.parametrize("bad,match", [
    ({"input": 3}, "input"), ({"input": [{"role": "robot", "content": "x"}]}, "role"),
    ({"input": [{"type": "computer_call"}]}, "computer_call"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "format"),
    ({"input": "x", "tool_choice": 5}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "file_id"),
])
def test_bad_requests(bad: dict, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        rt.responses_request(bad, rt.input_messages(bad))


def test_no_input_at_all() -> None:
    with pytest.raises(BadRequest, match="input"):
        rt.responses_request({}, [])


def test_reply_to_response_object() -> None:
    reply = json.loads((PAYLOADS / "chat_reply.json").read_text())  # recorded, llama-server
    echo = rt.Echo("smol", {"input": "hi", "temperature": 0, "store": True})
    obj = rt.response_object(reply, echo)
    assert obj["id"] == echo.id and obj["id"].startswith("resp_") and obj["object"] == "response"
    assert obj["model"] == "smol" and obj["store"] is True and obj["temperature"] == 0
    finish = reply["choices"][0]["finish_reason"]
    assert obj["status"] == ("incomplete" if finish == "length" else "completed")
    [item] = obj["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["text"] == reply["choices"][0]["message"]["content"]
    assert obj["usage"]["input_tokens"] == reply["usage"]["prompt_tokens"]
    assert obj["usage"]["total_tokens"] == (reply["usage"]["prompt_tokens"]
                                            + reply["usage"]["completion_tokens"])


def test_tool_reply_and_history() -> None:
    reply = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "shell", "arguments": '{"command":["ls"]}'}}]}}]}
    obj = rt.response_object(reply, rt.Echo("m"))
    [item] = obj["output"]
    assert item["type"] == "function_call" and item["call_id"] == "call_9"
    assert item["id"].startswith("fc_") and item["arguments"] == '{"command":["ls"]}'
    history = rt.output_messages(obj["output"])
    assert history[0]["tool_calls"][0]["id"] == "call_9" and history[0]["content"] == ""
    # the next turn answers the call; the request body carries no private marker
    nxt = {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "ok"}]}
    out = rt.responses_request(nxt, history + rt.input_messages(nxt))
    assert [m["role"] for m in out["messages"]] == ["assistant", "tool"]
    assert all(not k.startswith("_") for m in out["messages"] for k in m)


def events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            obj = json.loads(data[6:])
            assert name == "event: " + obj["type"]
            out.append(obj)
    seq = [e["sequence_number"] for e in out]
    assert seq == list(range(seq[0], seq[0] + len(seq)))  # numbered one by one
    return out


def test_stream_event_order_text() -> None:
    stream = rt.ResponseStream(rt.Echo("smol", {"input": "hi"}))
    raw = stream.start()
    for payload in SSEDecoder().feed((PAYLOADS / "chat_stream.sse").read_bytes()):
        if payload != "[DONE]":
            raw += stream.feed(json.loads(payload))
    evs = events(raw + stream.finish())
    kinds = [e["type"] for e in evs]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"] or \
        kinds[-1] == "response.incomplete"
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    done = evs[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == text
    assert evs[-4]["text"] == text and done["usage"]["output_tokens"] > 0
    assert stream.response == done and done["model"] == "smol"


def test_stream_tool_calls() -> None:
    stream = rt.ResponseStream(rt.Echo("m"))
    raw = stream.start()
    for c in [
        {"choices": [{"delta": {"role": "assistant", "content": "Running."}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                "function": {"name": "shell", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"c":'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"ls"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
    ]:
        raw += stream.feed(c)
    evs = events(raw + stream.finish())
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    added = evs[8]
    assert added["output_index"] == 1 and added["item"]["type"] == "function_call"
    assert added["item"]["call_id"] == "call_1" and added["item"]["status"] == "in_progress"
    assert evs[11]["arguments"] == '{"c":"ls"}' and evs[11]["output_index"] == 1
    final = evs[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == '{"c":"ls"}' and final["usage"]["total_tokens"] == 11


def test_stream_limit_and_failure() -> None:
    stream = rt.ResponseStream(rt.Echo("m"))
    stream.start()
    stream.feed({"choices": [{"delta": {"content": "a"}, "finish_reason": "length"}]})
    assert events(stream.finish())[-1]["type"] == "response.incomplete"
    assert stream.response is not None and stream.response["status"] == "incomplete"
    assert stream.response["incomplete_details"] == {"reason": "max_output_tokens"}
    broken = rt.ResponseStream(rt.Echo("m"))
    broken.start()
    [ev] = [json.loads(b.split(b"data: ")[1]) for b in broken.failed("engine died").split(b"\n\n")
            if b]
    assert ev["type"] == "response.failed" and ev["response"]["status"] == "failed"
    assert ev["response"]["error"] == {"code": "server_error", "message": "engine died"}


def test_upstream_end_of_stream_rules() -> None:
    """/upstream/<model>/v1/responses ends at response.completed (no [DONE] follows);
    /v1/messages at message_stop; other paths keep the relay's default (None)."""
    from routerd.api.translate import sse

    done = rt.encode_event({"type": "response.completed", "sequence_number": 9,
                            "response": {}})
    assert sse.stream_finisher("/v1/responses") is sse.ended_responses
    assert sse.ended_responses(b"event: x\ndata: {}\n\n" + done)
    assert not sse.ended_responses(rt.encode_event({"type": "response.output_text.delta"}))
    assert sse.stream_finisher("v1/messages") is sse.ended_anthropic
    assert sse.ended_anthropic(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert not sse.ended_anthropic(b'event: ping\ndata: {"type":"ping"}\n\n')
    assert sse.stream_finisher("/v1/chat/completions") is None
