"""Where each tool keeps its models, per OS: pure functions of the environment.

Every path is derived from ``env`` (``HOME`` included), never from this process's own
environment, so the same code answers for any user and any OS. An empty variable counts
as unset, as it does for llama.cpp and huggingface_hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

_VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def home(env: Mapping[str, str]) -> Path:
    return Path(_get(env, "HOME") or os.path.expanduser("~"))


def expand(text: str, env: Mapping[str, str]) -> Path:
    """``~`` and ``$VAR`` expanded against ``env`` (unknown variables are left as written)."""
    text = _VAR_RE.sub(lambda m: env.get(m.group(1) or m.group(2)) or m.group(0), text)
    if text == "~" or text.startswith("~/"):
        text = str(home(env)) + text[1:]
    return Path(text)


def _env_path(env: Mapping[str, str], name: str, *rest: str) -> Path | None:
    value = _get(env, name)
    return expand(value, env).joinpath(*rest) if value else None


def ollama_stores(env: Mapping[str, str]) -> list[Path]:
    """Ollama's model stores: ``OLLAMA_MODELS``, the user's, the Linux service's."""
    found = [_env_path(env, "OLLAMA_MODELS"), home(env) / ".ollama/models",
             Path("/usr/share/ollama/.ollama/models")]
    return [p for p in found if p is not None]


def gpt4all_dirs(env: Mapping[str, str], platform: str) -> list[Path]:
    """GPT4All's download folder (Qt's AppLocalDataLocation for nomic.ai/GPT4All)."""
    if platform == "darwin":
        return [home(env) / "Library/Application Support/nomic.ai/GPT4All"]
    data = _env_path(env, "XDG_DATA_HOME") or home(env) / ".local/share"
    return [data / "nomic.ai/GPT4All"]


def lmstudio_dirs(env: Mapping[str, str], platform: str) -> list[Path]:
    """LM Studio: ``~/.lmstudio/models`` (0.3 and later), ``~/.cache/lm-studio/models`` (older)."""
    return [home(env) / ".lmstudio/models", home(env) / ".cache/lm-studio/models"]


def huggingface_dirs(env: Mapping[str, str], platform: str) -> list[Path]:
    """The Hugging Face hub cache, as huggingface_hub resolves it, most specific first."""
    found = [_env_path(env, "HF_HUB_CACHE"), _env_path(env, "HUGGINGFACE_HUB_CACHE"),
             _env_path(env, "HF_HOME", "hub"),
             _env_path(env, "XDG_CACHE_HOME", "huggingface", "hub"),
             home(env) / ".cache/huggingface/hub"]
    return [p for p in found if p is not None]


def llama_cpp_dirs(env: Mapping[str, str], platform: str) -> list[Path]:
    """llama.cpp's download cache (``fs_get_cache_directory`` in common/common.cpp)."""
    found = [_env_path(env, "LLAMA_CACHE")]
    if platform == "darwin":
        found.append(home(env) / "Library/Caches/llama.cpp")
    found += [_env_path(env, "XDG_CACHE_HOME", "llama.cpp"), home(env) / ".cache/llama.cpp"]
    return [p for p in found if p is not None]


def existing(paths: list[Path]) -> list[Path]:
    """The directories that exist, each real directory once, in the given order."""
    out: list[Path] = []
    seen: set[str] = set()
    for p in paths:
        try:
            if not p.is_dir():
                continue
            real = os.path.realpath(p)
        except OSError:
            continue
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out
