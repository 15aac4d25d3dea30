"""Progress while lowering many layers, and the per-phase summary over all of them."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from .render import format_table

if TYPE_CHECKING:   # annotations only: the passes import the dump tool
    from mla_graph.passes import PipelineReport


class Progress:
    """One status line on `stream`: rewritten in place on a terminal, one line per step otherwise
    (so logs and tests see every step)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._width = 0

    def update(self, step: int, detail: str) -> None:
        line = f"lowering layer {step}/{self.total} {detail}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class PhaseTotals:
    """What every layer's pipeline did for one phase: the graphs are expected to agree."""

    phase: str
    reports: list[PipelineReport] = field(default_factory=list)

    def row(self) -> list[object]:
        ms = [r.seconds * 1e3 for r in self.reports]
        last = self.reports[-1]
        final_ops = {tuple(sorted(r.final_ops.items())) for r in self.reports}
        return [self.phase, len(self.reports), len(last.records), sum(r.changed for r in last.records),
                sum(last.final_ops.values()), sum(n for op, n in last.final_ops.items() if op.split(".")[0] in
                                                  ("npu", "atb", "mla")),
                f"{sum(ms) / len(ms):.1f}", f"{max(ms):.1f}", f"{sum(ms):.1f}",
                "yes" if len(final_ops) == 1 else f"NO ({len(final_ops)} variants)"]


def summary_table(totals: list[PhaseTotals]) -> str:
    header = ["phase", "layers", "passes", "changed", "ops", "vendor ops", "ms/layer", "max ms", "total ms",
              "same graph"]
    return format_table(header, [t.row() for t in totals])
