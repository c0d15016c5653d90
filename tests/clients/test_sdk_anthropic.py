"""The official `anthropic` SDK, unchanged, against a live routerd serving the real SmolLM2 on
llama-server and on routerd's llama-cpp-python worker."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.conftest import MOON, Daemon

BACKENDS = ["smollm2", "smollm2-lcp"]
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
T0 = {"temperature": 0}  # this SDK version has no temperature argument; the API does

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", timeout=120,
                               max_retries=0)


@pytest.mark.parametrize("model", BACKENDS)
def test_create(client: anthropic.Anthropic, model: str) -> None:
    r = client.messages.create(model=model, max_tokens=24, extra_body=T0,
                               system="Answer in one sentence.",
                               messages=[{"role": "user", "content": MOON}])
    assert r.type == "message" and r.role == "assistant" and r.model == model
    assert r.content[0].type == "text" and "Armstrong" in r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24
    assert r.id.startswith("msg_")


def test_alias_is_answered_with_its_own_name(client: anthropic.Anthropic) -> None:
    r = client.messages.create(model="smol", max_tokens=4, messages=[{"role": "user",
                                                                      "content": "hi"}])
    assert r.model == "smol"


@pytest.mark.parametrize("model", BACKENDS)
def test_stream(client: anthropic.Anthropic, model: str) -> None:
    kinds = []
    with client.messages.stream(model=model, max_tokens=24, extra_body=T0,
                                messages=[{"role": "user", "content": MOON}]) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds.index("message_delta") == len(kinds) - 2
    assert "Armstrong" in final.content[0].text
    assert final.usage.output_tokens > 0 and final.stop_reason in ("end_turn", "max_tokens")


@pytest.mark.parametrize("model", BACKENDS)
@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_forced_tool_choice(client: anthropic.Anthropic, model: str, choice: dict) -> None:
    r = client.messages.create(model=model, max_tokens=64, extra_body=T0, tools=[WEATHER],
                               tool_choice=choice, messages=ASK)  # type: ignore[arg-type]
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict)
    assert isinstance(use.input.get("city"), str)


@pytest.mark.parametrize("model", BACKENDS)
def test_forced_tool_streamed_and_answered(client: anthropic.Anthropic, model: str) -> None:
    with client.messages.stream(model=model, max_tokens=64, extra_body=T0, tools=[WEATHER],
                                tool_choice={"type": "any"}, messages=ASK) as stream:
        final = stream.get_final_message()
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and "city" in use.input  # type: ignore[operator]
    # the tool's answer goes back as a tool_result; the model answers in text
    r = client.messages.create(model=model, max_tokens=24, extra_body=T0, tools=[WEATHER],
                               messages=[*ASK, {"role": "assistant", "content": final.content},
                                         {"role": "user", "content": [
                                             {"type": "tool_result", "tool_use_id": use.id,
                                              "content": "18 degrees and sunny"}]}])
    assert r.content and r.stop_reason in ("end_turn", "max_tokens", "tool_use")


@pytest.mark.parametrize("model", BACKENDS)
def test_count_tokens_matches_usage(client: anthropic.Anthropic, model: str) -> None:
    msgs = [{"role": "user", "content": MOON}]
    counted = client.messages.count_tokens(model=model, messages=msgs)  # type: ignore[arg-type]
    r = client.messages.create(model=model, max_tokens=2, messages=msgs)  # type: ignore[arg-type]
    assert counted.input_tokens == r.usage.input_tokens > 0


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, daemon: Daemon) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    raw = httpx.post(daemon.base_url + "/v1/messages", json={"model": "smollm2", "messages": ASK},
                     headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert raw.status_code == 400
    assert raw.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "max_tokens: must be an integer >= 1, got null"}}
    bad = httpx.post(daemon.base_url + "/v1/messages", content=b"{nope",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", BACKENDS)
def test_image_rejected_or_accepted(client: anthropic.Anthropic, model: str) -> None:
    """SmolLM2 has no vision projector: the engine's refusal comes back as a 4xx in
    Anthropic's shape, never a 5xx or a silent answer that ignores the image."""
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
           "RU5ErkJggg==")
    with pytest.raises(anthropic.APIStatusError) as e:
        client.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png}},
            {"type": "text", "text": "What is this?"}]}])
    assert 400 <= e.value.status_code < 500
    assert e.value.body["type"] == "error"  # type: ignore[index]
