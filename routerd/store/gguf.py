"""GGUF header metadata: what a model is and how much memory its weights take.

Reads the key/value section and the tensor-info table only; tensor data is never
touched, so one call costs a few milliseconds even for large models.

Why not ``gguf.GGUFReader``: it builds one numpy view per array element (SmolLM2's
49,152 tokens plus 48,900 merges), which takes 0.5-1.5 s for a 98 MB model, and it
always maps the file from byte 0, so it cannot read the GGUF stored inside a
llamafile's ZIP.  Its ``__init__`` does all the parsing in one body, so a subclass
would have to copy it anyway.  This module walks the same layout with ``struct``
over an ``mmap`` and takes the quant block sizes and file-type names from the ``gguf``
package; the tests compare it against GGUFReader.  ``gguf`` (and numpy under it, about 13
MiB and 80 ms) is imported on the first tensor table read, not when routerd starts; the
magic, alignment and value-type numbers are the file format's own (GGUF spec).
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from enum import IntEnum


class GGUFValueType(IntEnum):
    """Metadata value types, numbered as the GGUF spec numbers them (gguf.GGUFValueType)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
GGUF_DEFAULT_ALIGNMENT = 32


@functools.cache
def _lib() -> Any:
    """The gguf package, imported on first use (it pulls in numpy)."""
    import gguf

    return gguf


def _float32(x: float) -> float:
    """The shortest decimal that reads back as the same float32, as Ollama's JSON shows it
    (1e-05, not 9.999999747378752e-06)."""
    for digits in range(1, 10):
        short = float(f"{x:.{digits}g}")
        try:
            if struct.unpack("<f", struct.pack("<f", short))[0] == x:
                return short
        except OverflowError:  # rounded past the largest float32 (3.4028235e38)
            continue
    return x

# Arrays longer than this are not materialised: metadata shows them as None, the
# way Ollama's /api/show model_info shows tokenizer.ggml.tokens unless verbose.
MAX_ARRAY = 1024
# Header bounds, checked before anything is allocated for what a count claims (a 192-byte
# file claiming 4e7 layers must not cost 600 MiB). Counts are also checked against the bytes
# left in the file: every key or tensor entry takes at least _MIN_KV / _MIN_TENSOR bytes.
_MAX_KV = 1 << 16  # real models carry under 100 keys
_MAX_TENSORS = 1 << 17  # real models carry a few thousand tensors
_MAX_DIMS = 8  # ggml has 4
_MAX_KEY = (1 << 16) - 1  # the GGUF spec's limit on a key's length
_MAX_NAME = 1024  # tensor names (ggml allows 63 bytes)
_MAX_STRING = 1 << 20  # longer string values are not kept in metadata (None), like long arrays
_MAX_KEPT = 1 << 16  # array elements materialised per file, all arrays together
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_INT64_MAX = (1 << 63) - 1
# llama.cpp's LLAMA_MAX_LAYERS is 512; the rest are far past any real model's shapes.
_BOUNDS = {"block_count": 512, "embedding_length": 1 << 20, "feed_forward_length": 1 << 22,
           "attention.head_count": 1 << 14, "attention.head_count_kv": 1 << 14,
           "attention.key_length": 1 << 16, "attention.value_length": 1 << 16,
           "context_length": (1 << 32) - 1, "vocab_size": 1 << 24}
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_STRUCTS = {e + c: struct.Struct(e + c) for e in "<>" for c in "BbHhIifd?Qq"}
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFError(ValueError):
    """The file is not a GGUF, or is truncated or malformed."""


class TensorInfo(NamedTuple):
    name: str
    n_bytes: int
    ggml_type: str
    n_elements: int


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    offset: int
    size: int  # bytes of the GGUF from offset to the end of its tensor data
    version: int
    architecture: str
    name: str
    file_type: int | None
    quantization_level: str
    parameter_count: int
    parameter_size: str
    context_length: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    tensor_bytes: int
    tensors: tuple[TensorInfo, ...]
    layer_bytes: tuple[int, ...]  # weight bytes of blk.<i>.* per layer i
    input_bytes: int  # token embeddings and other non-layer tensors (llama.cpp keeps on CPU)
    output_bytes: int  # output head + output norm (on GPU only when every layer is)
    chat_template: str | None
    metadata: dict[str, Any] = field(repr=False, hash=False, compare=False)


