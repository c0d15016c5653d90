"""LangChain's own standard suites (langchain-tests `ChatModelIntegrationTests`) for ChatOpenAI
(chat completions and the Responses API), ChatAnthropic and ChatOllama, pointed at a live
routerd serving SmolLM2-135M on llama-server.

`make test` runs the subset in tests/clients/conftest.py (about a minute); the full suites run
with `ROUTERD_LANGCHAIN_FULL=1 .venv/bin/pytest tests/clients/test_langchain_standard.py`.
What fails in the full run, and why, is in README ("Agents' dialects").
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from langchain_anthropic import ChatAnthropic
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.conftest import Daemon

MODEL = "smollm2"
FULL = os.environ.get("ROUTERD_LANGCHAIN_FULL") == "1"
_URL: dict[str, str] = {}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True, scope="module")
def _routerd(daemon: Daemon) -> None:
    _URL["base"] = daemon.base_url


class _Routerd(ChatModelIntegrationTests):
    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False  # SmolLM2 has no vision projector

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatOpenAI(_Routerd):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "base_url": _URL["base"] + "/v1", "api_key": "unused",
                "max_retries": 0, "stream_usage": True, "timeout": 300, "temperature": 0,
                # a 135M model at temperature 0 can loop inside a JSON string until the
                # length limit: a repeat penalty keeps the structured-output tests honest
                "extra_body": {"repeat_penalty": 1.3}}


class TestChatOpenAIResponses(TestChatOpenAI):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**super().chat_model_params, "use_responses_api": True}


class TestChatAnthropic(_Routerd):
    @property
    def chat_model_class(self) -> type[ChatAnthropic]:
        return ChatAnthropic

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "base_url": _URL["base"], "api_key": "unused",
                "max_retries": 0, "timeout": 300}

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True


class TestChatOllama(_Routerd):
    @property
    def chat_model_class(self) -> type[ChatOllama]:
        return ChatOllama

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "base_url": _URL["base"], "client_kwargs": {"timeout": 300}}

    @property
    def has_tool_choice(self) -> bool:
        return False  # Ollama's API has no tool_choice

    @property
    def has_tool_calling(self) -> bool:
        # SmolLM2's template has no tool syntax: /api/chat with tools answers 400, as Ollama
        # does; the full run keeps the tool tests to count them (README).
        return FULL
