"""What each kind of peer answers, read into one shape: pure functions, no I/O.

| kind | model list | loaded state | requests go to |
| --- | --- | --- | --- |
| routerd | `/api/tags` | `/api/ps` (slots, budget) | `<url>/v1/...` (and native llama.cpp paths) |
| ollama | `/api/tags` | `/api/ps` | `<url>/v1/...` |
| llama-server | `/v1/models` | `/models` (router mode: status), `/props` (slots) | `<url>/v1/...` |
| openai | `<url>/models` | every listed model counts as loaded | `<url>/...` (url is the API root) |

Every kind is driven as an OpenAI-compatible engine: routerd translates the other dialects
over chat completions itself (api/chatbridge.py), so an OpenAI-only server still serves
Ollama and Anthropic clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RemoteModel:
    name: str  # the peer's own name for it
    loaded: bool = False
    size: int = 0
    slots: int = 1
    modified_at: str | None = None


def list_paths(kind: str) -> tuple[str, ...]:
    """The GETs one poll makes, relative to the peer's url (openai: to its API root)."""
    if kind in ("routerd", "ollama"):
        return ("/api/tags", "/api/ps")
    if kind == "llama-server":
        return ("/models", "/props")
    return ("/models",)


def forward_url(kind: str, url: str, path: str) -> str:
    """Where routerd's engine path (`/v1/chat/completions`, `/completion`) goes on the peer."""
    if kind == "openai":
        return url + (path[3:] if path.startswith("/v1/") else path)
    return url + path


def detect(version: Any, props: Any) -> str | None:
    """The kind from `/api/version` and `/props` answers (None: not answered)."""
    if isinstance(version, dict) and "routerd" in version:
        return "routerd"
    if isinstance(version, dict) and isinstance(version.get("version"), str):
        return "ollama"
    if isinstance(props, dict) and ("default_generation_settings" in props
                                    or "total_slots" in props or "model_path" in props):
        return "llama-server"
    return None


def _openai_ids(answer: Any) -> list[dict[str, Any]]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):  # llama-server also answers {"models": [...]}
        data = answer.get("models") if isinstance(answer, dict) else None
    out = []
    for m in data if isinstance(data, list) else ():
        if isinstance(m, dict) and isinstance(m.get("id") or m.get("name") or m.get("model"), str):
            out.append(m)
    return out


def _status(m: dict[str, Any]) -> str | None:
    status = m.get("status")
    if isinstance(status, dict):
        status = status.get("value")
    return status if isinstance(status, str) else None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(answer: Any, key: str) -> list[Any]:
    items = answer.get(key) if isinstance(answer, dict) else None
    return items if isinstance(items, list) else []


def read_models(kind: str, answers: dict[str, Any]) -> list[RemoteModel]:
    """The peer's models from the answers to `list_paths(kind)` (path → decoded JSON)."""
    if kind in ("routerd", "ollama"):
        running = {}
        for m in _list(answers.get("/api/ps"), "models"):
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                extra = _obj(m.get("routerd"))
                if extra.get("state", "ready") in ("ready", "loading"):
                    running[m["name"]] = int(extra.get("parallel") or 1)
        out = []
        for m in _list(answers.get("/api/tags"), "models"):
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                continue
            extra = _obj(m.get("routerd"))
            if extra.get("peer") or extra.get("alias_of"):
                continue  # a peer's own peers and aliases are not its models
            out.append(RemoteModel(m["name"], loaded=m["name"] in running,
                                   size=int(m.get("size") or 0),
                                   slots=running.get(m["name"], 1),
                                   modified_at=m.get("modified_at")))
        return out
    props = answers.get("/props") if kind == "llama-server" else None
    slots = int(props.get("total_slots") or 1) if isinstance(props, dict) else 1
    out = []
    for m in _openai_ids(answers.get("/models")):
        name = str(m.get("id") or m.get("name") or m.get("model"))
        status = _status(m)
        out.append(RemoteModel(name, loaded=status in (None, "loaded"), slots=slots))
    return out


def budget_free(ps: Any) -> int:
    """What a routerd peer has left unbooked of its largest budget (0: unknown)."""
    if not isinstance(ps, dict) or not isinstance(ps.get("routerd"), dict):
        return 0
    budget = ps["routerd"].get("budget") or {}
    booked: dict[str, int] = {}
    for m in ps.get("models") or ():
        for k, v in ((m.get("routerd") or {}).get("booked") or {}).items():
            booked[k] = booked.get(k, 0) + int(v)
    free = [int(v) - booked.get(k, 0) for k, v in budget.items() if isinstance(v, (int, float))]
    return max(free, default=0)
