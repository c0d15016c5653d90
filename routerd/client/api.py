"""CLI client commands: talk to a running routerd daemon over its Ollama API.

Every command is a coroutine returning an exit code; ``cli.py`` runs one with
``execute(coro)`` (``asyncio.run`` plus Ctrl+C → 130), e.g.
``sys.exit(client.execute(client.ps(client.resolve_base())))``.
Output goes to stdout like Ollama's CLI; failures print ``Error: <message>`` to stderr
and return 1, and a daemon that is not running is named by its URL.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..units import human_bytes

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
HELP = """Available Commands:
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message."""

LineReader = Callable[[str], str]  # like input(): returns a line, raises EOFError at the end


class ClientError(Exception):
    """The daemon answered with an error; the message is what the user sees."""


def resolve_base(value: str | None = None) -> str:
    """The daemon's base URL from ``value`` or ``ROUTERD_HOST`` (Ollama's OLLAMA_HOST rules:
    scheme optional, default port 11434, ``0.0.0.0`` reached as loopback)."""
    raw = (value if value is not None else os.environ.get("ROUTERD_HOST", "")).strip()
    if not raw:
        return DEFAULT_HOST
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else DEFAULT_PORT)
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def execute(command: Coroutine[Any, Any, int]) -> int:
    """Run one client command to completion; Ctrl+C exits with 130."""
    try:
        return asyncio.run(command)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


def error_message(status: int, text: str) -> str:
    """The message inside an Ollama or OpenAI error body, else the raw text or status."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or f"HTTP {status}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err) if err else (text.strip() or f"HTTP {status}")


@asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
    key = os.environ.get("ROUTERD_API_KEY", "").strip()  # a daemon that requires keys
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        yield session


