"""The official `openai` SDK's Responses API, unchanged, against a live routerd serving the real
SmolLM2 on llama-server and on routerd's llama-cpp-python worker: create, stream, tools,
json_schema, and state kept by routerd (previous_response_id, GET, DELETE, a restart)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import MOON, Daemon

BACKENDS = ["smollm2", "smollm2-lcp"]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

pytestmark = pytest.mark.timeout(300)


def client_for(d: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.base_url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def ai(daemon: Daemon) -> openai.OpenAI:
    return client_for(daemon)


@pytest.mark.parametrize("model", BACKENDS)
def test_create_and_stream(ai: openai.OpenAI, model: str) -> None:
    r = ai.responses.create(model=model, input=MOON, max_output_tokens=24, temperature=0,
                            instructions="Answer in one sentence.")
    assert r.object == "response" and r.model == model and r.status in ("completed",
                                                                          "incomplete")
    assert "Armstrong" in r.output_text and r.usage and r.usage.output_tokens > 0
    with ai.responses.stream(model=model, input=MOON, max_output_tokens=24,
                             temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    # cut at max_output_tokens, as here, OpenAI ends with response.incomplete
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.done" in kinds and "response.output_item.done" in kinds
    final = events[-1].response  # type: ignore[union-attr]
    assert "Armstrong" in final.output_text and final.model == model


@pytest.mark.parametrize("model", BACKENDS)
def test_forced_tool_call(ai: openai.OpenAI, model: str) -> None:
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = ai.responses.create(model=model, input="What is the weather in Paris?",
                                tools=[WEATHER], tool_choice=choice,  # type: ignore[arg-type]
                                max_output_tokens=64, temperature=0)
        [call] = [i for i in r.output if i.type == "function_call"]
        assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    # streamed, then answered with its output
    with ai.responses.stream(model=model, input="Weather in Oslo?", tools=[WEATHER],
                             tool_choice="required", max_output_tokens=64) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    [call] = [i for i in final.output if i.type == "function_call"]
    nxt = ai.responses.create(model=model, previous_response_id=final.id, max_output_tokens=16,
                              input=[{"type": "function_call_output", "call_id": call.call_id,
                                      "output": "-3 C, snow"}])
    assert nxt.status in ("completed", "incomplete") and nxt.previous_response_id == final.id


@pytest.mark.parametrize("model", BACKENDS)
def test_json_schema_output_validates(ai: openai.OpenAI, model: str) -> None:
    r = ai.responses.create(model=model, input="Invent a person: give a name and an age.",
                            max_output_tokens=64, temperature=0,
                            text={"format": {"type": "json_schema", "name": "person",
                                             "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_previous_response_id_get_delete(ai: openai.OpenAI) -> None:
    r1 = ai.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=8)
    r2 = ai.responses.create(model="smollm2", input="What is my name?", max_output_tokens=8,
                             previous_response_id=r1.id)
    alone = ai.responses.create(model="smollm2", input="What is my name?", max_output_tokens=8)
    assert r2.previous_response_id == r1.id
    assert r2.usage and alone.usage and r1.usage
    # the second turn's prompt holds the first turn (its input and its answer)
    assert r2.usage.input_tokens > alone.usage.input_tokens + r1.usage.output_tokens
    got = ai.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    counted = ai.responses.input_tokens.count(model="smollm2", input="What is my name?",
                                              previous_response_id=r1.id)
    assert counted.input_tokens == r2.usage.input_tokens
    ai.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        ai.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError) as e:
        ai.responses.create(model="smollm2", input="x", previous_response_id=r1.id)
    assert e.value.body["message"] == f"Response with id '{r1.id}' not found."  # type: ignore[index]


def test_store_false_keeps_nothing(ai: openai.OpenAI) -> None:
    r = ai.responses.create(model="smollm2", input="hi", max_output_tokens=4, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        ai.responses.retrieve(r.id)


def test_state_survives_a_restart(tmp_path: Path, model_path: Path) -> None:
    config = {"models": {"smollm2": {"model": str(model_path), "backend": "llama-server",
                                     "ctx_size": 2048}}}
    first = Daemon(config, tmp_path)
    try:
        r1 = client_for(first).responses.create(model="smollm2", input="My name is Ada.",
                                                max_output_tokens=8, temperature=0)
    finally:
        assert first.stop() == 0
    second = Daemon(config, tmp_path)
    try:
        ai = client_for(second)
        assert ai.responses.retrieve(r1.id).output_text == r1.output_text
        r2 = ai.responses.create(model="smollm2", input="What is my name?",
                                 previous_response_id=r1.id, max_output_tokens=8)
        assert r2.status in ("completed", "incomplete") and r2.previous_response_id == r1.id
    finally:
        assert second.stop() == 0
