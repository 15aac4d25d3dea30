"""PassManager: runs a flat pipeline; one observer times, dumps and records every pass."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule

from mla_graph.contract import maybe_meta

from .base import GraphPass, PassResult, Violation, pass_name
from .side_effects import effects
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
    created_nodes: list[str] = field(default_factory=list)
    erased_nodes: list[str] = field(default_factory=list)
    ops_after: dict[str, int] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)      # "old -> new in user": uses moved by the pass
    edited_nodes: list[str] = field(default_factory=list)  # nodes it kept whose args or kwargs it edited
    rule_sources: dict[str, str] = field(default_factory=dict)   # rule -> file:line (passes.rewrite rules)


@dataclass
class PipelineReport:
    records: list[PassRecord]
    final_ops: dict[str, int]
    capture_ops: dict[str, int] = field(default_factory=dict)
    stopped_after: str | None = None

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def table(self, only_changed: bool = False) -> str:
        from mla_graph.dumptool.render import format_table   # on use: the dump tool imports passes
        rows = [(f"{r.index:02d}", r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.changed else "-",
                 str(r.matches), str(r.created), str(r.erased)) for r in self.records
                if r.changed or not only_changed]
        return format_table(("#", "pass", "time ms", "changed", "matches", "+nodes", "-nodes"), rows)

    def to_json(self) -> dict:
        return {"passes": [asdict(r) for r in self.records], "final_ops": self.final_ops,
                "capture_ops": self.capture_ops, "stopped_after": self.stopped_after, "seconds": self.seconds}


class PassManager:
    """Runs `pipeline` in order on a GraphModule, in place.

    Per pass: time; created/erased nodes; node.meta['mla_pass'] on every node the pass created
    (provenance); numbered dumps `NN-<pass>.before.*` / `.after.*` in `dump_dir`, written only
    when the pass changed the graph; then the verifier (lint, fake values) and the pass's own
    `ensures`. A pass's `requires` are checked before it runs. Whatever `verify` says, no pass may
    drop a side effect (passes.side_effects: a value written before and still in the graph is
    still written after). A broken invariant raises
    PassVerificationError naming the pass and the node.

    `formats` picks the per-pass files: "txt" (FX code + node table), "dot", "svg" (drawings in
    which the pass's new nodes are filled; svg needs Graphviz); "html" implies "txt"; default
    $MLA_GRAPH_DUMP_FORMAT or "txt". `stop_after` ends the pipeline after that pass. `inspect(record, gm)` is called
    after every pass with the graph as the pass left it (e.g. to print it).
    """

    def __init__(self, pipeline: Sequence[GraphPass], *, dump_dir: str | os.PathLike | None = None,
                 verify: bool = True, on_pass: Callable[[PassRecord], None] | None = None,
                 formats: Iterable[str] | None = None, stop_after: str | None = None,
                 inspect: Callable[[PassRecord, GraphModule], None] | None = None) -> None:
        self.pipeline = list(pipeline)
        self.stop_after = stop_after
        if stop_after is not None:
            names = [pass_name(fn) for fn in self.pipeline]
            if stop_after not in names:
                raise ValueError(f"stop_after names pass {stop_after!r}, which is not in this pipeline; "
                                 f"passes: {', '.join(names)}")
            self.pipeline = self.pipeline[:names.index(stop_after) + 1]
        if formats is not None:   # a bad format fails with or without a dump folder
            from mla_graph.dumptool.render import parse_formats   # on use: the dump tool imports passes
            parse_formats(formats)
        self.dump = None
        if dump_dir is not None:
            from mla_graph.dumptool.folder import DumpWriter   # on use: the dump tool imports passes
            self.dump = DumpWriter(dump_dir, formats)
        self.verify = verify
        self.on_pass = on_pass
        self.inspect = inspect

    def run(self, gm: GraphModule) -> PipelineReport:
        capture_ops = op_histogram(gm)
        if self.dump is not None:
            self.dump.start(gm, f"{getattr(maybe_meta(gm), 'phase', '?')}: capture")
        # call nodes the verifier found consistent, kept for this run: unchanged ones are not re-run
        passed: dict = {}
        if self.verify:
            self._raise_first("capture", verify_graph(gm, passed))
        records = []
        for index, fn in enumerate(self.pipeline, start=1):
            record = self._run_one(index, fn, gm, passed)
            records.append(record)
            if self.on_pass is not None:
                self.on_pass(record)
            if self.inspect is not None:
                self.inspect(record, gm)
        report = PipelineReport(records, op_histogram(gm), capture_ops, self.stop_after)
        if self.dump is not None:
            self.dump.summary(gm, {"phase": getattr(maybe_meta(gm), "phase", None), **report.to_json()})
        return report

    def _run_one(self, index: int, fn: GraphPass, gm: GraphModule, passed: dict) -> PassRecord:
        name = pass_name(fn)
        if self.verify:
            for inv in getattr(fn, "requires", ()):
                self._raise_first(name, [(n, f"requires '{inv}': {m}") for n, m in inv.check(gm)])
        versions = _weight_versions(gm)
        before_effects = effects(gm.graph)
        before_nodes = set(gm.graph.nodes)
        before_text = str(gm.graph)
        # rendered now: the pass may erase nodes the "before" dumps must still show
        before = self.dump.render(gm) if self.dump is not None else None
        watch = _Provenance(gm)
        start = time.perf_counter()
        try:
            result = fn(gm)
        finally:
            watch.stop()
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name!r} returned {type(result).__name__}; a pass returns a PassResult")
        for attr, (tensor, version) in versions.items():
            if tensor._version != version:
                raise PassVerificationError(name, None, f"wrote to weight {attr!r} in place; a pass must "
                                                        f"leave weights as they are and make new tensors")
        # always, verify or not: a dropped write gives wrong results without an error
        self._raise_first(name, before_effects.lost(gm.graph))
        graph_changed = str(gm.graph) != before_text
        if graph_changed and not result.changed:
            raise PassVerificationError(name, None, "the graph changed but the pass reported changed=False")
        after_nodes = set(gm.graph.nodes)
        # what torch.fx's node hooks saw (nodes made and dropped within the pass are in neither list)
        created = [n for n in gm.graph.nodes if n in watch.created]
        erased = [n.name for n in watch.erased if n in before_nodes]
        if set(created) != after_nodes - before_nodes or set(erased) != {n.name for n in before_nodes - after_nodes}:
            raise PassVerificationError(name, None, "nodes appeared or vanished outside the graph's own "
                                                    "create/erase (a pass must edit gm.graph in place)")
        for node in created:
            node.meta.setdefault("mla_pass", name)
        edited = watch.edited(before_nodes & after_nodes)
        for node in edited:
            node.meta.setdefault("mla_edited_by", []).append(name)
        if result.changed:
            gm.recompile()
            if before is not None:
                stem = self.dump.stage_stem(index, name)
                title = f"{getattr(maybe_meta(gm), 'phase', '?')}: {stem}"
                self.dump.graph(f"{stem}.before", before, f"{title} (before)", erased=erased, pass_name=name)
                self.dump.graph(f"{stem}.after", self.dump.render(gm), f"{title} (after)",
                                created=[n.name for n in created], pass_name=name)
        if self.verify:
            self._raise_first(name, verify_graph(gm, passed))
            for inv in getattr(fn, "ensures", ()):
                self._raise_first(name, [(n, f"ensures '{inv}': {m}") for n, m in inv.check(gm)])
        return PassRecord(index, name, seconds, result.changed, result.matches, dict(result.matches_by_rule),
                          len(created), len(erased), list(result.notes), [n.name for n in created],
                          sorted(erased), op_histogram(gm), watch.replaced, [n.name for n in edited],
                          dict(result.rule_sources))

    @staticmethod
    def _raise_first(name: str, violations: list[Violation]) -> None:
        if violations:
            node, message = violations[0]
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise PassVerificationError(name, node, message + more)


class _Provenance:
    """What one pass did to the graph, from torch.fx's node hooks on the module: nodes created and
    erased, uses replaced (replace_all_uses_with / replace_input_with / renames), and, from the args
    objects FX replaces on every edit, the kept nodes whose args or kwargs were edited in place."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.created: set = set()
        self.erased: list = []
        self.replaced: list[str] = []
        self._args = {n: (n.args, n.kwargs) for n in gm.graph.nodes}
        gm._register_create_node_hook(self._on_create)
        gm._register_erase_node_hook(self._on_erase)
        gm._register_replace_node_hook(self._on_replace)

    def _on_create(self, node) -> None:
        self.created.add(node)

    def _on_erase(self, node) -> None:
        self.erased.append(node)

    def _on_replace(self, old, new, user) -> None:
        self.replaced.append(f"{old.name} -> {new} in {user.name}")

    def stop(self) -> None:
        self.gm._unregister_create_node_hook(self._on_create)
        self.gm._unregister_erase_node_hook(self._on_erase)
        self.gm._unregister_replace_node_hook(self._on_replace)

    def edited(self, kept: set) -> list:
        return [n for n in self.gm.graph.nodes if n in kept
                and (n.args is not self._args[n][0] or n.kwargs is not self._args[n][1])]


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
