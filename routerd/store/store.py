"""The model store: Ollama's layout, one writable root plus read-only Ollama stores.

``<root>/manifests/<host>/<namespace>/<model>/<tag>`` holds the raw manifest bytes and
``<root>/blobs/sha256-<hex>`` the content.  ``readonly_dirs`` (e.g. ``~/.ollama/models``)
are listed and served but never written: ``delete`` refuses their models.

Listing reads manifests and the small text layers only, cached by the manifest's
(mtime, size); GGUF headers are read only for manifests without a config blob, cached
by the blob's (path, size, mtime).  Mutations take one lock; blobs a pull or create is
using are pinned, so a concurrent delete never collects them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import structlog

from ..errors import BadRequest, Forbidden, ModelNotFound
from . import gguf
from .blobs import atomic_write, fsync_dir, write_blob_bytes
from .manifests import (CONFIG_V1, LICENSE, MODEL, PARAMS, PROJECTOR, SYSTEM, TEMPLATE, Layer,
                        Manifest, ManifestError, details_from_config, parse_manifest)
from .names import HOST_RE, NAMESPACE_RE, PART_RE, ModelName, blob_filename, parse_name

log = structlog.get_logger(__name__)

_SMALL_LAYER = 4 * 1024 * 1024


@dataclass(frozen=True)
class StoreModel:
    name: str  # Ollama's display name: smollm2:latest
    model_name: ModelName
    gguf_path: Path
    projector_path: Path | None
    digest: str  # sha256 of the manifest bytes, hex
    size: int  # layers + config blob, as Ollama counts it
    modified_at: datetime
    params: dict[str, Any] = field(compare=False)
    system: str | None
    template: str | None
    license: str | None
    readonly: bool
    manifest: dict[str, Any] = field(compare=False)
    details: dict[str, Any] = field(compare=False, default_factory=dict)
    manifest_path: Path | None = None
    root: Path | None = None


class Store:
    def __init__(self, models_dir: Path, readonly_dirs: Sequence[Path] = ()) -> None:
        self.root = Path(models_dir).expanduser()
        self.readonly_dirs = tuple(Path(d).expanduser() for d in readonly_dirs
                                   if Path(d).expanduser() != self.root)
        self.blobs_dir = self.root / "blobs"
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        self._cache: dict[Path, tuple[tuple[int, int], StoreModel | None]] = {}
        self._gguf_cache: dict[Path, tuple[tuple[int, int], gguf.GGUFInfo | None]] = {}

    # ---------------------------------------------------------------- blobs

    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` (hex) lives in the writable store."""
        return self.blobs_dir / blob_filename(digest)

    def find_blob(self, digest: str) -> Path | None:
        """The blob in the writable store, else in a read-only one; None when absent."""
        for root in (self.root, *self.readonly_dirs):
            p = root / "blobs" / blob_filename(digest)
            if p.is_file():
                return p
        return None

    def add_blob(self, data: bytes) -> tuple[str, bool]:
        """Store small content (text layers, configs); returns (hex digest, created)."""
        return write_blob_bytes(self.blobs_dir, data)

    def adopt_blob(self, digest: str) -> bool:
        """Make a blob from a read-only store available in the writable one (hard link)."""
        dst = self.blob_path(digest)
        if dst.is_file():
            return True
        for root in self.readonly_dirs:
            src = root / "blobs" / blob_filename(digest)
            if src.is_file():
                self.blobs_dir.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + "-link")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                try:
                    os.link(src, tmp)
                    os.replace(tmp, dst)
                except OSError:
                    return False
                return True
        return False

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs out of garbage collection while the block runs."""
        ds = list(digests)
        with self._lock:
            self._pins.update(ds)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(ds)
                self._pins += Counter()  # drop zero counts

    # ---------------------------------------------------------------- manifests

    def _roots(self) -> list[tuple[Path, bool]]:
        return [(self.root, False)] + [(d, True) for d in self.readonly_dirs]

    def _manifest_files(self, root: Path) -> Iterator[tuple[ModelName, Path]]:
        base = root / "manifests"
        for host in _subdirs(base, HOST_RE):
            for ns in _subdirs(host, NAMESPACE_RE):
                for model in _subdirs(ns, PART_RE):
                    with contextlib.suppress(OSError):
                        for tag in os.scandir(model):
                            if tag.is_file() and PART_RE.match(tag.name):
                                yield (ModelName("https", host.name, ns.name, model.name,
                                                 tag.name), Path(tag.path))

    def read_manifest(self, name: ModelName) -> tuple[Path, bytes] | None:
        """The writable store's manifest for ``name`` (exact, then case-insensitive)."""
        path = self._find(self.root, name)
        if path is None:
            return None
        with contextlib.suppress(OSError):
            return path, path.read_bytes()
        return None

    def _find(self, root: Path, name: ModelName) -> Path | None:
        try:
            path = name.manifest_path(root)
        except BadRequest:
            return None
        if path.is_file():
            return path
        for other, p in self._manifest_files(root):
            if other.key() == name.key():
                return p
        return None

    def write_manifest(self, name: ModelName, data: bytes) -> None:
        """Atomically (re)write a manifest; every blob it names must already be stored."""
        manifest = parse_manifest(data)
        missing = [d for d in manifest.digests() if not self.blob_path(d).is_file()]
        if missing:
            raise BadRequest(f"manifest references missing blob sha256:{missing[0]}")
        path = name.manifest_path(self.root)
        with self._lock:
            old = self._find(self.root, name)
            atomic_write(path, data)
            if old is not None and old != path:  # same name, other case: keep one
                with contextlib.suppress(OSError):
                    old.unlink()
                self._prune_dirs(old.parent)

    # ---------------------------------------------------------------- models

    def list_models(self) -> list[StoreModel]:
        """Every servable model, newest first; a writable copy hides a read-only one."""
        seen: set[tuple[str, str, str, str]] = set()
        out: list[StoreModel] = []
        for root, ro in self._roots():
            for name, path in self._manifest_files(root):
                if name.key() in seen:
                    continue
                m = self._model_at(root, ro, name, path)
                if m is not None:
                    seen.add(name.key())
                    out.append(m)
        out.sort(key=lambda m: m.modified_at, reverse=True)
        return out

    def resolve(self, name: str) -> StoreModel | None:
        """``smollm2``, ``smollm2:latest`` or a full name; None when absent or invalid."""
        try:
            mn = parse_name(name)
        except BadRequest:
            return None
        for root, ro in self._roots():
            path = self._find(root, mn)
            if path is None:
                continue
            m = self._model_at(root, ro, mn, path)
            if m is not None and (mn.digest is None or m.digest == mn.digest):
                return m
        return None

    def _model_at(self, root: Path, ro: bool, name: ModelName, path: Path) -> StoreModel | None:
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        model = self._load(root, ro, name, path, st.st_mtime)
        with self._lock:
            self._cache[path] = (stamp, model)
        return model

    def _load(self, root: Path, ro: bool, name: ModelName, path: Path,
              mtime: float) -> StoreModel | None:
        try:
            data = path.read_bytes()
            manifest = parse_manifest(data)
        except (OSError, ManifestError) as e:
            log.warning("store.bad_manifest", path=str(path), error=str(e))
            return None
        blobs = root / "blobs"
        model_layer = manifest.first(MODEL)
        if model_layer is None or not (blobs / blob_filename(model_layer.digest)).is_file():
            log.debug("store.no_model_blob", path=str(path))
            return None
        gguf_path = blobs / blob_filename(model_layer.digest)
        proj = manifest.first(PROJECTOR)
        params = _json_layer(blobs, manifest.first(PARAMS))
        licenses = [t for la in manifest.of_type(LICENSE) if (t := _text_layer(blobs, la))]
        return StoreModel(
            name=name.display, model_name=name, gguf_path=gguf_path,
            projector_path=blobs / blob_filename(proj.digest) if proj else None,
            digest=hashlib.sha256(data).hexdigest(), size=manifest.size,
            modified_at=datetime.fromtimestamp(mtime, tz=timezone.utc),
            params=params if isinstance(params, dict) else {},
            system=_text_layer(blobs, manifest.first(SYSTEM)),
            template=_text_layer(blobs, manifest.first(TEMPLATE)),
            license="\n\n".join(licenses) if licenses else None,
            readonly=ro, manifest=manifest.raw, details=self._details(blobs, manifest, gguf_path),
            manifest_path=path, root=root,
        )

    def _details(self, blobs: Path, manifest: Manifest, gguf_path: Path) -> dict[str, Any]:
        cfg = _json_layer(blobs, manifest.config) if manifest.config else None
        if (isinstance(cfg, dict) and cfg.get("model_family")
                and (manifest.config is None or manifest.config.media_type == CONFIG_V1)):
            return details_from_config(cfg)
        info = self.gguf_info(gguf_path)
        return gguf.details(info) if info else {"parent_model": "", "format": "gguf"}

    def gguf_info(self, path: Path) -> gguf.GGUFInfo | None:
        """The GGUF header of a blob, cached by (path, size, mtime); None if unreadable."""
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._gguf_cache.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        try:
            info: gguf.GGUFInfo | None = gguf.read_gguf(path)
        except gguf.GGUFError as e:
            log.warning("store.bad_gguf", path=str(path), error=str(e))
            info = None
        with self._lock:
            self._gguf_cache[path] = (stamp, info)
        return info

    # ---------------------------------------------------------------- delete and copy

    def delete(self, name: str) -> list[str]:
        """Remove a model; returns the blobs (hex) that no manifest used any more."""
        mn = parse_name(name)
        with self._lock:
            found = self.read_manifest(mn)
            if found is None:
                if any(self._find(d, mn) for d in self.readonly_dirs):
                    raise Forbidden(f"model '{name}' is in a read-only store; "
                                    "routerd does not delete it")
                raise ModelNotFound(f"model '{name}' not found")
            path, data = found
            try:
                digests = parse_manifest(data).digests()
            except ManifestError:
                digests = set()
            path.unlink()
            self._cache.pop(path, None)
            self._prune_dirs(path.parent)
            removed = self.collect(digests)
        log.info("store.deleted", model=mn.display, blobs_removed=len(removed))
        return removed

    def collect(self, candidates: Iterable[str]) -> list[str]:
        """Delete the candidate blobs that no writable manifest references and no one pins."""
        with self._lock:
            referenced: set[str] = set()
            for _, p in self._manifest_files(self.root):
                with contextlib.suppress(OSError, ManifestError):
                    referenced |= parse_manifest(p.read_bytes()).digests()
            removed = []
            for d in set(candidates) - referenced - set(self._pins):
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(d).unlink()
                    removed.append(d)
            if removed:
                fsync_dir(self.blobs_dir)
            return sorted(removed)

    def copy(self, src: str, dst: str) -> StoreModel:
        """Copy a model under a new name (the manifest; blobs are shared or hard-linked)."""
        source = self.resolve(src)
        if source is None or source.manifest_path is None:
            raise ModelNotFound(f"model '{src}' not found")
        dest = parse_name(dst)
        data = source.manifest_path.read_bytes()
        manifest = parse_manifest(data)
        with self.pinned(manifest.digests()):
            for layer in manifest.all_layers():
                if not self.import_blob(layer.digest):
                    raise ModelNotFound(f"model '{src}' is missing blob {layer.ref}")
            self.write_manifest(dest, data)
        copied = self.resolve(dest.full)
        assert copied is not None
        log.info("store.copied", src=source.name, dst=copied.name)
        return copied

    def import_blob(self, digest: str) -> bool:
        """Make a blob present in the writable store (hard link, else copy from a
        read-only store); False when no store has it."""
        if self.adopt_blob(digest):
            return True
        src = self.find_blob(digest)
        if src is None:
            return False
        dst = self.blob_path(digest)
        tmp = dst.with_name(dst.name + "-partial-copy")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        return True

    def _prune_dirs(self, start: Path) -> None:
        base = self.root / "manifests"
        d = start
        while d != base and base in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


def _subdirs(path: Path, rx: re.Pattern[str]) -> Iterator[Path]:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        if rx.match(e.name) and e.is_dir(follow_symlinks=False):
            yield Path(e.path)


def _read_small(blobs: Path, layer: Layer | None) -> bytes | None:
    if layer is None or layer.size > _SMALL_LAYER:
        return None
    try:
        with open(blobs / blob_filename(layer.digest), "rb") as f:
            return f.read(_SMALL_LAYER)
    except OSError:
        return None


def _text_layer(blobs: Path, layer: Layer | None) -> str | None:
    data = _read_small(blobs, layer)
    return data.decode("utf-8", "replace") if data is not None else None


def _json_layer(blobs: Path, layer: Layer | None) -> Any:
    data = _read_small(blobs, layer)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None
