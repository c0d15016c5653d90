"""Tools and structured output through the OpenAI and Ollama dialects, with the official
`openai` and `ollama` SDKs against a live routerd (SmolLM2 on llama-server and on routerd's
llama-cpp-python worker). A forced tool choice always comes back as a tool call (routerd
constrains the answer to the tools' schemas); the model name is the one asked for."""

from __future__ import annotations

import json

import jsonschema
import httpx
import ollama
import openai
import pytest

from tests.conftest import Daemon

BACKENDS = ["smollm2", "smollm2-lcp"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ai(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def oc(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.base_url, timeout=120)


@pytest.mark.parametrize("model", BACKENDS)
@pytest.mark.parametrize("choice", ["required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_forced_tool_call(ai: openai.OpenAI, model: str, choice: object) -> None:
    r = ai.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, CLOCK],  # type: ignore
                                   tool_choice=choice, max_tokens=64, temperature=0)  # type: ignore
    assert r.choices[0].finish_reason == "tool_calls" and r.model == model
    [call] = r.choices[0].message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(args, dict) and args
    if isinstance(choice, dict):
        assert call.function.name == "get_weather" and isinstance(args["city"], str)  # type: ignore


@pytest.mark.parametrize("model", BACKENDS)
def test_openai_forced_tool_call_streamed(ai: openai.OpenAI, model: str) -> None:
    stream = ai.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore
        max_tokens=64, temperature=0, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    args = "".join(tc.function.arguments or "" for tc in calls)  # type: ignore[union-attr]
    assert isinstance(json.loads(args)["city"], str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert {c.model for c in chunks} == {model}


@pytest.mark.parametrize("model", BACKENDS)
def test_openai_json_schema(ai: openai.OpenAI, model: str) -> None:
    r = ai.chat.completions.create(
        model=model, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)


def test_openai_alias_answers_with_the_name_asked_for(ai: openai.OpenAI) -> None:
    r = ai.chat.completions.create(model="smol", messages=ASK, max_tokens=4)
    assert r.model == "smol"
    chunks = list(ai.chat.completions.create(model="smol", messages=ASK, max_tokens=4,
                                             stream=True))
    assert {c.model for c in chunks} == {"smol"}
    # llama-server's completions answer with the engine's own name: routerd renames
    done = ai.completions.create(model="smol", prompt="Hello", max_tokens=3)
    assert done.model == "smol"
    parts = list(ai.completions.create(model="smol", prompt="Hello", max_tokens=3, stream=True))
    assert parts and {c.model for c in parts} == {"smol"}
    assert ai.completions.create(model="smollm2", prompt="Hello", max_tokens=2).model == "smollm2"
    assert ai.models.retrieve("smol").id == "smol"
    caps = ai.models.retrieve("smollm2").model_extra["capabilities"]  # type: ignore[index]
    assert "completion" in caps
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("no-such-model")


@pytest.mark.parametrize("model", BACKENDS)
def test_ollama_format_schema(oc: ollama.Client, model: str) -> None:
    r = oc.chat(model=model, format=PERSON, options={"temperature": 0, "num_predict": 64},
                messages=[{"role": "user", "content": "Invent a person with a name and an age."}])
    jsonschema.validate(json.loads(r.message.content or ""), PERSON)


def test_ollama_capabilities_are_honest(oc: ollama.Client) -> None:
    """SmolLM2's chat template has no tool or reasoning syntax: Ollama's 400s, not a silent
    plain answer."""
    caps = oc.show("smollm2").capabilities or []
    assert "completion" in caps and "embedding" in caps
    assert "tools" not in caps and "thinking" not in caps
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="smollm2", messages=ASK, tools=[WEATHER])  # type: ignore[list-item]
    assert e.value.status_code == 400 and e.value.error == "smollm2 does not support tools"
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="smollm2", messages=ASK, think=True)
    assert e.value.status_code == 400 and e.value.error == '"smollm2" does not support thinking'


def test_ollama_embed_truncates_unless_told_not_to(daemon: Daemon, oc: ollama.Client) -> None:
    long = "word " * 3000  # past llama-server's 512-token batch for one embedding input
    whole = oc.embed(model="smollm2", input=[long, "short"])  # Ollama's default: truncate
    assert len(whole.embeddings) == 2 and all(len(v) > 0 for v in whole.embeddings)
    tokens = daemon.post("/tokenize", {"model": "smollm2", "content": long,
                                       "add_special": True})["tokens"]
    cut = daemon.post("/v1/embeddings", {"model": "smollm2", "input": [tokens[:512]]})
    first = cut["data"][0]["embedding"]
    norm = sum(x * x for x in first) ** 0.5
    assert max(abs(a - b / norm) for a, b in zip(whole.embeddings[0], first)) < 1e-4
    with pytest.raises(ollama.ResponseError) as e:
        oc.embed(model="smollm2", input=long, truncate=False)
    assert e.value.status_code == 400 and "512 tokens" in e.value.error


def test_ollama_chat_truncate_drops_the_oldest_history(daemon: Daemon) -> None:
    # the daemon's smollm2: ctx_size 2048 over 2 slots = 1024 tokens per slot. The ollama
    # SDK has no `truncate` on chat: the body as Ollama's API documents it, sent raw
    old = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"note {i}: " + "cat " * 250}
           for i in range(6)]
    body = {"model": "smollm2", "stream": False, "options": {"num_predict": 4, "temperature": 0},
            "messages": [{"role": "system", "content": "You are brief."}, *old,
                         {"role": "user", "content": "Say hello."}]}
    r = httpx.post(daemon.base_url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 400 and "context" in r.json()["error"]  # the default: never a cut
    r = httpx.post(daemon.base_url + "/api/chat", json={**body, "truncate": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert 0 < r.json()["prompt_eval_count"] <= 1024 - 4
    r = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        **body, "truncate": True, "messages": [{"role": "user", "content": "cat " * 3000}]})
    assert r.status_code == 400 and "even with the history truncated" in r.json()["error"]


def test_prompt_longer_than_context_is_an_error(daemon: Daemon, ai: openai.OpenAI) -> None:
    long = "word " * 3000  # the daemon's models have ctx_size 2048
    for model in BACKENDS:
        with pytest.raises(openai.BadRequestError) as e:
            ai.chat.completions.create(model=model, max_tokens=4,
                                       messages=[{"role": "user", "content": long}])
        assert "context" in str(e.value.message).lower()
