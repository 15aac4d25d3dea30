"""Rules and the one driver that applies them: the node-walking skeleton of a rewrite, written once.

A Rule is (anchor, check, emit): the op a node must call, whether this node qualifies, and the
nodes that replace it. `rewrite(gm, rules)` walks the graph once; at each node, the first rule that
anchors there and checks emits its replacement before the node, the node's uses move to it, the
node goes, and the match is counted under the rule's name. Each rule records where it was defined
(file:line), which the pass's record carries into the dumps beside the counts.

    RMS_NORM = Rule("rms_norm", mla.rms_norm.default,
                    emit=lambda g, n: call(g, operator.getitem, call(g, npu.npu_rms_norm.default, *n.args), 0))

    @graph_pass()
    def lower_rms_norm(gm):
        return rewrite(gm, [RMS_NORM])

Passes whose match spans several nodes (a whole prolog, a decompressed attention) keep their own
matchers (mla_patterns) and emit code; see each pass's docstring.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from torch.fx import Graph, GraphModule, Node

from .base import PassResult


def _defined_at() -> str:
    """file:line of the code that built the Rule (the caller of Rule's __init__)."""
    frame = inspect.currentframe()
    # up from here past the dataclass's generated __init__ to the first frame outside this module
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_name == "__init__"):
        frame = frame.f_back
    if frame is None:
        return "?"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(frame.f_code.co_filename)
    return f"{os.path.relpath(path, root) if path.startswith(root) else os.path.basename(path)}:{frame.f_lineno}"


@dataclass(frozen=True)
class Rule:
    name: str                                         # what the dumps count matches under
    anchor: object | tuple                            # the op (or ops) a node must call
    emit: Callable[[Graph, Node], Node]               # the replacement, built before the node; takes its uses
    check: Callable[[Node], bool] = lambda node: True   # whether this node qualifies
    defined_at: str = field(default_factory=_defined_at, compare=False)

    def anchors(self) -> tuple:
        return self.anchor if isinstance(self.anchor, tuple) else (self.anchor,)


def rewrite(gm: GraphModule, rules: Sequence[Rule] | Iterable[Rule]) -> PassResult:
    """Apply `rules` to every node of gm's graph, once each, in graph order (see the module docstring)."""
    rules = list(rules)
    by_anchor: dict = {}
    for rule in rules:
        for anchor in rule.anchors():
            by_anchor.setdefault(anchor, []).append(rule)
    result = PassResult(changed=False)
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        for rule in by_anchor.get(node.target, ()):
            if not rule.check(node):
                continue
            with g.inserting_before(node):
                new = rule.emit(g, node)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            result.count(rule.name)
            result.rule_sources[rule.name] = rule.defined_at
            break
    return result
