"""docs/performance.md (table, machine, notes) and docs/performance.png (chart)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .results import Row, fmt_compare, fmt_value, median


@dataclass
class Machine:
    cpu: str
    cores: int
    ram_gib: float
    kernel: str
    python: str
    llama_server: str
    date: str

    def line(self) -> str:
        return (f"{self.cpu}, {self.cores} cores, {self.ram_gib:.0f} GiB RAM; Linux "
                f"{self.kernel}; Python {self.python}; llama-server {self.llama_server}; "
                f"{self.date}")


def machine(llama_server: Path) -> Machine:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    try:
        out = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True,
                             timeout=30)
        version = (out.stdout + out.stderr).strip().splitlines()[0].removeprefix("version: ")
    except (OSError, IndexError, subprocess.SubprocessError):
        version = "unknown"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Machine(cpu, os.cpu_count() or 0, ram, platform.release(), platform.python_version(),
                   version, now)


@dataclass
class LoadWatch:
    """1-minute load average, sampled at every scenario boundary."""

    samples: list[tuple[str, float]] = field(default_factory=list)

    def note(self, label: str) -> None:
        self.samples.append((label, os.getloadavg()[0]))

    def summary(self) -> str:
        if not self.samples:
            return "not sampled"
        xs = [v for _, v in self.samples]
        return (f"min {min(xs):.2f}, median {median(xs):.2f}, max {max(xs):.2f} "
                f"({len(xs)} samples at scenario boundaries)")


def _extra(row: Row) -> str:
    e = row.extra
    parts = []
    if "p50_ms" in e:
        parts.append(f"p50 {e['p50_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms")
    if "routerd_cpu_ms_per_req" in e:
        parts.append(f"routerd CPU {e['routerd_cpu_ms_per_req']:.3f} ms/req "
                     f"(ceiling ≈ {e['routerd_ceiling_rps']:,.0f} req/s on one free core)")
    if "worker_cpu_ms_per_req" in e:
        parts.append(f"worker CPU {e['worker_cpu_ms_per_req']:.3f} ms/req, load generator "
                     f"{e['loadgen_cpu_ms_per_req']:.3f} ms/req")
    if "routerd_cpu_us_per_token" in e:
        parts.append(f"routerd CPU {e['routerd_cpu_us_per_token']:.0f} µs/token")
    if "spawn_to_ready_s" in e:
        parts.append(f"spawn → /health 200: {e['spawn_to_ready_s']:.3f} s")
    if "router_swap_s" in e:
        parts.append(f"router mode's swap: {e['router_swap_s']:.3f} s")
    return "; ".join(parts)


def table(rows: Sequence[Row]) -> str:
    out = ["| Scenario | Peer | Median | n | vs direct | vs router mode | Target | Met? | Notes |",
           "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        met = {True: "✅ yes", False: "❌ no", None: ""}[r.met]
        notes = "; ".join(x for x in (r.note, _extra(r)) if x)
        out.append(f"| {r.scenario} | {r.peer} | {fmt_value(r.median, r.unit)} | "
                   f"{len(r.samples)} | {fmt_compare(r.vs_direct, r.kind, r.unit)} | "
                   f"{fmt_compare(r.vs_router, r.kind, r.unit)} | {r.target} | {met} | {notes} |")
    return "\n".join(out)


def chart(rows: Sequence[Row], path: Path, title: str) -> bool:
    """Four panels: warm latency, streaming ratios, cold/swap seconds, routing capacity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [
        (axes[0][0], lambda r: r.unit == "ms", "added latency vs direct (ms, paired median)"),
        (axes[0][1], lambda r: r.unit == "tok/s", "tokens/s, ratio vs direct (paired median)"),
        (axes[1][0], lambda r: r.unit == "s", "seconds (median)"),
        (axes[1][1], lambda r: r.unit == "req/s", "requests/s (median)"),
    ]
    for ax, pick, label in panels:
        sel = [r for r in rows if pick(r)]
        if not sel:
            ax.set_visible(False)
            continue
        ratio, added = sel[0].unit == "tok/s", sel[0].unit == "ms"
        if ratio or added:
            values = [r.vs_direct if r.vs_direct is not None else (1.0 if ratio else 0.0)
                      for r in sel]
        else:
            values = [r.median for r in sel]
        names = [f"{_short(r.scenario)}\n{r.peer}" for r in sel]
        colors = [_color(r.peer) for r in sel]
        ax.barh(range(len(sel)), values, color=colors)
        ax.set_yticks(range(len(sel)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if ratio:
            lo = min(values + [0.97])
            ax.set_xlim(lo - 0.01, max(values + [1.0]) + 0.01)
            for x, style in ((0.99, "--"), (0.98, ":")):
                ax.axvline(x, color="grey", linestyle=style, linewidth=1)
        if added:
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        for i, v in enumerate(values):
            text = f" {v:.3f}" if ratio else f" {v:+.2f}" if added else f" {v:,.3f}" \
                if v < 10 else f" {v:,.0f}"
            ax.text(v, i, text, va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short(s: str) -> str:
    return s.split(" (")[0].split(",")[0][:34]


def _color(peer: str) -> str:
    if peer.startswith("routerd"):
        return "#2b7bba"
    if peer.startswith("router-mode"):
        return "#e08a2c"
    return "#7f7f7f"
