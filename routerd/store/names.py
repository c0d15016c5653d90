"""Model names and digests, validated before any path is built from them.

Ollama's grammar: ``[scheme://][host/][namespace/]model[:tag][@digest]`` with the
defaults ``https``, ``registry.ollama.ai``, ``library`` and ``latest``.  Each part is
checked against Ollama's own character rules (``types/model/name.go``):

* host: ``[A-Za-z0-9_][A-Za-z0-9_.:-]*``, 1..350 characters (a port is allowed);
* namespace: ``[A-Za-z0-9_][A-Za-z0-9_-]*``, 1..80;
* model and tag: ``[A-Za-z0-9_][A-Za-z0-9_.-]*``, 1..80.

No part can start with a dot or contain a slash, so ``..`` and ``/`` escapes are
impossible by construction; ``manifest_path`` still checks the result stays inside the
root.  Digests must match ``^sha256[:-][0-9a-f]{64}$`` (CVE-2024-37032).

A plain ``https://host/path/file.gguf`` URL is not a name: ``url_model_name`` derives
``<host>/url/<file stem>:latest`` for it (invalid characters become ``-``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import BadRequest

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
URL_NAMESPACE = "url"
# Hosts that serve the same registry under two names (token realms may cross between them).
HOST_ALIASES = {"hf.co": "huggingface.co", "huggingface.co": "hf.co"}

DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})\Z")
HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}\Z")
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}\Z")
PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}\Z")
_MAX_NAME = 600


def parse_digest(text: str) -> str:
    """The 64 hex characters of ``sha256:<hex>`` or ``sha256-<hex>``; BadRequest otherwise."""
    m = DIGEST_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise BadRequest(f"invalid digest {str(text)[:80]!r}: expected sha256:<64 hex>")
    return m.group(1)


def digest_str(hex_digest: str) -> str:
    """``sha256:<hex>``, the form used in manifests and the API."""
    return f"sha256:{hex_digest}"


def blob_filename(hex_digest: str) -> str:
    """``sha256-<hex>``, the file name of a blob in ``blobs/`` (Ollama's layout)."""
    if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
        raise BadRequest("invalid digest")
    return f"sha256-{hex_digest}"


@dataclass(frozen=True)
class ModelName:
    scheme: str
    host: str
    namespace: str
    model: str
    tag: str
    digest: str | None = None  # hex, when the name carried @sha256:...

    @property
    def display(self) -> str:
        """Ollama's DisplayShortest: ``smollm2:latest``, ``user/m:tag``, ``host/ns/m:tag``."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """``host/namespace/model:tag`` (no scheme, no digest)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def repository(self) -> str:
        """``namespace/model``, the registry repository path."""
        return f"{self.namespace}/{self.model}"

    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity (Ollama compares names with EqualFold)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def manifest_path(self, root: Path) -> Path:
        """``<root>/manifests/<host>/<namespace>/<model>/<tag>``, checked to stay in root."""
        base = Path(root) / "manifests"
        path = base / self.host / self.namespace / self.model / self.tag
        if not _inside(base, path):
            raise BadRequest(f"invalid model name {self.full!r}")
        return path


def _inside(base: Path, path: Path) -> bool:
    b, p = base.resolve(), path.resolve()
    return p == b or b in p.parents


def _bad(text: str, why: str) -> BadRequest:
    return BadRequest(f"invalid model name {text[:120]!r}: {why}")


def parse_name(text: str) -> ModelName:
    """Parse and validate a model name; raises BadRequest with the reason."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("invalid model name: empty")
    raw = text.strip()
    if len(raw) > _MAX_NAME:
        raise _bad(raw, "too long")
    scheme = "https"
    rest = raw
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise _bad(raw, f"unsupported scheme {scheme!r}")
    digest = None
    if "@" in rest:
        rest, _, dg = rest.partition("@")
        digest = parse_digest(dg)
    tag = DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
    parts = rest.split("/")
    if len(parts) > 3:
        raise _bad(raw, "expected [host/][namespace/]model[:tag]")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    for value, rx, what in ((host, HOST_RE, "host"), (namespace, NAMESPACE_RE, "namespace"),
                            (model, PART_RE, "model"), (tag, PART_RE, "tag")):
        if not rx.match(value):
            raise _bad(raw, f"bad {what} {value[:80]!r}")
    if ".." in host:
        raise _bad(raw, "bad host")
    return ModelName(scheme, host, namespace, model, tag, digest)


def is_url(text: str) -> bool:
    """True for ``http(s)://host/.../file.gguf``: a direct file download, not a name."""
    if not isinstance(text, str):
        return False
    low = text.strip().lower()
    return low.startswith(("https://", "http://")) and urlsplit(low).path.endswith(".gguf")


def url_model_name(url: str) -> ModelName:
    """The store name for a direct GGUF URL: ``<host>/url/<file stem>:latest``.

    ``https://example.com/models/SmolLM2-135M.Q4_1.gguf`` → ``example.com/url/SmolLM2-135M.Q4_1``.
    Characters a model name may not hold become ``-``; the stem is cut to 80."""
    parts = urlsplit(url.strip())
    host = parts.netloc.rsplit("@", 1)[-1]  # never keep userinfo
    if parts.scheme not in ("http", "https") or not HOST_RE.match(host or "") or ".." in host:
        raise BadRequest(f"invalid model URL {url[:200]!r}")
    stem = unquote(parts.path.rsplit("/", 1)[-1])
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip(".-")[:80].rstrip(".") or "model"
    if not PART_RE.match(stem):
        stem = f"m{stem}"[:80]
    return ModelName(parts.scheme, host, URL_NAMESPACE, stem, DEFAULT_TAG, None)
