from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerd.store.gguf import (
    GGUFError,
    GGUFInfo,
    details,
    find_gguf_in_zip,
    human_number,
    is_gguf,
    model_info,
    read_gguf,
    read_model,
    split_parts,
)

MODEL = Path(os.environ.get(
    "ROUTERD_TEST_MODEL", "~/.cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf"
)).expanduser()
# `make test` fetches the model: missing it is a failure, not a skip.
needs_model = pytest.mark.usefixtures("model_present")


@pytest.fixture
def model_present() -> None:
    assert MODEL.exists(), f"{MODEL} missing: run `make install`"

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"


def write_gguf(path: Path, *, n_layer: int = 2, file_type: int | None = 7, tied: bool = False,
               n_tokens: int = 2000, extra: dict[str, Any] | None = None) -> Path:
    """A tiny llama-shaped GGUF: F32 embeddings, Q8_0 layer weights, F32 norms."""
    w = GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(n_tokens)])
    w.add_token_types([1] * n_tokens)
    w.add_chat_template(TEMPLATE)
    w.add_array("general.languages", ["en", "fr"])
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint64(key, value)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    for i in range(n_layer):
        for name, rows in (("attn_q", 64), ("attn_k", 32), ("ffn_up", 128)):
            raw = np.zeros((rows, 64 // 32 * 34), np.uint8)
            w.add_tensor(f"blk.{i}.{name}.weight", raw,
                         raw_dtype=GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((32, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


def test_reads_synthetic_header(tiny: Path) -> None:
    info = read_gguf(tiny)
    assert (info.architecture, info.name, info.n_layer, info.context_length) == ("llama", "tiny", 2, 2048)
    assert (info.n_embd, info.n_ff, info.n_head, info.n_head_kv) == (64, 128, 4, 2)
    assert (info.head_dim_k, info.head_dim_v, info.n_vocab) == (16, 16, 2000)
    assert info.quantization_level == "Q8_0" and info.file_type == 7
    assert info.chat_template == TEMPLATE
    assert info.metadata["general.languages"] == ["en", "fr"]
    assert info.metadata["tokenizer.ggml.tokens"] is None  # long array left out
    assert info.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert info.size == tiny.stat().st_size and info.offset == 0


def test_matches_gguf_reader(tiny: Path) -> None:
    reader = GGUFReader(tiny)
    info = read_gguf(tiny)
    assert [(t.name, int(t.n_bytes), t.tensor_type.name, int(t.n_elements)) for t in reader.tensors] \
        == [tuple(t) for t in info.tensors]
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.to"):
            continue
        expected = field.contents()
        got = info.metadata[key]
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected


def test_layer_placement_summary(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "a.gguf", n_layer=3))
    per_layer = 3 * 0 + (64 + 32 + 128) * 68 + 64 * 4  # Q8_0: 34 bytes per 32 values
    assert info.layer_bytes == (per_layer,) * 3
    assert info.input_bytes == 32 * 64 * 4
    assert info.output_bytes == 64 * 4 + 32 * 64 * 2
    assert sum(info.layer_bytes) + info.input_bytes + info.output_bytes == info.tensor_bytes


def test_tied_embeddings_count_on_output_side(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "t.gguf", tied=True))
    assert info.output_bytes == 64 * 4 + 32 * 64 * 4


def test_quantization_falls_back_to_dominant_tensor_type(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "q.gguf", file_type=None))
    assert info.file_type is None and info.quantization_level == "Q8_0"


def test_parameter_count_summed_when_absent_and_taken_when_present(tmp_path: Path) -> None:
    summed = read_gguf(write_gguf(tmp_path / "p.gguf"))
    assert summed.parameter_count == sum(t.n_elements for t in summed.tensors)
    w = read_gguf(write_gguf(tmp_path / "q.gguf", extra={"general.parameter_count": 7_241_732_096}))
    assert w.parameter_count == 7_241_732_096 and w.parameter_size == "7.2B"


@pytest.mark.parametrize("n, text", [
    (134_515_008, "134.52M"), (7_241_732_096, "7.2B"), (8_000_000_000, "8B"),
    (3_000_000, "3M"), (12_345, "12K"), (999, "999"), (0, "0"),
])
def test_human_number_like_ollama(n: int, text: str) -> None:
    assert human_number(n) == text


def test_details_and_model_info(tiny: Path) -> None:
    info = read_gguf(tiny)
    assert details(info) == {
        "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
        "parameter_size": info.parameter_size, "quantization_level": "Q8_0",
    }
    mi = model_info(info)
    assert "general.name" not in mi and "tokenizer.chat_template" not in mi
    assert mi["general.architecture"] == "llama" and mi["llama.context_length"] == 2048
    assert mi["general.parameter_count"] == info.parameter_count
    assert mi["tokenizer.ggml.tokens"] is None and list(mi) == sorted(mi)
    verbose = model_info(info, verbose=True)
    assert verbose["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert len(verbose["tokenizer.ggml.token_type"]) == 2000


def test_reads_at_offset(tmp_path: Path, tiny: Path) -> None:
    blob = tmp_path / "prefixed.bin"
    blob.write_bytes(b"\x7fELF" + b"x" * 4093 + tiny.read_bytes() + b"trailing zip bytes")
    info = read_gguf(blob, offset=4097)
    plain = read_gguf(tiny)
    assert info.offset == 4097 and info.size == plain.size
    assert info.tensors == plain.tensors and info.metadata == plain.metadata
    assert is_gguf(blob, 4097) and not is_gguf(blob)


def make_llamafile(path: Path, gguf: Path, *, stored: bool = True, args: str | None = None) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ggml-cuda.dll", b"\0" * 100, compress_type=zipfile.ZIP_DEFLATED)
        if args is not None:
            zf.writestr(".args", args, compress_type=zipfile.ZIP_DEFLATED)
        zf.write(gguf, "tiny.gguf",
                 compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    path.write_bytes(b"MZqFpD='\n#!/bin/sh\n" + b"\0" * 5000 + buf.getvalue())
    return path


def test_llamafile_zip(tmp_path: Path, tiny: Path) -> None:
    lf = make_llamafile(tmp_path / "tiny.llamafile", tiny,
                        args="-m\ntiny.gguf\n--ctx-size\n2048\n\n--prompt\nhello world\n...\n")
    z = find_gguf_in_zip(lf)
    assert z is not None and z.member == "tiny.gguf" and z.size == tiny.stat().st_size
    assert z.args == ("-m", "tiny.gguf", "--ctx-size", "2048", "--prompt", "hello world", "...")
    with open(lf, "rb") as f:
        f.seek(z.offset)
        assert f.read(z.size) == tiny.read_bytes()
    info = read_gguf(lf, z.offset)
    assert info.size == z.size and info.tensors == read_gguf(tiny).tensors


def test_llamafile_without_args_and_not_a_zip(tmp_path: Path, tiny: Path) -> None:
    z = find_gguf_in_zip(make_llamafile(tmp_path / "a.llamafile", tiny))
    assert z is not None and z.args == ()
    assert find_gguf_in_zip(tiny) is None
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hi")
    assert find_gguf_in_zip(empty) is None


def test_llamafile_compressed_gguf_is_an_error(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(GGUFError, match="STORED"):
        find_gguf_in_zip(make_llamafile(tmp_path / "c.llamafile", tiny, stored=False))


def test_invalid_files_raise_gguf_error(tmp_path: Path) -> None:
    cases = {"empty": b"", "short": b"GG", "text": b"hello world" * 10,
             "version": b"GGUF" + (99).to_bytes(4, "little") + b"\0" * 16}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GGUFError):
            read_gguf(tmp_path / name)
        assert not is_gguf(tmp_path / name) or name == "version"
    with pytest.raises(GGUFError):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError):
        read_gguf(tmp_path / "text", offset=10_000)
    assert not is_gguf(tmp_path / "missing.gguf")


def test_every_truncation_is_a_gguf_error(tmp_path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    header_end = len(data) - read_gguf(tiny).tensor_bytes
    for n in sorted({*range(0, 64), *range(64, header_end, 331), header_end, len(data) - 1}):
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            read_gguf(cut)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers_never_leak_other_exceptions(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    path = tmp_path / "fuzz.gguf"
    if not path.exists():
        write_gguf(path, n_tokens=50)
    data = bytearray(path.read_bytes())
    header_end = len(data) - 4096  # edits land in the header, not the tensor data
    for pos, byte in edits:
        data[pos % header_end] = byte
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    try:
        assert isinstance(read_gguf(bad), GGUFInfo)
    except GGUFError:
        pass


def test_split_parts(tmp_path: Path) -> None:
    single = tmp_path / "model.gguf"
    assert split_parts(single) == [single]
    parts = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for p in parts[:2]:
        p.write_bytes(b"")
    with pytest.raises(GGUFError, match="m-00003-of-00003.gguf"):
        split_parts(parts[1])
    parts[2].write_bytes(b"")
    assert split_parts(parts[2]) == parts


def test_read_model_sums_split_parts(tmp_path: Path) -> None:
    one = write_gguf(tmp_path / "m-00001-of-00002.gguf", n_layer=2)
    write_gguf(tmp_path / "m-00002-of-00002.gguf", n_layer=2)
    single = read_gguf(one)
    whole = read_model(one)
    assert whole.tensor_bytes == 2 * single.tensor_bytes
    assert whole.size == 2 * single.size and len(whole.tensors) == 2 * len(single.tensors)
    assert read_model(tmp_path / "m-00001-of-00002.gguf", offset=0).n_layer == 2


@needs_model
def test_real_model() -> None:
    read_gguf(MODEL)  # warm the page cache
    start = time.perf_counter()
    info = read_gguf(MODEL)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"header read took {elapsed:.3f}s"
    assert (info.architecture, info.quantization_level, info.parameter_size) == ("llama", "Q4_1", "134.52M")
    assert (info.context_length, info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (8192, 30, 576, 9, 3)
    assert (info.head_dim_k, info.head_dim_v, info.n_vocab) == (64, 64, 49152)
    assert info.size == MODEL.stat().st_size and len(info.tensors) == 272
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert details(info)["quantization_level"] == "Q4_1"
    mi = model_info(info)
    assert mi["llama.attention.layer_norm_rms_epsilon"] == 1e-05
    assert mi["tokenizer.ggml.tokens"] is None and mi["general.parameter_count"] == 134_515_008


def test_spec_constants_match_the_gguf_package() -> None:
    """routerd keeps the format's own numbers so that starting does not import numpy."""
    import gguf

    from routerd.store import gguf as ours

    assert {t.name: t.value for t in ours.GGUFValueType} == {
        t.name: int(t.value) for t in gguf.GGUFValueType}
    assert (ours.GGUF_MAGIC, ours.GGUF_DEFAULT_ALIGNMENT) == (gguf.GGUF_MAGIC,
                                                             gguf.GGUF_DEFAULT_ALIGNMENT)


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_shortest_repr_matches_numpy(x: float) -> None:
    from routerd.store.gguf import _float32

    assert _float32(x) == float(str(np.float32(x)))


def test_starting_routerd_does_not_import_numpy() -> None:
    import subprocess
    import sys

    code = "import sys, routerd.app, routerd.cli; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
