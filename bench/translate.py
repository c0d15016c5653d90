"""Micro-benchmark of the stream hot path: SSE bytes -> Ollama NDJSON bytes, per chunk.

    python -m bench.translate [N]
"""

from __future__ import annotations

import json
import sys
import time

from routerd.api.translate.ollama_stream import ChatStream
from routerd.api.translate.sse import DONE, SSEDecoder, encode_ndjson, encode_sse


def _sample_stream(n: int) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "system_fingerprint": "b1"}
    delta = [{**base, "choices": [{"index": 0, "finish_reason": None,
                                   "delta": {"content": " token"}}]}]
    head = encode_sse(delta[0])
    tail = encode_sse({**base, "choices": [], "usage": {"prompt_tokens": 9,
                                                        "completion_tokens": n}})
    return head * n + tail + encode_sse(DONE)


def bench(n: int = 20_000, read_size: int = 1024) -> dict[str, float]:
    """Relay an n-token stream read in `read_size` pieces; return timings in microseconds."""
    data = _sample_stream(n)
    pieces = [data[i:i + read_size] for i in range(0, len(data), read_size)]
    start = time.perf_counter()
    decoder, stream, out = SSEDecoder(), ChatStream("m"), 0
    for piece in pieces:
        for payload in decoder.feed(piece):
            if payload == DONE:
                out += len(encode_ndjson(stream.finish(load_ns=0, total_ns=1)))
                break
            for obj in stream.feed(json.loads(payload)):
                out += len(encode_ndjson(obj))
    elapsed = time.perf_counter() - start
    return {"chunks": float(n), "total_ms": elapsed * 1e3, "us_per_chunk": elapsed * 1e6 / n,
            "out_bytes": float(out)}


if __name__ == "__main__":
    result = bench(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
    print(" ".join(f"{k}={v:.2f}" for k, v in result.items()))
