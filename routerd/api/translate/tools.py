"""Forced tool choice by constrained decoding, in the engines' OpenAI chat vocabulary (pure).

A request that must call a tool (`tool_choice` "required", or a named function) cannot rely on
the engine: llama-server ignores a named `tool_choice` and, with a chat template that has no
tool syntax (SmolLM2's), answers plain text even for "required"; llama-cpp-python honours only
a named function. So routerd rewrites such a request itself:

    force = forced_choice(body)              # None: the engine's own parsing decides ("auto")
    engine_body = enforce(body, force)       # no `tools`; a `response_format` JSON schema
    reply = forced_reply(engine_reply, force)  # the JSON answer -> a proper `tool_calls` reply

The schema is built from the tools' parameter schemas: one tool -> its parameters (the name is
known); several -> `anyOf` of `{"name": const, "arguments": parameters}`. Both engines turn a
`response_format` JSON schema into a grammar, so the answer always parses as the call.
`reply_chunks` replays a whole reply as stream chunks, so a forced call streams in every
dialect through the same stream converters (the call arrives whole, in one chunk).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from routerd.api.translate.fields import json_type
from routerd.errors import BadRequest

__all__ = ["ToolForce", "enforce", "forced_choice", "forced_reply", "new_call_id",
           "reply_chunks", "system_first", "tool_schema"]

_COMPACT = (",", ":")


@dataclass(frozen=True)
class ToolForce:
    """A tool call the answer must be: `names` are the tools it may call, in request order."""

    names: tuple[str, ...]
    schema: dict[str, Any]
    instruction: str

    @property
    def single(self) -> bool:
        return len(self.names) == 1


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _function(tool: Any, i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRequest(f"tools[{i}].function.name must be a non-empty string")
    return fn


def tool_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    """A function's parameter schema; an absent or empty one means any object."""
    params = fn.get("parameters")
    if not isinstance(params, dict) or not params:
        return {"type": "object"}
    return dict(params)


def _chosen_name(choice: Mapping[str, Any]) -> str:
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest('"tool_choice" must name a function: {"type": "function", '
                         '"function": {"name": ...}}')
    return name


def forced_choice(body: Mapping[str, Any]) -> ToolForce | None:
    """The forced call an OpenAI chat body asks for, or None ("auto", "none", no tools)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice is None or choice in ("auto", "none"):
        return None
    if not isinstance(tools, list):
        raise BadRequest(f'"tools" must be an array, got {json_type(tools)}')
    fns = [_function(t, i) for i, t in enumerate(tools)]
    if choice == "required":
        chosen = fns
    elif isinstance(choice, dict) and choice.get("type") in ("function", None):
        name = _chosen_name(choice)
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise BadRequest(f'"tool_choice" names {name!r}, which is not in "tools"')
    else:
        raise BadRequest('"tool_choice" must be "auto", "none", "required" or a named function')
    return _force(chosen)


def _force(fns: list[dict[str, Any]]) -> ToolForce:
    described = [{"name": f["name"], "description": f.get("description") or "",
                  "parameters": tool_schema(f)} for f in fns]
    listing = json.dumps(described, ensure_ascii=False)
    if len(fns) == 1:
        fn = fns[0]
        return ToolForce(
            names=(fn["name"],), schema=tool_schema(fn),
            instruction=(f"Call the tool {fn['name']!r} now. Answer only with its arguments, "
                         f"a JSON object matching its parameters. The tool: {listing}"))
    variants = [{"type": "object",
                 "properties": {"name": {"const": f["name"]}, "arguments": tool_schema(f)},
                 "required": ["name", "arguments"]} for f in fns]
    return ToolForce(
        names=tuple(f["name"] for f in fns), schema={"anyOf": variants},
        instruction=("Call one of these tools now. Answer only with a JSON object "
                     '{"name": <tool name>, "arguments": <its arguments>}. '
                     f"The tools: {listing}"))


def enforce(body: Mapping[str, Any], force: ToolForce) -> dict[str, Any]:
    """The engine body for a forced call: tools described in a system message, the answer
    constrained to the call's JSON schema, no `tools` (so no template parsing interferes)."""
    out = {k: v for k, v in body.items()
           if k not in ("tools", "tool_choice", "parallel_tool_calls", "response_format")}
    messages = list(body.get("messages") or [])
    messages.append({"role": "system", "content": force.instruction})
    out["messages"] = system_first(messages)
    out["response_format"] = {"type": "json_schema",
                              "json_schema": {"name": "tool_call", "schema": force.schema}}
    return out


def system_first(messages: list[Any]) -> list[Any]:
    """Fold every system message into one, first: many chat templates accept no other."""
    systems = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
    if len(systems) <= 1 and (not systems or messages[0] is systems[0]):
        return messages
    text = "\n\n".join(_text(m.get("content")) for m in systems)
    rest = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    return [{"role": "system", "content": text}, *rest]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _call_of(text: str, force: ToolForce) -> tuple[str, str]:
    """The (name, arguments JSON) the constrained answer spells."""
    try:
        value = json.loads(text)
    except ValueError:
        return force.names[0], text  # cut short (max_tokens): the text as it came
    if force.single:
        return force.names[0], json.dumps(value, ensure_ascii=False, separators=_COMPACT)
    if isinstance(value, dict) and value.get("name") in force.names:
        args = value.get("arguments", {})
        return value["name"], json.dumps(args, ensure_ascii=False, separators=_COMPACT)
    return force.names[0], text


def forced_reply(reply: Mapping[str, Any], force: ToolForce,
                 call_id: str | None = None) -> dict[str, Any]:
    """An engine chat reply to an `enforce`d body -> the same reply holding the tool call."""
    choices = reply.get("choices")
    if not choices or not isinstance(choices[0], dict):
        return dict(reply)
    choice = choices[0]
    msg = choice.get("message") or {}
    name, args = _call_of(msg.get("content") or "", force)
    call = {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": args}}
    new_msg = {"role": "assistant", "content": None, "tool_calls": [call]}
    if msg.get("reasoning_content"):
        new_msg["reasoning_content"] = msg["reasoning_content"]
    finish = choice.get("finish_reason")
    new_choice = {**choice, "message": new_msg,
                  "finish_reason": "length" if finish == "length" else "tool_calls"}
    return {**reply, "choices": [new_choice, *choices[1:]]}


def reply_chunks(reply: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole chat reply as the stream chunks an engine would have sent (usage last)."""
    base = {k: reply[k] for k in ("id", "created", "model") if k in reply}
    base["object"] = "chat.completion.chunk"
    choices = reply.get("choices") or [{}]
    choice = choices[0]
    msg = choice.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant"}
    if msg.get("reasoning_content"):
        delta["reasoning_content"] = msg["reasoning_content"]
    if msg.get("content"):
        delta["content"] = msg["content"]
    if msg.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]
    out = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
           {**base, "choices": [{"index": 0, "delta": {},
                                 "finish_reason": choice.get("finish_reason") or "stop"}]}]
    if reply.get("usage") or reply.get("timings"):
        last = {**base, "choices": []}
        for key in ("usage", "timings"):
            if reply.get(key):
                last[key] = reply[key]
        out.append(last)
    return out
