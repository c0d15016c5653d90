"""What a model can do, honestly: read from its chat template, its projector and its GGUF
header, for `/api/show`, `/v1/models/{id}` and the checks that answer Ollama's 400s.

- completion: every model with a chat or text head (not a reranker or embedding-only file)
- embedding: the engine serves embeddings (routerd starts llama-server with --embedding)
- vision: an mmproj projector is attached
- tools: the chat template renders tools or tool calls (a forced tool choice works on any
  model, since routerd constrains the answer itself; "tools" here means the model can decide
  to call one, which only its template can teach it)
- thinking: the template knows a reasoning switch or block (`enable_thinking`, `<think>`,
  `reasoning_content`)
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import BadRequest

_TOOLS = re.compile(r"\btools\b|tool_calls|\btool_call\b")
_THINKING = re.compile(r"enable_thinking|<think>|reasoning_content|\bthinking\b")


def of(entry: Any, info: Any) -> list[str]:
    template = template_of(entry, info)
    meta = getattr(info, "metadata", None) or {}
    arch = meta.get("general.architecture", "")
    pooling = meta.get(f"{arch}.pooling_type") if arch else None
    caps = []
    rank = pooling == 4 or bool(getattr(entry.launch, "rerank", False))  # LLAMA_POOLING_TYPE_RANK
    if not rank and arch not in ("bert", "nomic-bert", "jina-bert-v2"):
        caps.append("completion")
    if entry.launch.embeddings:
        caps.append("embedding")
    if rank:
        caps.append("rerank")
    if entry.launch.projector:
        caps.append("vision")
    if _TOOLS.search(template):
        caps.append("tools")
    if _THINKING.search(template):
        caps.append("thinking")
    return caps


def template_of(entry: Any, info: Any) -> str:
    return entry.template or (info.chat_template if info is not None else None) or ""


def check_ollama_chat(name: str, caps: list[str], body: dict[str, Any]) -> None:
    """Ollama's 400s for a capability the model lacks (its messages, word for word). The
    caller skips this when the chat template cannot be read (nothing is known to be missing)."""
    if body.get("tools") and "tools" not in caps:
        raise BadRequest(f"{name} does not support tools")
    think = body.get("think")
    if think not in (None, False) and "thinking" not in caps:
        raise BadRequest(f'"{name}" does not support thinking')