async def _checked(resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    if resp.status >= 400:
        raise ClientError(error_message(resp.status, await resp.text()))
    return resp


async def _call(base: str, body: Callable[[aiohttp.ClientSession], Awaitable[int]]) -> int:
    """Run ``body`` with a session; turn every failure into ``Error: ...`` and exit 1."""
    try:
        async with _session() as session:
            return await body(session)
    except ClientError as e:
        _fail(str(e))
    except aiohttp.ClientConnectorError:
        _fail(f"could not connect to routerd at {base} (is `routerd serve` running?"
              " Set ROUTERD_HOST to reach another address)")
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
        _fail(f"connection to routerd at {base} was lost: {e}")
    except aiohttp.ClientError as e:
        _fail(f"request to routerd at {base} failed: {e}")
    return 1


def _fail(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _get_json(session: aiohttp.ClientSession, url: str, body: Any = None) -> Any:
    method = "GET" if body is None else "POST"
    async with session.request(method, url, json=body) as resp:
        await _checked(resp)
        return await resp.json(content_type=None)


async def ndjson_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The non-empty lines of an NDJSON stream (no line-length limit)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


async def _ndjson(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Objects of an NDJSON stream; an in-band error raises."""
    async for line in ndjson_lines(resp):
        yield _ndjson_object(line)


def _ndjson_object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError:
        raise ClientError(f"unexpected reply from routerd: {line[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ClientError(f"unexpected reply from routerd: {line[:200]!r}")
    if obj.get("error"):
        raise ClientError(error_message(200, json.dumps(obj)))
    return obj


# ---------------------------------------------------------------- commands


async def list_models(base: str) -> int:
    """``routerd list``: the models the daemon can serve (GET /api/tags)."""
    async def body(session: aiohttp.ClientSession) -> int:
        data = await _get_json(session, f"{base}/api/tags")
        _write(format_list(data.get("models") or []) + "\n")
        return 0
    return await _call(base, body)


async def ps(base: str) -> int:
    """``routerd ps``: the models loaded now (GET /api/ps)."""
    async def body(session: aiohttp.ClientSession) -> int:
        data = await _get_json(session, f"{base}/api/ps")
        _write(format_ps(data.get("models") or []) + "\n")
        return 0
    return await _call(base, body)


async def show(base: str, name: str) -> int:
    """``routerd show NAME``: a model's details (POST /api/show)."""
    async def body(session: aiohttp.ClientSession) -> int:
        data = await _get_json(session, f"{base}/api/show", {"model": name})
        _write(format_show(data) + "\n")
        return 0
    return await _call(base, body)


async def stop(base: str, name: str) -> int:
    """``routerd stop NAME``: unload now, like ``ollama stop`` (keep_alive 0, empty prompt)."""
    async def body(session: aiohttp.ClientSession) -> int:
        await _get_json(session, f"{base}/api/generate",
                        {"model": name, "prompt": "", "keep_alive": 0, "stream": False})
        return 0
    return await _call(base, body)


async def logs(base: str, name: str, follow: bool = False) -> int:
    """``routerd logs NAME [-f]``: a worker's captured output (GET /api/logs), streamed."""
    async def body(session: aiohttp.ClientSession) -> int:
        params = {"model": name, **({"follow": "1"} if follow else {})}
        async with session.get(f"{base}/api/logs", params=params) as resp:
            await _checked(resp)
            decoder = _utf8_decoder()
            async for chunk in resp.content.iter_any():
                _write(decoder.decode(chunk))
            _write(decoder.decode(b"", final=True))
        return 0
    return await _call(base, body)


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


async def run(base: str, name: str, prompt: str | None = None, *,
              read_line: LineReader | None = None) -> int:
    """``routerd run NAME [PROMPT]``: stream one answer from /api/generate, or with no
    prompt a chat over /api/chat keeping the history (``/bye`` or EOF ends it).

    With no prompt and stdin not a terminal, stdin's whole text is the prompt (as Ollama).
    ``read_line`` replaces ``input`` for the chat loop."""
    if prompt is None and read_line is None and not sys.stdin.isatty():
        prompt = await asyncio.to_thread(sys.stdin.read)
    if prompt is not None:
        return await _call(base, lambda s: _generate(s, base, name, prompt))
    return await _call(base, lambda s: _chat_loop(s, base, name, read_line or input))


async def _generate(session: aiohttp.ClientSession, base: str, name: str, prompt: str) -> int:
    body = {"model": name, "prompt": prompt, "stream": True}
    async with session.post(f"{base}/api/generate", json=body) as resp:
        await _checked(resp)
        try:
            async for obj in _ndjson(resp):
                _write(str(obj.get("response") or ""))
        finally:
            _write("\n")
    return 0


async def _chat_loop(session: aiohttp.ClientSession, base: str, name: str,
                     read_line: LineReader) -> int:
    history: list[dict[str, str]] = []
    while True:
        text = await _read_message(read_line)
        if text is None or text.strip() == "/bye":
            return 0
        command = text.strip()
        if not command:
            continue
        if command == "/clear":
            history.clear()
            _write("Cleared session context\n")
            continue
        if command in ("/?", "/help"):
            _write(HELP + "\n")
            continue
        if command.startswith("/") and " " not in command:
            _write(f"Unknown command '{command}'. Type /? for help\n")
            continue
        history.append({"role": "user", "content": text})
        reply = await _chat_once(session, base, name, history)
        history.append({"role": "assistant", "content": reply})


async def _read_message(read_line: LineReader) -> str | None:
    """One user message; ``\"\"\"`` starts a multi-line one. None at end of input."""
    try:
        line = await asyncio.to_thread(read_line, ">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        parts = [line.lstrip()[3:]]
        while not parts[-1].rstrip().endswith('"""'):
            parts.append(await asyncio.to_thread(read_line, "... "))
        parts[-1] = parts[-1].rstrip()[:-3]
        return "\n".join(parts).strip("\n")
    except EOFError:
        _write("\n")
        return None


async def _chat_once(session: aiohttp.ClientSession, base: str, name: str,
                     history: list[dict[str, str]]) -> str:
    body = {"model": name, "messages": history, "stream": True}
    pieces: list[str] = []
    async with session.post(f"{base}/api/chat", json=body) as resp:
        await _checked(resp)
        try:
            async for obj in _ndjson(resp):
                piece = str((obj.get("message") or {}).get("content") or "")
                pieces.append(piece)
                _write(piece)
        finally:
            _write("\n\n")
    return "".join(pieces)


# ---------------------------------------------------------------- formatting (Ollama's CLI)


def human_duration(seconds: float) -> str:
    """Ollama's format.humanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return "1 second" if s == 1 else f"{s} seconds"
    minutes = s // 60
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = round(seconds / 3600)
    for limit, div, unit in ((48, 1, "hours"), (24 * 14, 24, "days"),
                             (24 * 60, 24 * 7, "weeks"), (24 * 730, 24 * 30, "months")):
        if hours < limit:
            return "About an hour" if hours == 1 else f"{hours // div} {unit}"
    return f"{int(seconds / 86400 / 365)} years"


def parse_time(value: object) -> datetime | None:
    """RFC 3339 as Go writes it (nanoseconds, 'Z'); None when missing or unparseable."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def human_time(when: datetime | None, zero: str, now: datetime | None = None) -> str:
    """Ollama's format.HumanTime: '2 days ago', '4 minutes from now', 'Forever'."""
    if when is None:
        return zero
    delta = ((now or datetime.now(timezone.utc)) - when).total_seconds()
    if delta < -20 * 365 * 86400:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def processor(size: int, size_vram: int) -> str:
    """Where a loaded model lives, as ``ollama ps`` says it."""
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in [headers, *rows])


def short_id(digest: object) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]


def format_list(models: list[dict[str, Any]], now: datetime | None = None) -> str:
    rows = [[str(m.get("name") or m.get("model") or ""), short_id(m.get("digest")),
             human_bytes(int(m.get("size") or 0)),
             human_time(parse_time(m.get("modified_at")), "Never", now)] for m in models]
    return format_table(["NAME", "ID", "SIZE", "MODIFIED"], rows)


def format_ps(models: list[dict[str, Any]], now: datetime | None = None) -> str:
    rows = []
    for m in models:
        size, expires = int(m.get("size") or 0), parse_time(m.get("expires_at"))
        now_ = now or datetime.now(timezone.utc)
        until = ("Stopping..." if expires is not None and expires < now_
                 else human_time(expires, "Never", now_))
        rows.append([str(m.get("name") or m.get("model") or ""), short_id(m.get("digest")),
                     human_bytes(size), processor(size, int(m.get("size_vram") or 0)),
                     str(m.get("context_length") or ""), until])
    return format_table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows)


def format_show(data: dict[str, Any]) -> str:
    """``ollama show``: Model, Capabilities, Parameters and License sections."""
    info, details = data.get("model_info") or {}, data.get("details") or {}
    arch = info.get("general.architecture") or details.get("family") or ""
    params = details.get("parameter_size") or info.get("general.parameter_count") or ""
    model = [("architecture", arch), ("parameters", params),
             ("context length", info.get(f"{arch}.context_length", "")),
             ("embedding length", info.get(f"{arch}.embedding_length", "")),
             ("quantization", details.get("quantization_level", ""))]
    sections = [("Model", [(k, str(v)) for k, v in model if v not in ("", None)])]
    sections.append(("Capabilities", [(c, "") for c in data.get("capabilities") or []]))
    parameters = [line.split(None, 1) for line in str(data.get("parameters") or "").splitlines()]
    sections.append(("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in parameters if p]))
    license_lines = [ln for ln in str(data.get("license") or "").splitlines() if ln.strip()]
    more = ["..."] if len(license_lines) > 2 else []
    sections.append(("License", [(ln.strip(), "") for ln in license_lines[:2] + more]))
    out = []
    for title, pairs in sections:
        if not pairs:
            continue
        width = max(len(k) for k, _ in pairs)
        out.append(f"  {title}")
        out += [f"    {k.ljust(width)}    {v}".rstrip() for k, v in pairs]
        out.append("")
    return "\n".join(out)