@dataclass(frozen=True)
class ZipGGUF:
    """The GGUF inside a llamafile: where its bytes start and the embedded .args."""

    path: str
    member: str
    offset: int
    size: int
    args: tuple[str, ...]


class _Header:
    """A bounds-checked cursor over the mapped file (struct errors mean truncation)."""

    def __init__(self, buf: mmap.mmap, offset: int) -> None:
        self.buf = buf
        self.pos = offset
        self.e = "<"
        self.kept = 0  # array elements materialised so far (bounded by _MAX_KEPT)

    def left(self) -> int:
        return len(self.buf) - self.pos

    def scalar(self, code: str) -> Any:
        st = _STRUCTS[self.e + code]
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self, limit: int | None = None, what: str = "string") -> str | None:
        """A string; a longer one than ``limit`` is an error when ``what`` names a key or a
        name, else it is skipped and read as None (a value too long to keep)."""
        n = self.scalar("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFError(f"truncated: {what} of {n} bytes at {self.pos} runs past the end")
        if limit is not None and n > limit:
            if what != "string":
                raise GGUFError(f"{what} of {n} bytes at {self.pos} is longer than {limit}")
            self.pos = end
            return None
        s = self.buf[self.pos:end].decode("utf-8", "replace")
        self.pos = end
        return s

    def name(self, limit: int, what: str) -> str:
        s = self.string(limit, what)
        assert s is not None  # a key or a name over its limit raised
        return s

    def value(self, vtype: int) -> tuple[Any, int | None]:
        """Read one value; returns (value, array length or None)."""
        if vtype == GGUFValueType.STRING:
            return self.string(_MAX_STRING), None
        code = _SCALARS.get(vtype)
        if code == "f":  # shortest float32 repr, as Ollama's JSON shows it: 1e-05
            return _float32(self.scalar(code)), None
        if code is not None:
            return self.scalar(code), None
        if vtype != GGUFValueType.ARRAY:
            raise GGUFError(f"unknown value type {vtype} at {self.pos}")
        at = self.pos
        itype, count = self.scalar("I"), self.scalar("Q")
        if itype == GGUFValueType.ARRAY:  # llama.cpp refuses them too
            raise GGUFError(f"array of arrays at {at}: nested arrays are not supported")
        code = _SCALARS.get(itype)
        if code is None and itype != GGUFValueType.STRING:
            raise GGUFError(f"array of unknown value type {itype} at {at}")
        least = struct.calcsize(code) if code is not None else 8  # a string: its length
        if count * least > self.left():
            raise GGUFError(f"truncated: array of {count} elements at {at} runs past the end")
        if count > MAX_ARRAY or self.kept + count > _MAX_KEPT:
            self.skip_array(itype, count)
            return None, count
        self.kept += count
        return [self.value(itype)[0] for _ in range(count)], count

    def skip_array(self, itype: int, count: int) -> None:
        code = _SCALARS.get(itype)
        if code is not None:
            self.pos += struct.calcsize(code) * count
        elif itype == GGUFValueType.STRING:
            unpack, buf, pos = _STRUCTS[self.e + "Q"].unpack_from, self.buf, self.pos
            for _ in range(count):  # the hot loop of the whole reader: keep it bare
                pos += 8 + unpack(buf, pos)[0]
            self.pos = pos
        else:
            for _ in range(count):
                self.value(itype)
        if self.pos > len(self.buf):
            raise GGUFError("array runs past the end of the file")


POOLING_RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker's classification head


def is_reranker(info: GGUFInfo) -> bool:
    """Whether the GGUF says it is a reranker (`<arch>.pooling_type` is rank)."""
    return info.metadata.get(f"{info.architecture}.pooling_type") == POOLING_RANK


def is_gguf(path: str | Path, offset: int = 0) -> bool:
    """True when the file starts (at offset) with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == GGUF_MAGIC


@functools.lru_cache(maxsize=1024)
def _header(path: str, size: int, mtime_ns: int) -> GGUFInfo | GGUFError:
    try:
        zipped = None if is_gguf(path) else find_gguf_in_zip(path)
        return read_gguf(path, zipped.offset if zipped else 0)
    except GGUFError as e:
        return e
    except (OSError, ValueError) as e:
        return GGUFError(f"{path}: cannot read GGUF: {e}")


def header(path: str | Path, st: os.stat_result | None = None) -> GGUFInfo:
    """The GGUF header of a .gguf, or of the GGUF inside a llamafile, parsed once per
    (path, size, mtime): routerd's one header cache (memory estimates, /api/show,
    discovery). Raises GGUFError (or OSError when the file cannot be stat'ed)."""
    path = os.fspath(path)
    st = st or os.stat(path)
    found = _header(path, st.st_size, st.st_mtime_ns)
    if isinstance(found, GGUFError):
        raise found
    return found


def read_gguf(path: str | Path, offset: int = 0) -> GGUFInfo:
    """Parse the GGUF header that starts at ``offset`` in ``path`` (0 for a .gguf)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size <= offset:
                raise GGUFError(f"{path}: empty or shorter than offset {offset}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, offset)
    except GGUFError:
        raise
    except (struct.error, UnicodeError, OverflowError, MemoryError, IndexError, RecursionError) as e:
        raise GGUFError(f"{path}: truncated or malformed GGUF ({e})") from None
    except (OSError, ValueError) as e:
        raise GGUFError(f"{path}: cannot read GGUF: {e}") from None


def _parse(path: str, buf: mmap.mmap, offset: int) -> GGUFInfo:
    h = _Header(buf, offset)
    if h.scalar("I") != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (bad magic at offset {offset})")
    version = h.scalar("I")
    if version & 0xFFFF == 0:  # written on a big-endian host
        h.e, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = h.scalar("Q"), h.scalar("Q")
    if n_kv > _MAX_KV or n_kv * _MIN_KV > h.left():
        raise GGUFError(f"{path}: implausible header: {n_kv} keys (at most {_MAX_KV}, "
                        f"and {h.left()} bytes left for them)")
    if n_tensors > _MAX_TENSORS or n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > h.left():
        raise GGUFError(f"{path}: implausible header: {n_tensors} tensors (at most "
                        f"{_MAX_TENSORS}, and {h.left()} bytes left for them and {n_kv} keys)")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    try:
        for _ in range(n_kv):
            key = h.name(_MAX_KEY, "key")
            value, length = h.value(h.scalar("I"))
            metadata[key] = value
            if length is not None:
                lengths[key] = length
        if n_tensors * _MIN_TENSOR > h.left():
            raise GGUFError(f"truncated: {n_tensors} tensors do not fit in {h.left()} bytes")
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: invalid general.alignment {align!r}")
    _check_shapes(path, metadata)
    try:
        raw = [_tensor_info(h, align) for _ in range(n_tensors)]
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    # Alignment is relative to the start of the GGUF, not of the file holding it.
    data_start = offset + -(-(h.pos - offset) // align) * align
    data_end = max((off + t.n_bytes for t, off in raw), default=0)
    size = data_start - offset + -(-data_end // align) * align
    if data_start + data_end > len(buf):
        raise GGUFError(f"{path}: truncated: tensor data ends at {data_start + data_end}, "
                        f"file has {len(buf)} bytes")
    return _info(path, offset, size, version, metadata, lengths, tuple(t for t, _ in raw))


def _check_shapes(path: str, md: dict[str, Any]) -> None:
    """The model's shape numbers within _BOUNDS: what is sized from them (per-layer lists,
    KV-cache and compute estimates) stays small and finite."""
    arch = _str(md.get("general.architecture")) or "unknown"
    for key, most in _BOUNDS.items():
        v = md.get(f"{arch}.{key}")
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not 0 <= x <= most:  # NaN fails too
                raise GGUFError(f"{path}: implausible {arch}.{key} = {x} "
                                f"(at most {most})")


def _tensor_info(h: _Header, align: int) -> tuple[TensorInfo, int]:
    name = h.name(_MAX_NAME, "tensor name")
    n_dims = h.scalar("I")
    if n_dims > _MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
    n_elements = 1
    for _ in range(n_dims):
        n_elements *= h.scalar("Q")
        if n_elements > _INT64_MAX:
            raise GGUFError(f"tensor {name!r} has more elements than INT64_MAX")
    raw_type, data_offset = h.scalar("I"), h.scalar("Q")
    if data_offset % align:
        raise GGUFError(f"tensor {name!r} data offset {data_offset} is not a multiple of "
                        f"the alignment {align}")
    try:
        lib = _lib()
        qtype = lib.GGMLQuantizationType(raw_type)
        block, type_size = lib.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    return TensorInfo(name, n_elements * type_size // block, qtype.name, n_elements), data_offset


def _info(path: str, offset: int, size: int, version: int, md: dict[str, Any],
          lengths: dict[str, int], tensors: tuple[TensorInfo, ...]) -> GGUFInfo:
    arch = _str(md.get("general.architecture")) or "unknown"

    def num(key: str, default: int = 0) -> int:
        v = md.get(f"{arch}.{key}")
        if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): take the max
            v = max((x for x in v if isinstance(x, (int, float))), default=default)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    n_embd, n_head = num("embedding_length"), num("attention.head_count")
    n_head_kv = num("attention.head_count_kv", n_head)
    head_dim = n_embd // n_head if n_head else 0
    file_type = md.get("general.file_type")
    file_type = file_type if isinstance(file_type, int) else None
    params = md.get("general.parameter_count")
    if not isinstance(params, int) or params <= 0:
        params = sum(t.n_elements for t in tensors)
    layers, inp, out = _placement(tensors, num("block_count"))
    template = md.get("tokenizer.chat_template")
    return GGUFInfo(
        path=path, offset=offset, size=size, version=version, architecture=arch,
        name=_str(md.get("general.name")), file_type=file_type,
        quantization_level=_quant_name(file_type, tensors),
        parameter_count=params, parameter_size=human_number(params),
        context_length=num("context_length"), n_layer=num("block_count"),
        n_embd=n_embd, n_ff=num("feed_forward_length"), n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=num("attention.key_length", head_dim),
        head_dim_v=num("attention.value_length", head_dim),
        n_vocab=num("vocab_size", lengths.get("tokenizer.ggml.tokens", 0)),
        tensor_bytes=sum(t.n_bytes for t in tensors), tensors=tensors,
        layer_bytes=layers, input_bytes=inp, output_bytes=out,
        chat_template=template if isinstance(template, str) else None, metadata=md)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _placement(tensors: tuple[TensorInfo, ...], n_layer: int) -> tuple[tuple[int, ...], int, int]:
    """Bytes per layer, input (non-layer) bytes, output-head bytes.

    With tied embeddings (no output.weight) llama.cpp reuses token_embd as the output
    head, so it counts on the output side as well."""
    layers = [0] * n_layer
    inp = out = 0
    has_output = any(t.name == "output.weight" for t in tensors)
    for t in tensors:
        m = _LAYER_RE.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += t.n_bytes
        elif t.name.startswith("output"):
            out += t.n_bytes
        else:
            inp += t.n_bytes
            if t.name == "token_embd.weight" and not has_output:
                out += t.n_bytes
    return tuple(layers), inp, out


def _quant_name(file_type: int | None, tensors: tuple[TensorInfo, ...]) -> str:
    if file_type is not None:
        try:
            ftype = _lib().LlamaFileType
            name = ftype(file_type & ~ftype.GUESSED).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # Dominant type by bytes among weight matrices (norms and biases are F32 anyway).
    weights: dict[str, int] = {}
    for t in tensors:
        if t.name.endswith(".weight") and "norm" not in t.name:
            weights[t.ggml_type] = weights.get(t.ggml_type, 0) + t.n_bytes
    return max(weights, key=lambda k: weights[k]) if weights else "unknown"


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 134515008 -> '134.52M', 7241732096 -> '7.2B'."""
    for scale, suffix, digits in ((10**9, "B", 1), (10**6, "M", 2)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.{digits}f}{suffix}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def details(info: GGUFInfo) -> dict[str, Any]:
    """Ollama's ``details`` object (/api/tags, /api/show, /api/ps)."""
    return {
        "parent_model": "", "format": "gguf", "family": info.architecture,
        "families": [info.architecture], "parameter_size": info.parameter_size,
        "quantization_level": info.quantization_level,
    }


