"""Pure converters between wire dialects (dict <-> dict, bytes framing); no HTTP, no I/O.

Dialect field names live only in this package. Modules:
  ollama           Ollama request bodies -> OpenAI bodies for the engine (+ load_options)
  ollama_response  OpenAI replies -> Ollama replies, metrics, timestamps
  ollama_stream    ChatStream / GenerateStream: OpenAI SSE chunks -> Ollama NDJSON objects
  options          Ollama options -> engine sampling fields; load-time options
  sse              SSEDecoder, encode_sse, encode_ndjson, error_event_openai
  fields           typed field access raising BadRequest
"""

from __future__ import annotations

from routerd.api.translate.ollama import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    EMBEDDINGS_PATH,
    INFILL_PATH,
    chat_request,
    embed_request,
    embeddings_request,
    generate_request,
    load_options,
)
from routerd.api.translate.ollama_response import (
    chat_response,
    embed_response,
    embeddings_response,
    error_chunk_ollama,
    generate_response,
    load_response,
    now_rfc3339,
)
from routerd.api.translate.ollama_stream import ChatStream, GenerateStream
from routerd.api.translate.sse import (
    DONE,
    SSEDecoder,
    encode_ndjson,
    encode_sse,
    error_event_openai,
)

__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "DONE",
    "EMBEDDINGS_PATH",
    "INFILL_PATH",
    "ChatStream",
    "GenerateStream",
    "SSEDecoder",
    "chat_request",
    "chat_response",
    "embed_request",
    "embed_response",
    "embeddings_request",
    "embeddings_response",
    "encode_ndjson",
    "encode_sse",
    "error_chunk_ollama",
    "error_event_openai",
    "generate_request",
    "generate_response",
    "load_options",
    "load_response",
    "now_rfc3339",
]
