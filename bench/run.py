"""One bench run: what was asked, where it runs, and the rows and profiles it collected."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from . import profiling, report
from .results import Row


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    load: report.LoadWatch = field(default_factory=report.LoadWatch)
    profiles: dict[str, profiling.Top | None] = field(default_factory=dict)
    argv_notes: list[str] = field(default_factory=list)

    def want(self, name: str) -> bool:
        return name in self.args.only

    def add(self, rows: list[Row]) -> None:
        self.rows += rows
        for r in rows:
            print(report.table([r]).splitlines()[-1], flush=True)
