"""Every JSON schema routerd hands an engine closes: free strings get a maxLength (pure)."""

from __future__ import annotations

import copy

from routerd.api.translate.options import response_format
from routerd.api.translate.schema import (MAX_STRING, bound_body, bounded, bounded_format,
                                          string_bound)
from routerd.api.translate.tools import enforce, forced_choice

JOKE = {"title": "Joke", "type": "object",
        "properties": {"setup": {"type": "string", "description": "the question"},
                       "punchline": {"type": "string"},
                       "rating": {"type": ["integer", "null"]}},
        "required": ["setup", "punchline"]}


def test_a_free_string_gets_the_bound_and_the_callers_schema_is_untouched():
    before = copy.deepcopy(JOKE)
    out = bounded(JOKE)
    assert out["properties"]["setup"] == {"type": "string", "description": "the question",
                                          "maxLength": MAX_STRING}
    assert out["properties"]["punchline"]["maxLength"] == MAX_STRING
    assert "maxLength" not in out["properties"]["rating"]
    assert JOKE == before


def test_a_schemas_own_bound_or_shape_wins():
    for shaped in ({"type": "string", "maxLength": 5000}, {"type": "string", "enum": ["a"]},
                   {"type": "string", "const": "a"}, {"type": "string", "pattern": "^a+$"},
                   {"type": "string", "format": "date"}):
        assert bounded(shaped) == shaped


def test_strings_are_bounded_at_any_depth():
    schema = {"$defs": {"Cat": {"type": "object", "properties": {"name": {"type": "string"}}}},
              "type": "object",
              "properties": {"cats": {"type": "array", "items": {"$ref": "#/$defs/Cat"}},
                             "tags": {"type": "array", "items": {"type": "string"}},
                             "either": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                             "pair": {"prefixItems": [{"type": "string"}]},
                             "extra": {"type": "object",
                                       "additionalProperties": {"type": ["string", "null"]}}}}
    out = bounded(schema, max_string=7)
    assert out["$defs"]["Cat"]["properties"]["name"]["maxLength"] == 7
    props = out["properties"]
    assert props["tags"]["items"]["maxLength"] == 7
    assert props["either"]["anyOf"][0]["maxLength"] == 7
    assert props["pair"]["prefixItems"][0]["maxLength"] == 7
    assert props["extra"]["additionalProperties"]["maxLength"] == 7
    assert props["cats"]["items"] == {"$ref": "#/$defs/Cat"}


def test_odd_schemas_pass_as_they_are():
    assert bounded(True) is True
    assert bounded({}) == {}
    assert bounded_format({"type": "json_object"}) == {"type": "json_object"}
    assert bounded_format({"type": "json_schema", "json_schema": {"name": "x"}}) == {
        "type": "json_schema", "json_schema": {"name": "x"}}
    assert bounded_format(None) is None


def test_the_bound_is_a_quarter_of_a_slot_and_both_engine_fields_get_it():
    assert string_bound(2048, 2) == 256 and string_bound(32768, 1) == 8192
    assert string_bound(128, 4) == 64  # never below MIN_STRING
    body = {"response_format": response_format(JOKE), "json_schema": JOKE}
    bound_body(body, 256)
    assert body["response_format"]["json_schema"]["schema"]["properties"]["setup"][
        "maxLength"] == 256
    assert body["json_schema"]["properties"]["punchline"]["maxLength"] == 256
    openai = bounded_format({"type": "json_schema",
                             "json_schema": {"name": "joke", "strict": True, "schema": JOKE}})
    assert openai["json_schema"]["strict"] is True
    assert openai["json_schema"]["schema"]["properties"]["punchline"]["maxLength"] == MAX_STRING
    assert bound_body({"messages": []}, 256) == {"messages": []}


def test_a_forced_tool_calls_arguments_are_bounded_on_the_way_to_the_engine():
    # enforce() builds the schema; chatbridge bounds every response_format it sends
    tool = {"type": "function", "function": {"name": "joke", "parameters": JOKE}}
    body = {"messages": [{"role": "user", "content": "a joke"}], "tools": [tool],
            "tool_choice": "required"}
    force = forced_choice(body)
    assert force is not None
    fmt = bounded_format(enforce(body, force)["response_format"])
    assert fmt["json_schema"]["schema"]["properties"]["setup"]["maxLength"] == MAX_STRING
