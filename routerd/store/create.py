"""Building a model from `/api/create`: layers from uploaded blobs (`files`) or another
model (`from`), new layers for the system prompt, template, parameters, license and messages,
then the manifest. Blocking; the route runs it in a thread."""

from __future__ import annotations

import json
import re
from typing import Any

import structlog

from ..errors import BadRequest, ModelNotFound
from . import gguf
from .manifests import (CONFIG_V1, LICENSE, MESSAGES, MODEL, PARAMS, PROJECTOR, SYSTEM,
                               TEMPLATE, Layer, build_config, build_manifest, parse_manifest)
from .names import ModelName, parse_digest
from .pull import progress
from .store import Store

log = structlog.get_logger(__name__)

_PARAM_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


def build_model(store: Store, name: ModelName, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Assemble and store a model (blocking; run in a thread); returns the status events."""
    events: list[dict[str, Any]] = []
    if body.get("files"):
        events.append(progress("parsing GGUF"))
        base, details = _layers_from_files(store, body["files"])
        params: dict[str, Any] = {}
    elif body.get("from"):
        base, details, params = _layers_from_model(store, body["from"])
    else:
        raise BadRequest("neither 'from' nor 'files' was specified")
    new = _new_layers(body, params)
    replaced = {media for media, _ in new}
    layers = [la for la in base if la.media_type not in replaced]
    with store.pinned(la.digest for la in base):
        for la in layers:
            events.append(progress(f"using existing layer {la.ref}"))
        for media, data in new:
            digest, created = store.add_blob(data)
            layers.append(Layer(media, digest, len(data)))
            events.append(progress(f"{'creating new' if created else 'using existing'} "
                                   f"layer sha256:{digest}"))
        cfg = build_config(details, layers)
        cfg_digest, _ = store.add_blob(cfg)
        events.append(progress("writing manifest"))
        store.write_manifest(name, build_manifest(Layer(CONFIG_V1, cfg_digest, len(cfg)), layers))
    events.append(progress("success"))
    log.info("store.created", model=name.display, layers=len(layers))
    return events


def _layers_from_files(store: Store, files: Any) -> tuple[list[Layer], dict[str, Any]]:
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BadRequest("files must map file names to sha256 digests")
    layers: list[Layer] = []
    details: dict[str, Any] = {}
    for fname, ref in files.items():
        digest = parse_digest(ref)
        if not str(fname).lower().endswith(".gguf"):
            raise BadRequest(f"{fname}: only GGUF files are supported")
        if not store.import_blob(digest):
            raise BadRequest(f"blob sha256:{digest} not found: upload it first "
                             f"(POST /api/blobs/sha256:{digest})")
        path = store.blob_path(digest)
        info = store.gguf_info(path)
        if info is None:
            raise BadRequest(f"{fname} is not a valid GGUF file")
        media = PROJECTOR if info.architecture == "clip" else MODEL
        if media == MODEL:
            if details:
                raise BadRequest("more than one model GGUF in files")
            details = gguf.details(info)
        layers.append(Layer(media, digest, path.stat().st_size))
    if not details:
        raise BadRequest("files holds no model GGUF")
    layers.sort(key=lambda la: la.media_type != MODEL)
    return layers, details


def _layers_from_model(store: Store, src: Any) -> tuple[list[Layer], dict[str, Any],
                                                        dict[str, Any]]:
    if not isinstance(src, str):
        raise BadRequest("from must be a model name")
    model = store.resolve(src)
    if model is None or model.manifest_path is None:
        raise ModelNotFound(f"model '{src}' not found")
    manifest = parse_manifest(model.manifest_path.read_bytes())
    for la in manifest.layers:
        if not store.import_blob(la.digest):
            raise ModelNotFound(f"model '{src}' is missing blob {la.ref}")
    return list(manifest.layers), dict(model.details), dict(model.params)


def _new_layers(body: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, bytes]]:
    new: list[tuple[str, bytes]] = []
    for key, media in (("template", TEMPLATE), ("system", SYSTEM)):
        if key in body and body[key] is not None:
            if not isinstance(body[key], str):
                raise BadRequest(f"{key} must be a string")
            new.append((media, body[key].encode()))
    lic = body.get("license")
    if lic is not None:
        texts = [lic] if isinstance(lic, str) else lic
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("license must be a string or a list of strings")
        new.extend((LICENSE, t.encode()) for t in texts)
    if body.get("parameters") is not None:
        merged = {**params, **_check_parameters(body["parameters"])}
        new.append((PARAMS, json.dumps(merged).encode()))
    if body.get("messages") is not None:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest("messages must be a list of {role, content}")
        new.append((MESSAGES, json.dumps([{"role": m["role"], "content": m["content"]}
                                          for m in msgs]).encode()))
    return new


def _check_parameters(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest("parameters must be an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _PARAM_KEY.match(key):
            raise BadRequest(f"invalid parameter name {str(key)[:64]!r}")
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest("stop must be a string or a list of strings")
        elif isinstance(value, list):
            if not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise BadRequest(f"parameter {key}: invalid value")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise BadRequest(f"parameter {key}: invalid value")
        out[key] = value
    return out
