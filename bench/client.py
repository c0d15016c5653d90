"""What a client sees: one timed chat, one timed stream (time to first token, tokens/s), in
the OpenAI (SSE) and Ollama (NDJSON) dialects."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)
WARM_PROMPT = "Say hello."
LONG_PROMPT = "Write a long story about a dragon who learns to cook."


@dataclass(frozen=True)
class Target:
    """One peer's way of serving one model: where to POST and in which dialect."""

    peer: str  # direct | router-mode | routerd | routerd-ollama ...
    base_url: str
    model: str
    dialect: str = "openai"  # openai | ollama
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        path = "/api/chat" if self.dialect == "ollama" else "/v1/chat/completions"
        return self.base_url + path

    def body(self, prompt: str, n: int, *, stream: bool) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        if self.dialect == "ollama":
            return {"model": self.model, "messages": messages, "stream": stream,
                    "options": {"num_predict": n, "temperature": 0, "seed": 1}}
        return {"model": self.model, "messages": messages, "stream": stream, "max_tokens": n,
                "temperature": 0, "seed": 1}


@dataclass(frozen=True)
class StreamStats:
    ttft: float  # request sent → first token delta
    elapsed: float  # request sent → last byte
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


def session(limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, auto_decompress=False)


async def chat(http: aiohttp.ClientSession, t: Target, *, n: int = 8,
               prompt: str = WARM_PROMPT) -> float:
    """One non-streaming chat; seconds from send to the whole answer."""
    data = json.dumps(t.body(prompt, n, stream=False)).encode()
    headers = {"Content-Type": "application/json", **dict(t.headers)}
    t0 = time.perf_counter()
    async with http.post(t.url, data=data, headers=headers) as r:
        raw = await r.read()
        elapsed = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"{t.peer} {t.url}: HTTP {r.status}: {raw[:300]!r}")
    return elapsed


def _has_token(line: bytes, dialect: str) -> bool:
    """Whether one SSE data line / NDJSON line carries generated text."""
    if dialect == "ollama":
        if not line.strip():
            return False
        obj = json.loads(line)
        if "error" in obj:
            raise RuntimeError(f"in-band error: {obj['error']}")
        return bool(obj.get("message", {}).get("content"))
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return False
    obj = json.loads(payload)
    if "error" in obj:
        raise RuntimeError(f"in-band error: {obj['error']}")
    choices = obj.get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def stream(http: aiohttp.ClientSession, t: Target, *, n: int,
                 prompt: str = LONG_PROMPT) -> StreamStats:
    data = json.dumps(t.body(prompt, n, stream=True)).encode()
    headers = {"Content-Type": "application/json", **dict(t.headers)}
    tokens, ttft = 0, 0.0
    t0 = time.perf_counter()
    async with http.post(t.url, data=data, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{t.peer}: HTTP {r.status}: {(await r.read())[:300]!r}")
        if r.connection is not None and r.connection.protocol is not None:
            # llama-server closes the connection after a stream yet says keep-alive: never
            # reuse it (the same for every peer).
            r.connection.protocol.force_close()
        async for line in r.content:
            if _has_token(line, t.dialect):
                if tokens == 0:
                    ttft = time.perf_counter() - t0
                tokens += 1
        elapsed = time.perf_counter() - t0
    if tokens == 0:
        raise RuntimeError(f"{t.peer}: stream carried no tokens")
    return StreamStats(ttft, elapsed, tokens)
