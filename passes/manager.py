"""PassManager: runs a flat pipeline; one observer times, dumps and records every pass."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch.fx import GraphModule

from .base import GraphPass, PassResult, Violation, pass_name
from .dump import format_graph
from .verifier import PassVerificationError, verify_graph


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    changed: bool
    matches: int
    matches_by_rule: dict[str, int]
    created: int
    erased: int
    notes: list[str] = field(default_factory=list)


@dataclass
class PipelineReport:
    records: list[PassRecord]
    final_ops: dict[str, int]

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def table(self) -> str:
        rows = [("#", "pass", "time ms", "changed", "matches", "+nodes", "-nodes")]
        rows += [(f"{r.index:02d}", r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.changed else "-",
                  str(r.matches), str(r.created), str(r.erased)) for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"passes": [asdict(r) for r in self.records], "final_ops": self.final_ops,
                "seconds": self.seconds}


class PassManager:
    """Runs `pipeline` in order on a GraphModule, in place.

    Per pass: time; created/erased node counts; node.meta['mla_pass'] on every node the pass
    created (provenance); numbered dumps `NN-<pass>.before.txt` / `.after.txt` in `dump_dir`,
    written only when the pass changed the graph; then the verifier (lint, fake values) and the
    pass's own `ensures`. A pass's `requires` are checked before it runs. A broken invariant
    raises PassVerificationError naming the pass and the node.
    """

    def __init__(self, pipeline: Sequence[GraphPass], *, dump_dir: str | os.PathLike | None = None,
                 verify: bool = True, on_pass: Callable[[PassRecord], None] | None = None) -> None:
        self.pipeline = list(pipeline)
        self.dump_dir = os.fspath(dump_dir) if dump_dir is not None else None
        self.verify = verify
        self.on_pass = on_pass

    def run(self, gm: GraphModule) -> PipelineReport:
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
            self._write("00-capture.txt", format_graph(gm))
        if self.verify:
            self._raise_first("capture", verify_graph(gm))
        records = []
        for index, fn in enumerate(self.pipeline, start=1):
            record = self._run_one(index, fn, gm)
            records.append(record)
            if self.on_pass is not None:
                self.on_pass(record)
        report = PipelineReport(records, op_histogram(gm))
        if self.dump_dir is not None:
            self._write("summary.json", json.dumps(report.to_json(), indent=2))
        return report

    def _run_one(self, index: int, fn: GraphPass, gm: GraphModule) -> PassRecord:
        name = pass_name(fn)
        if self.verify:
            for inv in getattr(fn, "requires", ()):
                self._raise_first(name, [(n, f"requires '{inv}': {m}") for n, m in inv.check(gm)])
        versions = _weight_versions(gm)
        before_nodes = set(gm.graph.nodes)
        before_text = str(gm.graph)
        before_dump = format_graph(gm) if self.dump_dir is not None else None
        start = time.perf_counter()
        result = fn(gm)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name!r} returned {type(result).__name__}; a pass returns a PassResult")
        for attr, (tensor, version) in versions.items():
            if tensor._version != version:
                raise PassVerificationError(name, None, f"wrote to weight {attr!r} in place; a pass must "
                                                        f"leave weights as they are and make new tensors")
        graph_changed = str(gm.graph) != before_text
        if graph_changed and not result.changed:
            raise PassVerificationError(name, None, "the graph changed but the pass reported changed=False")
        after_nodes = set(gm.graph.nodes)
        created = [n for n in gm.graph.nodes if n not in before_nodes]
        for node in created:
            node.meta.setdefault("mla_pass", name)
        if result.changed:
            gm.recompile()
            if self.dump_dir is not None:
                self._write(f"{index:02d}-{name}.before.txt", before_dump)
                self._write(f"{index:02d}-{name}.after.txt", format_graph(gm))
        if self.verify:
            self._raise_first(name, verify_graph(gm))
            for inv in getattr(fn, "ensures", ()):
                self._raise_first(name, [(n, f"ensures '{inv}': {m}") for n, m in inv.check(gm)])
        return PassRecord(index, name, seconds, result.changed, result.matches, dict(result.matches_by_rule),
                          len(created), len(before_nodes - after_nodes), list(result.notes))

    def _write(self, filename: str, text: str) -> None:
        path = os.path.join(self.dump_dir, filename)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)

    @staticmethod
    def _raise_first(name: str, violations: list[Violation]) -> None:
        if violations:
            node, message = violations[0]
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise PassVerificationError(name, node, message + more)


def _weight_versions(gm: GraphModule) -> dict:
    """Version counters of the tensors get_attr nodes read: an in-place write bumps them."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = gm.get_parameter(node.target)
            except AttributeError:
                value = getattr(gm, node.target, None) if "." not in node.target else gm.get_buffer(node.target)
            if isinstance(value, torch.Tensor):
                out[node.target] = (value, value._version)
    return out


def op_histogram(gm: GraphModule) -> dict[str, int]:
    from .base import op_name
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = op_name(node.target)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