def model_info(info: GGUFInfo, verbose: bool = False) -> dict[str, Any]:
    """Ollama's /api/show ``model_info``: the GGUF KVs minus name and chat template.

    Long arrays (tokens, merges) are None unless ``verbose`` re-reads them in full."""
    out = {k: v for k, v in info.metadata.items()
           if k not in ("general.name", "tokenizer.chat_template")}
    out["general.parameter_count"] = info.parameter_count
    if verbose:
        out.update(_long_arrays(info))
    return dict(sorted(out.items()))


def _long_arrays(info: GGUFInfo) -> dict[str, Any]:
    """The arrays left out of ``metadata`` (verbose /api/show), read in full."""
    missing = {k for k, v in info.metadata.items() if v is None}
    if not missing:
        return {}
    from gguf import GGUFReader  # slow but complete; only for the rare verbose request

    if info.offset:  # GGUFReader cannot start inside a llamafile: keep them None
        return {}
    reader = GGUFReader(info.path)
    return {k: reader.fields[k].contents() for k in missing if k in reader.fields}


def find_gguf_in_zip(path: str | Path) -> ZipGGUF | None:
    """Locate the GGUF inside a llamafile (an APE launcher with a ZIP appended).

    Returns None when the file is not a ZIP or holds no .gguf member; raises
    GGUFError when the member is compressed (llama.cpp must mmap it in place)."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
            if not members:
                return None
            member = members[0]
            if member.compress_type != zipfile.ZIP_STORED:
                raise GGUFError(f"{path}: {member.filename} is compressed; it must be STORED")
            args = _zip_args(zf)
        offset = _zip_data_offset(path, member.header_offset)
    except zipfile.BadZipFile:
        return None
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e}") from None
    return ZipGGUF(path, member.filename, offset, member.file_size, args)


def _zip_args(zf: zipfile.ZipFile) -> tuple[str, ...]:
    """llamafile's .args: one argument per line; '...' marks where CLI args go."""
    try:
        text = zf.read(".args").decode("utf-8", "replace")
    except KeyError:
        return ()
    return tuple(line for line in (s.strip("\r") for s in text.split("\n")) if line.strip())


