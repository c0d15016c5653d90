"""Sizes for people: the one human_bytes."""

from __future__ import annotations

_DECIMAL = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3))
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def human_bytes(n: float, *, binary: bool = False) -> str:
    """Decimal (Ollama's format.HumanBytes, what the CLI prints): 98_362_432 -> '98 MB',
    1500 -> '1.5 KB', 4.7e9 -> '4.7 GB'. Binary (budgets, errors): 3_328_599_654 ->
    '3.1 GiB', 5 << 20 -> '5.0 MiB'. Below the first unit: '512 B'."""
    if binary:
        for unit, scale in _BINARY:
            if abs(n) >= scale:
                return f"{n / scale:.1f} {unit}"
        return f"{int(n)} B"
    for unit, dscale in _DECIMAL:
        if n >= dscale:
            v = n / dscale
            return f"{int(v)} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"
