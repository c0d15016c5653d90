"""Ollama request -> OpenAI request converters: messages, images, tools, options, defaults,
validation. Pure functions, no HTTP."""

from __future__ import annotations

import copy
import json

import pytest

from routerd.api.translate import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    INFILL_PATH,
    chat_request,
    embed_request,
    embeddings_request,
    generate_request,
    load_options,
)
from routerd.errors import BadRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
JPEG = "/9j/4AAQSkZJRgABAQEASABIAAD"


def chat(**body):
    body.setdefault("model", "m")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return chat_request(body, {})


def bad(fn, body, *args, match: str):
    with pytest.raises(BadRequest, match=match) as info:
        fn(body, *args)
    assert info.value.status == 400
    return info.value


# --- chat: shape, stream --------------------------------------------------------------------


def test_chat_minimal_streams_by_default_with_usage():
    out = chat()
    assert out == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_chat_stream_false_has_no_stream_options():
    out = chat(stream=False)
    assert out["stream"] is False and "stream_options" not in out


def test_chat_ignores_keep_alive_and_unknown_fields():
    out = chat(keep_alive="5m", template="{{ .Prompt }}", whatever=1)
    assert set(out) == {"messages", "model", "stream", "stream_options"}


def test_chat_does_not_mutate_the_request():
    body = {"model": "m", "options": {"temperature": 1, "num_ctx": 8},
            "messages": [{"role": "user", "content": "x", "images": [PNG]},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]}
    before = copy.deepcopy(body)
    defaults = {"options": {"top_k": 3}, "system": "S"}
    defaults_before = copy.deepcopy(defaults)
    chat_request(body, defaults)
    assert body == before and defaults == defaults_before


# --- chat: messages -------------------------------------------------------------------------


def test_messages_roles_kept_and_missing_content_is_empty():
    msgs = [{"role": "system", "content": "s"}, {"role": "user"},
            {"role": "assistant", "content": None}, {"role": "tool", "content": "42"}]
    out = chat(messages=msgs)["messages"]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert [m["content"] for m in out] == ["s", "", "", "42"]


def test_images_become_data_uri_parts_images_first():
    out = chat(messages=[{"role": "user", "content": "what is it?", "images": [PNG, JPEG]}])
    assert out["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}},
        {"type": "text", "text": "what is it?"},
    ]


@pytest.mark.parametrize("b64,mime", [
    ("R0lGODlhAQAB", "image/gif"), ("UklGRiQAAABXRUJQ", "image/webp"),
    ("Qk02AAAAAAAA", "image/bmp"), ("AAAAHGZ0eXBh", "image/jpeg"),
])
def test_image_mime_sniffed_unknown_defaults_to_an_image_type(b64, mime):
    part = chat(messages=[{"role": "user", "content": "", "images": [b64]}])["messages"][0]
    assert part["content"] == [{"type": "image_url",
                                "image_url": {"url": f"data:{mime};base64,{b64}"}}]


def test_image_already_a_data_uri_is_kept():
    uri = f"data:image/png;base64,{PNG}"
    part = chat(messages=[{"role": "user", "content": "x", "images": [uri]}])["messages"][0]
    assert part["content"][0]["image_url"]["url"] == uri


def test_empty_images_list_keeps_plain_content():
    assert chat(messages=[{"role": "user", "content": "x", "images": []}])["messages"][0] == {
        "role": "user", "content": "x"}


def test_tool_calls_dict_arguments_become_json_text():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "n": 2}}},
                {"id": "abc", "function": {"name": "noop", "arguments": "{\"x\":1}"}},
                {"function": {"name": "noargs"}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather", "tool_call_id": "c1"}]
    out = chat(messages=msgs)["messages"]
    calls = out[1]["tool_calls"]
    assert calls[0] == {"id": "call_1_0", "type": "function",
                        "function": {"name": "get_weather",
                                     "arguments": '{"city":"Zürich","n":2}'}}
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich", "n": 2}
    assert calls[1] == {"id": "abc", "type": "function",
                        "function": {"name": "noop", "arguments": '{"x":1}'}}
    assert calls[2]["function"]["arguments"] == "{}"
    assert out[2] == {"role": "tool", "content": "sunny", "name": "get_weather",
                      "tool_call_id": "c1"}


def test_assistant_thinking_becomes_reasoning_content():
    out = chat(messages=[{"role": "assistant", "content": "4", "thinking": "2+2"}])
    assert out["messages"][0] == {"role": "assistant", "content": "4", "reasoning_content": "2+2"}


def test_tools_passed_through():
    tools = [{"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object"}}}]
    assert chat(tools=tools)["tools"] == tools
    assert "tools" not in chat(tools=[])