def _zip_data_offset(path: str, header_offset: int) -> int:
    """Absolute offset of a member's data: past the local header and its own extra field."""
    with open(path, "rb") as f:
        f.seek(header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise GGUFError(f"{path}: bad ZIP local header at {header_offset}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return header_offset + 30 + name_len + extra_len


def split_parts(path: str | Path) -> list[Path]:
    """All parts of ``name-0000i-of-0000n.gguf`` in order; [path] for a single file.

    Raises GGUFError naming the missing parts when the set is incomplete."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return [p]
    n = int(m.group("n"))
    parts = [p.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [q.name for q in parts if not q.exists()]
    if missing:
        raise GGUFError(f"{p}: split model is missing {', '.join(missing)}")
    return parts


def read_model(path: str | Path, offset: int = 0) -> GGUFInfo:
    """read_gguf for a whole model: a split model's tensors are summed over its parts."""
    parts = split_parts(path) if offset == 0 else [Path(path)]
    first = read_gguf(parts[0], offset)
    if len(parts) == 1:
        return first
    infos = [first] + [read_gguf(q) for q in parts[1:]]
    tensors = tuple(t for i in infos for t in i.tensors)
    layers, inp, out = _placement(tensors, first.n_layer)
    params = first.metadata.get("general.parameter_count")
    if not isinstance(params, int) or params <= 0:
        params = sum(t.n_elements for t in tensors)
    return replace(first, size=sum(i.size for i in infos), tensors=tensors,
                   tensor_bytes=sum(t.n_bytes for t in tensors), layer_bytes=layers,
                   input_bytes=inp, output_bytes=out, parameter_count=params,
                   parameter_size=human_number(params))
