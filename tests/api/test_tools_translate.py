"""Forced tool choice: the schema built from the tools, the engine body, the reply rebuilt."""

from __future__ import annotations

import json

import pytest

from routerd.api.translate import tools as tt
from routerd.errors import BadRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {}}}


def body(choice: object, *tools: dict) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Weather in Paris?"}],
            "tools": list(tools) or [WEATHER, TIME], "tool_choice": choice}


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_not_forced(choice: object) -> None:
    assert tt.forced_choice(body(choice)) is None
    assert tt.forced_choice({"messages": [], "tool_choice": "required"}) is None  # no tools


def test_named_tool_schema_is_its_parameters() -> None:
    force = tt.forced_choice(body({"type": "function", "function": {"name": "get_weather"}}))
    assert force is not None and force.names == ("get_weather",) and force.single
    assert force.schema == WEATHER["function"]["parameters"]
    # Responses' flat spelling names it too
    flat = tt.forced_choice(body({"type": "function", "name": "get_time"}))
    assert flat is not None and flat.schema == {"type": "object"}  # empty = any object


def test_required_with_several_tools_is_any_of_name_and_arguments() -> None:
    force = tt.forced_choice(body("required"))
    assert force is not None and force.names == ("get_weather", "get_time")
    variants = force.schema["anyOf"]
    assert [v["properties"]["name"] for v in variants] == [{"const": "get_weather"},
                                                           {"const": "get_time"}]
    assert variants[0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert all(v["required"] == ["name", "arguments"] for v in variants)


def test_bad_choices() -> None:
    with pytest.raises(BadRequest, match="not in"):
        tt.forced_choice(body({"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(BadRequest):
        tt.forced_choice(body("sometimes"))
    with pytest.raises(BadRequest, match="name"):
        tt.forced_choice({"tools": [{"type": "function", "function": {}}],
                          "tool_choice": "required"})


def test_enforce_drops_tools_and_constrains_the_answer() -> None:
    b = body("required")
    b["parallel_tool_calls"] = True
    force = tt.forced_choice(b)
    assert force is not None
    out = tt.enforce(b, force)
    assert "tools" not in out and "tool_choice" not in out and "parallel_tool_calls" not in out
    assert out["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "tool_call", "schema": force.schema}}
    # one system message, first: the request's and the instruction folded together
    systems = [m for m in out["messages"] if m["role"] == "system"]
    assert len(systems) == 1 and out["messages"][0] == systems[0]
    assert systems[0]["content"].startswith("Be brief.") and "get_weather" in systems[0]["content"]
    assert out["messages"][-1] == {"role": "user", "content": "Weather in Paris?"}
    assert b["tools"]  # the caller's body is not changed


def reply(content: str, finish: str = "stop") -> dict:
    # the shape llama-server answers (recorded: tests/api/payloads/chat_json_schema.json)
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "smollm2",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
            "timings": {"prompt_n": 50, "predicted_n": 7}}


def test_forced_reply_single_tool() -> None:
    force = tt.forced_choice(body({"type": "function", "function": {"name": "get_weather"}}))
    assert force is not None
    out = tt.forced_reply(reply('{ "city" : "Paris" }'), force, call_id="call_x")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert out["usage"]["completion_tokens"] == 7


def test_forced_reply_several_tools_picks_the_named_one() -> None:
    force = tt.forced_choice(body("required"))
    assert force is not None
    out = tt.forced_reply(reply('{"name": "get_time", "arguments": {"tz": "UTC"}}'), force)
    fn = out["choices"][0]["message"]["tool_calls"][0]["function"]
    assert fn == {"name": "get_time", "arguments": '{"tz":"UTC"}'}
    assert out["choices"][0]["message"]["tool_calls"][0]["id"].startswith("call_")


def test_forced_reply_cut_short_keeps_the_text_and_length() -> None:
    force = tt.forced_choice(body({"type": "function", "function": {"name": "get_weather"}}))
    assert force is not None
    out = tt.forced_reply(reply('{"city": "Pa', "length"), force)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Pa'


def test_reply_chunks_replays_a_reply_as_a_stream() -> None:
    force = tt.forced_choice(body("required"))
    assert force is not None
    out = tt.forced_reply(reply('{"name": "get_weather", "arguments": {"city": "Oslo"}}'), force,
                          call_id="call_1")
    chunks = tt.reply_chunks(out)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    first = chunks[0]["choices"][0]["delta"]
    assert first["tool_calls"] == [{"index": 0, "id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["prompt_tokens"] == 50
    text = tt.reply_chunks(reply("hi"))
    assert text[0]["choices"][0]["delta"] == {"role": "assistant", "content": "hi"}
    assert json.dumps(text)  # plain JSON all through
