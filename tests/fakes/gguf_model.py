"""A sparse GGUF with a real header and tensor table and no weights: a llama-shaped model of
any size for placement tests (the tensor data is a hole in the file, so a "4 GiB" model
costs a few KiB of disk)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

ALIGN = 32
_STRING, _UINT32 = 8, 4


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _str(key) + struct.pack("<II", _UINT32, v)


def _kv_str(key: str, v: str) -> bytes:
    return _str(key) + struct.pack("<I", _STRING) + _str(v)


def write_sparse_gguf(path: Path, *, n_layer: int = 32, n_embd: int = 4096, n_ff: int = 14336,
                      n_head: int = 32, n_head_kv: int = 8, n_vocab: int = 128256,
                      ctx: int = 8192, name: str = "Sparse-8B") -> Path:
    """Llama 3 8B's shapes by default (Q4_0 matrices, F32 norms): about 4.3 GiB of weights."""
    q4, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    head_dim = n_embd // n_head
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (n_embd, n_vocab), q4)]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), f32),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), q4),
            (f"blk.{i}.attn_k.weight", (n_embd, n_head_kv * head_dim), q4),
            (f"blk.{i}.attn_v.weight", (n_embd, n_head_kv * head_dim), q4),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), q4),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), f32),
            (f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), q4),
            (f"blk.{i}.ffn_up.weight", (n_embd, n_ff), q4),
            (f"blk.{i}.ffn_down.weight", (n_ff, n_embd), q4)]
    tensors += [("output_norm.weight", (n_embd,), f32), ("output.weight", (n_embd, n_vocab), q4)]
    kvs = [_kv_str("general.architecture", "llama"), _kv_str("general.name", name),
           _kv_u32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q4_0)),
           _kv_u32("llama.block_count", n_layer), _kv_u32("llama.embedding_length", n_embd),
           _kv_u32("llama.feed_forward_length", n_ff), _kv_u32("llama.attention.head_count", n_head),
           _kv_u32("llama.attention.head_count_kv", n_head_kv),
           _kv_u32("llama.context_length", ctx), _kv_u32("llama.vocab_size", n_vocab)]
    out = bytearray(struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(kvs)))
    for kv in kvs:
        out += kv
    offset = 0
    for tname, shape, t in tensors:
        block, size = gguf.GGML_QUANT_SIZES[t]
        n = 1
        for d in shape:
            n *= d
        out += _str(tname) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", int(t), offset)
        offset += -(-(n * size // block) // ALIGN) * ALIGN
    data_start = -(-len(out) // ALIGN) * ALIGN
    with open(path, "wb") as f:
        f.write(out)
        f.truncate(data_start + offset)
    return path