@pytest.mark.parametrize("think,expect", [
    (True, {"chat_template_kwargs": {"enable_thinking": True}}),
    (False, {"chat_template_kwargs": {"enable_thinking": False}}),
    ("high", {"reasoning_effort": "high"}),
])
def test_think(think, expect):
    out = chat(think=think)
    for key, value in expect.items():
        assert out[key] == value


# --- chat: format ---------------------------------------------------------------------------


def test_format_json_and_schema():
    assert chat(format="json")["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert chat(format=schema)["response_format"] == {  # integers need no bound (schema.py)
        "type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    assert "response_format" not in chat(format="")
    assert "response_format" not in chat(format=None)
    assert "json_schema" not in chat(format=schema)  # chat reads response_format only


# --- options --------------------------------------------------------------------------------


def test_sampling_options_mapped_under_llama_cpp_names():
    opts = {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "seed": 7,
            "num_predict": 128, "stop": ["\n\n", "User:"], "repeat_penalty": 1.1,
            "presence_penalty": 0.5, "frequency_penalty": 0.25, "typical_p": 0.95,
            "repeat_last_n": 64, "mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
            "tfs_z": 1.0, "num_keep": 4}
    out = chat(options=opts)
    expect = dict(opts)
    expect["max_tokens"] = expect.pop("num_predict")
    expect["n_keep"] = expect.pop("num_keep")
    for key, value in expect.items():
        assert out[key] == value, key
    assert "num_predict" not in out and "num_keep" not in out


def test_load_time_and_unknown_options_not_sent():
    opts = {"num_ctx": 8192, "num_gpu": 99, "num_thread": 4, "num_batch": 512, "use_mmap": False,
            "use_mlock": True, "main_gpu": 0, "low_vram": True, "numa": False, "bogus": 1,
            "penalize_newline": True}
    out = chat(options=opts)
    assert set(out) == {"messages", "model", "stream", "stream_options"}


@pytest.mark.parametrize("n,expect", [(1, 1), (300, 300), (-1, None), (-2, None), (0, None)])
def test_num_predict_limits(n, expect):
    assert chat(options={"num_predict": n}).get("max_tokens") == expect


def test_stop_string_becomes_list_and_empty_list_dropped():
    assert chat(options={"stop": "###"})["stop"] == ["###"]
    assert "stop" not in chat(options={"stop": []})


def test_integral_float_accepted_for_integer_option_and_null_skipped():
    out = chat(options={"top_k": 40.0, "seed": 3.0, "temperature": None})
    assert out["top_k"] == 40 and type(out["top_k"]) is int
    assert out["seed"] == 3 and "temperature" not in out


@pytest.mark.parametrize("opts,match", [
    ({"temperature": "hot"}, r'"temperature" must be a number, got string'),
    ({"temperature": True}, r'"temperature" must be a number, got boolean'),
    ({"top_k": 40.5}, r'"top_k" must be an integer, got number'),
    ({"num_predict": "10"}, r'"num_predict" must be an integer'),
    ({"stop": [1, 2]}, r'"options.stop" must be a string or an array of strings'),
    ({"mirostat": [1]}, r'"mirostat" must be an integer, got array'),
])
def test_ill_typed_options_rejected(opts, match):
    bad(chat_request, {"model": "m", "messages": [], "options": opts}, {}, match=match)


def test_load_options_returned_separately_and_type_checked():
    body = {"options": {"num_ctx": 8192, "num_gpu": 10.0, "use_mmap": False, "temperature": 1}}
    assert load_options(body) == {"num_ctx": 8192, "num_gpu": 10, "use_mmap": False}
    assert load_options({}) == {}
    assert load_options(body, {"options": {"num_ctx": 2048, "num_thread": 4}}) == {
        "num_ctx": 8192, "num_gpu": 10, "use_mmap": False, "num_thread": 4}
    bad(load_options, {"options": {"use_mmap": "no"}}, match=r'"use_mmap" must be a boolean')
    bad(load_options, {"options": [1]}, match=r'"options" must be an object, got array')


# --- defaults precedence --------------------------------------------------------------------


def test_request_options_override_defaults():
    defaults = {"options": {"temperature": 0.1, "top_k": 10, "stop": ["<|end|>"]}}
    out = chat_request({"model": "m", "messages": [], "options": {"temperature": 0.9}}, defaults)
    assert out["temperature"] == 0.9 and out["top_k"] == 10 and out["stop"] == ["<|end|>"]
    out = chat_request({"model": "m", "messages": []}, defaults)
    assert out["temperature"] == 0.1


def test_request_null_option_falls_back_to_nothing_not_default():
    defaults = {"options": {"temperature": 0.1}}
    out = chat_request({"messages": [], "options": {"temperature": None}}, defaults)
    assert "temperature" not in out


def test_default_system_prepended_only_without_a_system_message():
    d = {"system": "You are terse."}
    out = chat_request({"messages": [{"role": "user", "content": "hi"}]}, d)
    assert out["messages"][0] == {"role": "system", "content": "You are terse."}
    assert len(out["messages"]) == 2
    msgs = [{"role": "user", "content": "hi"}, {"role": "system", "content": "mine"}]
    out = chat_request({"messages": msgs}, d)
    assert [m["content"] for m in out["messages"]] == ["hi", "mine"]
    out = chat_request({"messages": [{"role": "user", "content": "hi"}]}, {"system": ""})
    assert len(out["messages"]) == 1


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("body,match", [
    ([], r"request body must be a JSON object, got array"),
    ({"messages": "hi"}, r'"messages" must be an array, got string'),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object, got string"),
    ({"messages": [{"content": "x"}]}, r"messages\[0\]\.role must be a non-empty string, got null"),
    ({"messages": [{"role": 1}]}, r"messages\[0\]\.role must be a non-empty string, got number"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r'"content" must be a string, got array'),
    ({"messages": [{"role": "user", "content": "", "images": "abc"}]},
     r"messages\[0\]\.images must be an array"),
    ({"messages": [{"role": "user", "content": "", "images": [3]}]},
     r"messages\[0\]\.images\[0\] must be a base64 string, got number"),
    ({"messages": [{"role": "assistant", "tool_calls": {"a": 1}}]},
     r"messages\[0\]\.tool_calls must be an array"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     r"messages\[0\]\.tool_calls\[0\]\.function\.name must be a non-empty string"),
    ({"messages": [{"role": "assistant", "tool_calls": ["f"]}]},
     r"tool_calls\[0\]\.function must be an object"),
    ({"messages": [{"role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]},
     r"function\.arguments must be an object, got array"),
    ({"messages": [], "stream": "yes"}, r'"stream" must be a boolean, got string'),
    ({"messages": [], "options": "fast"}, r'"options" must be an object, got string'),
    ({"messages": [], "tools": {"type": "function"}}, r'"tools" must be an array, got object'),
    ({"messages": [], "format": "xml"}, r'"format" must be "json" or a JSON schema object'),
    ({"messages": [], "format": 3}, r'"format" must be "json" or a JSON schema object'),
    ({"messages": [], "think": "max"}, r'"think" must be a boolean or one of'),
])
def test_chat_validation(body, match):
    bad(chat_request, body, {}, match=match)


# --- generate -------------------------------------------------------------------------------


def test_generate_templated_becomes_chat_with_system_and_user():
    path, out = generate_request({"model": "m", "prompt": "Why?", "system": "S",
                                  "options": {"temperature": 0}}, {"system": "D"})
    assert path == CHAT_PATH
    assert out["messages"] == [{"role": "system", "content": "S"},
                               {"role": "user", "content": "Why?"}]
    assert out["temperature"] == 0 and out["stream"] is True


def test_generate_default_system_used_when_request_has_none_or_empty():
    for body in ({"prompt": "p"}, {"prompt": "p", "system": ""}):
        _, out = generate_request(body, {"system": "D"})
        assert out["messages"][0] == {"role": "system", "content": "D"}
    _, out = generate_request({"prompt": "p"}, {})
    assert out["messages"] == [{"role": "user", "content": "p"}]


def test_generate_images_and_think():
    _, out = generate_request({"prompt": "describe", "images": [PNG], "think": False,
                               "stream": False}, {})
    user = out["messages"][-1]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1] == {"type": "text", "text": "describe"}
    assert out["chat_template_kwargs"] == {"enable_thinking": False}
    assert "stream_options" not in out


def test_generate_raw_is_a_completion_with_the_prompt_verbatim():
    path, out = generate_request({"model": "m", "prompt": "<s>[INST] x [/INST]", "raw": True,
                                  "system": "ignored", "format": "json",
                                  "options": {"num_predict": 5}}, {"system": "D"})
    assert path == COMPLETIONS_PATH
    assert out["prompt"] == "<s>[INST] x [/INST]" and "messages" not in out
    assert out["max_tokens"] == 5
    assert out["response_format"] == {"type": "json_object"}
    assert out["json_schema"] == {"type": "object"}  # llama-server's completions read this


def test_generate_suffix_goes_to_native_infill():
    schema = {"type": "object", "properties": {}}
    path, out = generate_request({"prompt": "def f(", "suffix": "\n    return x",
                                  "options": {"temperature": 0.0}, "format": schema}, {})
    assert path == INFILL_PATH
    assert out["input_prefix"] == "def f(" and out["input_suffix"] == "\n    return x"
    assert out["prompt"] == "" and out["temperature"] == 0.0
    assert out["json_schema"] == schema


@pytest.mark.parametrize("body,match", [
    ({"prompt": 3}, r'"prompt" must be a string, got number'),
    ({"prompt": "x", "raw": "true"}, r'"raw" must be a boolean'),
    ({"prompt": "x", "suffix": ["y"]}, r'"suffix" must be a string'),
    ({"prompt": "x", "system": {}}, r'"system" must be a string'),
    ({"prompt": "x", "images": PNG}, r'"images" must be an array, got string'),
    ({"prompt": "x", "images": [PNG], "raw": True}, r'"images" cannot be used with "raw"'),
    ({"prompt": "x", "stream": 1}, r'"stream" must be a boolean, got number'),
    ({"prompt": "x", "options": {"seed": "1"}}, r'"seed" must be an integer'),
    ("prompt", r"request body must be a JSON object"),
])
def test_generate_validation(body, match):
    bad(generate_request, body, {}, match=match)


# --- embeddings -----------------------------------------------------------------------------


def test_embed_input_string_list_and_missing():
    assert embed_request({"model": "e", "input": "hello"}) == {
        "input": ["hello"], "encoding_format": "float", "model": "e"}
    assert embed_request({"model": "e", "input": ["a", "b"]})["input"] == ["a", "b"]
    assert embed_request({"model": "e"})["input"] == []
    out = embed_request({"model": "e", "input": "x", "truncate": False, "dimensions": 64})
    assert out["dimensions"] == 64 and "truncate" not in out


@pytest.mark.parametrize("body,match", [
    ({"input": 3}, r'"input" must be a string or an array of strings, got number'),
    ({"input": ["a", 1]}, r'"input" must be a string or an array of strings'),
    ({"input": "a", "truncate": "yes"}, r'"truncate" must be a boolean'),
    ({"input": "a", "dimensions": 0}, r'"dimensions" must be a positive integer'),
    ({"input": "a", "dimensions": "8"}, r'"dimensions" must be a positive integer, got string'),
    ({"input": "a", "dimensions": True}, r'"dimensions" must be a positive integer'),
])
def test_embed_validation(body, match):
    bad(embed_request, body, match=match)


def test_legacy_embeddings_prompt():
    assert embeddings_request({"model": "e", "prompt": "hi"}) == {
        "input": ["hi"], "encoding_format": "float", "model": "e"}
    assert embeddings_request({"model": "e"})["input"] == []
    bad(embeddings_request, {"prompt": ["hi"]}, match=r'"prompt" must be a string, got array')


def test_embed_token_limit_is_the_batch_or_the_slot_context():
    from routerd.api.translate.ollama import embed_token_limit
    from routerd.workers.backends import LaunchSpec

    def spec(**kw):
        return LaunchSpec(model="m", path="m.gguf", backend=kw.pop("backend", "llama-server"),
                          **kw)
    assert embed_token_limit(spec(ctx_size=4096, parallel=2)) == 512
    assert embed_token_limit(spec(ctx_size=4096, args=("-ub", "2048"))) == 2048
    assert embed_token_limit(spec(ctx_size=1024, parallel=4, args=("--ubatch-size=4096",))) == 256
    assert embed_token_limit(spec(backend="llama-cpp-python")) is None
