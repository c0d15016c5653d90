"""Capabilities read from the chat template, projector and GGUF header; Ollama's 400s."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from routerd.api import capabilities
from routerd.errors import BadRequest

SMOL = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}")
QWEN = ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% for m in messages %}"
        "{% if m.tool_calls %}<tool_call>{% endif %}{% endfor %}<think>\n")


def entry(template: str | None = None, *, embeddings: bool = True, projector: str | None = None
          ) -> NS:
    return NS(template=template, launch=NS(embeddings=embeddings, projector=projector))


def info(template: str | None, **meta: object) -> NS:
    return NS(chat_template=template, metadata={"general.architecture": "llama", **meta})


def test_from_the_template() -> None:
    assert capabilities.of(entry(), info(SMOL)) == ["completion", "embedding"]
    assert capabilities.of(entry(), info(QWEN)) == ["completion", "embedding", "tools",
                                                    "thinking"]
    assert capabilities.of(entry(QWEN, embeddings=False, projector="mm.gguf"), None) == [
        "completion", "vision", "tools", "thinking"]
    ranker = capabilities.of(entry(embeddings=False), info(None, **{"llama.pooling_type": 4}))
    assert ranker == ["rerank"]


def test_ollama_400s() -> None:
    caps = capabilities.of(entry(), info(SMOL))
    with pytest.raises(BadRequest, match="^smollm2 does not support tools$"):
        capabilities.check_ollama_chat("smollm2", caps, {"tools": [{"type": "function"}]})
    with pytest.raises(BadRequest, match='^"smollm2" does not support thinking$'):
        capabilities.check_ollama_chat("smollm2", caps, {"think": "high"})
    capabilities.check_ollama_chat("smollm2", caps, {"think": False, "tools": []})
    capabilities.check_ollama_chat("q", capabilities.of(entry(), info(QWEN)),
                                   {"think": True, "tools": [{}]})
