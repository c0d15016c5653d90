"""Ollama image manifests: parse with every digest and size validated, build new ones.

A manifest is Docker's schema 2 with Ollama media types::

    {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
     "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest", "size"},
     "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest", "size"}, ...]}

The store keeps the raw manifest bytes (their SHA-256 is the model's ``digest``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import BadRequest
from .names import DIGEST_RE

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL = MEDIA_PREFIX + "model"
PROJECTOR = MEDIA_PREFIX + "projector"
ADAPTER = MEDIA_PREFIX + "adapter"
TEMPLATE = MEDIA_PREFIX + "template"
SYSTEM = MEDIA_PREFIX + "system"
PARAMS = MEDIA_PREFIX + "params"
LICENSE = MEDIA_PREFIX + "license"
MESSAGES = MEDIA_PREFIX + "messages"
MAX_MANIFEST = 4 * 1024 * 1024
MAX_LAYERS = 256
MAX_BLOB = 1 << 44  # 16 TiB: anything larger is a lie
_MEDIA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+/_-]{0,126}\Z")


class ManifestError(BadRequest):
    """The manifest is not valid JSON of the expected shape."""


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # hex
    size: int

    @property
    def ref(self) -> str:
        return f"sha256:{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.ref, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    config: Layer | None
    layers: tuple[Layer, ...]
    raw: dict[str, Any]

    def all_layers(self) -> tuple[Layer, ...]:
        """Layers plus the config blob (what a pull downloads)."""
        return self.layers + ((self.config,) if self.config else ())

    def digests(self) -> set[str]:
        return {layer.digest for layer in self.all_layers()}

    def first(self, media_type: str) -> Layer | None:
        return next((la for la in self.layers if la.media_type == media_type), None)

    def of_type(self, media_type: str) -> list[Layer]:
        return [la for la in self.layers if la.media_type == media_type]

    @property
    def size(self) -> int:
        """Ollama's Manifest.Size: layers plus the config blob."""
        return sum(la.size for la in self.all_layers())


def _layer(obj: Any, where: str) -> Layer:
    if not isinstance(obj, Mapping):
        raise ManifestError(f"invalid manifest: {where} is not an object")
    media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media, str) or not _MEDIA_RE.match(media):
        raise ManifestError(f"invalid manifest: {where} has a bad mediaType")
    m = DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if not m:
        raise ManifestError(f"invalid manifest: {where} has an invalid digest {str(digest)[:80]!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB:
        raise ManifestError(f"invalid manifest: {where} has an invalid size")
    return Layer(media, m.group(1), size)


def parse_manifest(data: bytes) -> Manifest:
    """Validate a manifest; every digest must match ``^sha256[:-][0-9a-f]{64}$``."""
    if len(data) > MAX_MANIFEST:
        raise ManifestError("invalid manifest: too large")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError("invalid manifest: not JSON") from None
    if not isinstance(obj, dict):
        raise ManifestError("invalid manifest: not an object")
    layers_raw = obj.get("layers")
    if not isinstance(layers_raw, list) or len(layers_raw) > MAX_LAYERS:
        raise ManifestError("invalid manifest: no layers list")
    layers = tuple(_layer(la, f"layers[{i}]") for i, la in enumerate(layers_raw))
    cfg = obj.get("config")
    config = _layer(cfg, "config") if cfg else None
    return Manifest(config, layers, obj)


def build_manifest(config: Layer, layers: Iterable[Layer]) -> bytes:
    """Manifest bytes as Ollama writes them (compact JSON)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": config.to_json(),
        "layers": [la.to_json() for la in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def build_config(details: Mapping[str, Any], layers: Iterable[Layer],
                 extra: Mapping[str, Any] | None = None) -> bytes:
    """The config blob Ollama writes: model format/family/type/file type and the rootfs.

    ``details`` is Ollama's details object (``gguf.details``); ``extra`` adds keys
    (routerd records a URL pull's source there)."""
    doc: dict[str, Any] = {
        "model_format": details.get("format", "gguf"),
        "model_family": details.get("family", ""),
        "model_families": list(details.get("families") or []),
        "model_type": details.get("parameter_size", ""),
        "file_type": details.get("quantization_level", ""),
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [la.ref for la in layers]},
    }
    doc.update(extra or {})
    return json.dumps(doc, separators=(",", ":")).encode()


def details_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's details object from a config blob (what /api/tags shows)."""
    fam = config.get("model_family") or ""
    families = config.get("model_families")
    return {
        "parent_model": "",
        "format": config.get("model_format") or "gguf",
        "family": fam,
        "families": list(families) if isinstance(families, list) else ([fam] if fam else None),
        "parameter_size": config.get("model_type") or "",
        "quantization_level": config.get("file_type") or "",
    }
