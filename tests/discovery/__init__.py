"""Helpers shared by the discovery tests: each tool's folder layout in a temporary HOME."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

HF_REV = "0123456789abcdef0123456789abcdef01234567"
# Ollama's grammar (types/model/name.go) as routerd's discovered names use it.
HOST_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
NS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")
MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")


def valid_name(name: str) -> bool:
    path, _, tag = name.partition(":")
    parts = path.split("/")
    checks = {1: [MODEL_RE], 2: [NS_RE, MODEL_RE], 3: [HOST_RE, NS_RE, MODEL_RE]}.get(len(parts))
    return (checks is not None and all(r.match(p) for r, p in zip(checks, parts))
            and bool(MODEL_RE.match(tag)))


def link(src: Path, dst: Path) -> Path:
    """A hard link to ``src`` (a copy where links are impossible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


@lru_cache(maxsize=None)
def tiny_gguf_bytes(arch: str = "llama", file_type: int = 2, ctx: int = 2048,
                    split: tuple[int, int] | None = None,
                    uint32s: tuple[tuple[str, int], ...] = ()) -> bytes:
    """A small valid GGUF: one Q4_0-typed weight (or F16 for a clip projector); `uint32s`:
    extra metadata keys (e.g. ("bert.pooling_type", 4))."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.gguf"
        w = GGUFWriter(path, arch)
        w.add_name("tiny")
        w.add_file_type(file_type)
        w.add_context_length(ctx)
        w.add_block_count(1)
        for key, value in uint32s:
            w.add_uint32(key, value)
        if split is not None:
            w.add_uint16("split.no", split[0] - 1)
            w.add_uint16("split.count", split[1])
        if arch == "clip":
            w.add_tensor("v.patch_embd.weight", np.zeros((8, 32), np.float16))
        else:
            raw = np.zeros((8, 32 // 32 * 18), np.uint8)
            w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=GGMLQuantizationType.Q4_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def tiny_gguf(path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_gguf_bytes(**kw))
    return path


def hf_repo(hub: Path, org: str, repo: str, files: dict[str, Path], rev: str = HF_REV,
            main: bool = True) -> Path:
    """A Hugging Face hub cache entry: blobs, a snapshot of symlinks, refs/main."""
    root = hub / f"models--{org}--{repo}"
    snap = root / "snapshots" / rev
    for name, src in files.items():
        blob = root / "blobs" / hashlib.sha256(f"{rev}/{name}".encode()).hexdigest()
        link(src, blob)
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
    return snap


def build_home(home: Path, model: Path) -> dict[str, Path]:
    """Every tool's layout (Linux paths) holding the real model; returns name → path."""
    gpt4all = home / ".local/share/nomic.ai/GPT4All"
    lms = home / ".lmstudio/models/bartowski/SmolLM2-135M-Instruct-GGUF"
    old_lms = home / ".cache/lm-studio/models/lmstudio-community/SmolLM2-Old"
    llama_cache = home / ".cache/llama.cpp"
    mine = home / "mymodels"
    snap = hf_repo(home / ".cache/huggingface/hub", "HuggingFaceTB",
                   "SmolLM2-135M-Instruct-GGUF", {"smollm2-135m-instruct-q4_1.gguf": model})
    return {
        "gpt4all/smollm2-135m-instruct:q4_1": link(model, gpt4all / model.name),
        "lmstudio/bartowski/smollm2-135m-instruct-gguf:q4_1": link(model, lms / model.name),
        "lmstudio/lmstudio-community/smollm2-old:q4_1": link(model, old_lms / model.name),
        "hf/huggingfacetb/smollm2-135m-instruct-gguf:q4_1":
            snap / "smollm2-135m-instruct-q4_1.gguf",
        "llamacpp/bartowski/smollm2-135m-instruct-gguf:q4_1": link(
            model, llama_cache / "bartowski_SmolLM2-135M-Instruct-GGUF_SmolLM2-135M-Instruct-Q4_1.gguf"),
        "local/mymodels/smollm2-135m-instruct:q4_1": link(model, mine / "sub" / model.name),
    }


def add_broken(home: Path, model: Path) -> list[Path]:
    """One broken file of each kind, in the folders of the tools that produce them."""
    gpt4all = home / ".local/share/nomic.ai/GPT4All"
    lms = home / ".lmstudio/models/bartowski/SmolLM2-135M-Instruct-GGUF"
    llama_cache = home / ".cache/llama.cpp"
    snap = home / ".cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" \
        / "snapshots" / HF_REV
    with open(model, "rb") as f:
        head = f.read(256 * 1024)
    broken = {
        gpt4all / "ggml-gpt4all-j-v1.3-groovy.bin": b"lmgg" + b"\0" * 4096,  # old GGML
        gpt4all / "incomplete-Llama-3.2-1B-Instruct-Q4_0.gguf": head,  # GPT4All in progress
        lms / "SmolLM2-135M-Instruct-Q8_0.gguf": head,  # truncated download
        lms / "SmolLM2-135M-Instruct-Q6_K.gguf.part": head,
        llama_cache / "org_Repo-GGUF_file-Q4_K_M.gguf.downloadInProgress": head,
        home / "mymodels/notes.gguf": b"this is not a model\n",
        home / "mymodels/half.gguf.partial": head,
        home / "mymodels/old.gguf.incomplete": head,
    }
    for path, data in broken.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    dangling = snap / "gone-q8_0.gguf"
    dangling.symlink_to("../../blobs/" + "f" * 64)  # the blob was deleted
    split = tiny_gguf(home / "mymodels/big-00001-of-00003.gguf", split=(1, 3))
    tiny_gguf(home / "mymodels/big-00002-of-00003.gguf", split=(2, 3))  # part 3 missing
    return [*broken, dangling, split]


def snapshot(root: Path, hash_limit: int = 1 << 20) -> dict[str, tuple]:
    """Every path under root: (kind, size, mtime_ns, sha256 of small files, link target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = ""
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
                continue
            if p.is_file() and st.st_size <= hash_limit:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p)] = ("dir" if p.is_dir() else "file", st.st_size, st.st_mtime_ns,
                           st.st_mode, digest)
    return out
