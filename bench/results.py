"""Result rows and the statistics they carry: medians of alternated samples, paired
differences and ratios (sample i of a peer against sample i of the baseline, same round)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

Check = Callable[["Row"], "bool | None"]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def paired_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of a_i - b_i over the rounds both have."""
    return median([x - y for x, y in zip(a, b)])


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return median([x / y for x, y in zip(a, b) if y])


@dataclass
class Row:
    """One line of the table: a peer's figure in one scenario, compared with the baselines."""

    scenario: str
    peer: str
    unit: str  # "ms", "tok/s", "s", "req/s", "MiB", "µs/chunk"
    samples: list[float]
    kind: str = "diff"  # how to compare: "diff" (added, in unit) or "ratio"
    vs_direct: float | None = None
    vs_router: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.samples)

    def compare(self, direct: Sequence[float] | None, router: Sequence[float] | None) -> Row:
        op = paired_diff if self.kind == "diff" else paired_ratio
        if direct:
            self.vs_direct = op(self.samples, direct)
        if router:
            self.vs_router = op(self.samples, router)
        return self


def fmt_value(v: float, unit: str) -> str:
    if v != v:  # NaN
        return "–"
    if unit in ("s",):
        return f"{v:.3f} s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    if unit in ("req/s", "tok/s"):
        return f"{v:,.1f} {unit}"
    return f"{v:.3g} {unit}"


def fmt_compare(v: float | None, kind: str, unit: str) -> str:
    if v is None or v != v:
        return "–"
    if kind == "ratio":
        return f"×{v:.3f}"
    scale, u = (1e3, "ms") if unit == "s" else (1.0, unit)
    return f"{v * scale:+.2f} {u}"
