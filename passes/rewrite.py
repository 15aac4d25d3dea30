"""Rules, traced patterns and the one driver that applies them: the node-walking skeleton of a rewrite, written once.

A Rule is (anchor, check, emit): the op a node must call (or a Pattern rooted there), whether the
match is taken (True, False, or Skip(reason), which goes to the pass's notes), and what replaces
the node. A Pattern is a function traced with torch.fx and matched with its SubgraphMatcher: its
arguments are wildcards (any node or literal, so sizes and eps never make one pattern per
constant; two arguments bind two different nodes), its own literals must be equal, an argument
used twice is one node, and a tuple result adds anchors (a cache write). `rewrite(gm, rules)` walks
the graph once and counts matches per rule with the file:line the rule was defined at.
docs/writing-a-pass.md shows both kinds.

Every rewrite of ours is a rule. Two passes walk the graph by hand, because no pattern anchors
what they look for: insert_multistream_scopes (independent branches of the attention's ancestor
DAG, a property of the whole graph, not the shape of a subgraph) and eliminate_dead_code (FX's, told
about every side effect: passes.side_effects).
choose_attention_form matches the DECOMPRESSED pattern but rewrites nothing (it annotates).
"""
from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from .base import PassResult
from .side_effects import eliminate_dead_code, has_side_effect


def _defined_at() -> str:
    """file:line of the code that built the Rule (the first frame outside this module)."""
    frame = inspect.currentframe()
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_name == "__init__"):
        frame = frame.f_back
    if frame is None:
        return "?"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(frame.f_code.co_filename)
    return f"{os.path.relpath(path, root) if path.startswith(root) else os.path.basename(path)}:{frame.f_lineno}"


class Match(SimpleNamespace):
    """A pattern matched at `node` (its anchor; `nodes`: every node it matched): each pattern
    argument's value by name (a node or a literal)."""


class Pattern:
    """A pattern function traced with torch.fx (see the module docstring). Its result is the anchor;
    a pattern returning a tuple has further anchors (side-effect nodes such as a cache write),
    searched among the nodes that call the same op."""

    def __init__(self, fn: Callable) -> None:
        self.graph = torch.fx.symbolic_trace(fn).graph
        self.name = fn.__name__
        self._matcher = SubgraphMatcher(self.graph)
        self.anchors = self._matcher.pattern_anchors
        self.inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        clash = {"node", "nodes"} & {n.target for n in self.inputs}
        if clash:
            raise ValueError(f"pattern {self.name}: an argument may not be named {sorted(clash)} (a Match's own names)")

    @property
    def anchor(self) -> object:
        return self.anchors[0].target

    def match(self, node: Node) -> Match | None:
        m = self._walk(self.anchors[0], node, InternalMatch(anchors=self.anchors))
        for anchor in self.anchors[1:]:
            m = next(filter(None, (self._walk(anchor, n, m) for n in node.graph.nodes
                                   if n.op == "call_function" and n.target is anchor.target)), None) if m else None
        if m is None:
            return None
        nodes = [gn for pn, gn in m.nodes_map.items() if pn.op != "placeholder"]
        return Match(node=node, nodes=nodes, **{pn.target: m.nodes_map.get(pn) for pn in self.inputs})

    def _walk(self, anchor: Node, node: Node, so_far: InternalMatch) -> InternalMatch | None:
        trial = copy.copy(so_far)     # the matcher leaves a failed walk's partial bindings behind
        return trial if self._matcher._match_nodes(anchor, node, trial) else None

    def __or__(self, other: "Pattern") -> "Pattern":
        """Either pattern (the first that matches); both must anchor on the same op."""
        if other.anchor is not self.anchor:
            raise ValueError(f"alternatives must anchor on the same op: {self.anchor} vs {other.anchor}")
        either = copy.copy(self)
        either.match = lambda node: self.match(node) or other.match(node)
        return either


@dataclass(frozen=True)
class Skip:
    """A match a rule refuses, and why (recorded in the pass's notes)."""

    reason: str


@dataclass(frozen=True)
class Rule:
    name: str                                         # what the dumps count matches under
    anchor: object                                    # the op (or tuple of ops) a node must call, or a Pattern
    emit: Callable[[Graph, Any], Node | None]         # the replacement, built before the node; takes its uses
    check: Callable[[Any], "bool | Skip"] = lambda m: True   # False / Skip(why): not here
    missed: str = ""     # a Pattern rule: the note for an anchor-op node the pattern did not match
    defined_at: str = field(default_factory=_defined_at, compare=False)

    def anchors(self) -> tuple:
        if isinstance(self.anchor, Pattern):
            return (self.anchor.anchor,)
        return self.anchor if isinstance(self.anchor, tuple) else (self.anchor,)

    def match(self, node: Node) -> Any:
        """The node (a plain rule) or the Match (a Pattern rule); None or a Skip when it does not apply."""
        m = self.anchor.match(node) if isinstance(self.anchor, Pattern) else node
        if m is None:
            return Skip(f"{node.name}: {self.missed}") if self.missed else None
        verdict = self.check(m)
        return m if verdict is True else (verdict if isinstance(verdict, Skip) else None)


def rewrite(gm: GraphModule, rules: Iterable[Rule], *, dead_code: bool = False) -> PassResult:
    """Apply `rules` to every node of gm's graph, once each, in graph order. At a node, the first
    rule that anchors there and matches emits its replacement before the node; the node's uses move
    to it and the node goes, with the nodes of a pattern's match that nothing reads any more. An emit
    that returns None replaced a node nobody reads (a cache write); one that returns the node itself
    edited it in place (the node stays). `dead_code`: erase what the rewrites orphaned."""
    by_anchor: dict = {}
    for rule in rules:
        for anchor in rule.anchors():
            by_anchor.setdefault(anchor, []).append(rule)
    result = PassResult(changed=False)
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or getattr(node, "_erased", False):   # erased by an earlier match
            continue
        for rule in by_anchor.get(node.target, ()):
            m = rule.match(node)
            if isinstance(m, Skip):
                result.notes.append(m.reason)
            if m is None or isinstance(m, Skip):
                continue
            with g.inserting_before(node):
                new = rule.emit(g, m)
            if new is not node:       # else the emit edited the node in place
                if new is not None:
                    node.replace_all_uses_with(new)
                g.erase_node(node)
            if isinstance(m, Match):
                _erase_unread(g, m.nodes)
            result.count(rule.name)
            result.rule_sources[rule.name] = rule.defined_at
            break
    if dead_code and result.changed:
        eliminate_dead_code(g)
    return result


def _erase_unread(g: Graph, nodes: list[Node]) -> None:
    """A match's nodes that nothing reads any more (and that write nothing) go with it."""
    left = [n for n in nodes if not getattr(n, "_erased", False)]
    while True:
        dead = [n for n in left if not n.users and not has_side_effect(n)]
        if not dead:
            return
        for n in dead:
            g.erase_node(n)
        left = [n for n in left if n not in dead]
