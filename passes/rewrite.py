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
from .graph_utils import call
from .side_effects import base_of, eliminate_dead_code, has_side_effect, written


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

    def __init__(self, fn: Callable, *, shared: Iterable[object] = ()) -> None:
        self.graph = torch.fx.symbolic_trace(fn).graph
        self.name = fn.__name__
        # intermediates calling these ops may be read outside the match (they stay for those readers);
        # any other intermediate must be read by the match alone (Rule.match refuses it otherwise)
        self.shared = frozenset(shared)
        self._matcher = SubgraphMatcher(self.graph)
        self.anchors = self._matcher.pattern_anchors
        self.inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        clash = {"node", "nodes", "outputs", "pattern"} & {n.target for n in self.inputs}
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
        outputs = [m.nodes_map[a] for a in self.anchors]
        return Match(node=node, nodes=nodes, outputs=outputs, pattern=self,
                     **{pn.target: m.nodes_map.get(pn) for pn in self.inputs})

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


def traced(fn: Callable) -> Callable[[Graph, Any], Node]:
    """A rule's emit written as ordinary torch code: `fn(**the match's values)` for a Pattern rule
    (its parameters named as the pattern's arguments), `fn(*node.args)` for a plain rule, built
    before the anchor by emit_traced (traced with make_fx over the graph's own fake values, once per
    abstract signature, then replayed). Tensors it reads must come in as arguments (one it closes
    over is refused); literals (sizes, eps, dtypes) are taken as they are."""
    names = list(inspect.signature(fn).parameters)

    def emit(g: Graph, m: Any) -> Node:
        values = [getattr(m, name) for name in names] if isinstance(m, Match) else list(m.args)[: len(names)]
        return emit_traced(g, fn, values, name=getattr(fn, "__name__", "replacement"))
    emit.traced = fn   # type: ignore[attr-defined]
    return emit


def emit_traced(g: Graph, fn: Callable, values: list, *, name: str = "replacement") -> Node:
    """fn(*values) (Node values by their fake values) as nodes of g at the insert point; returns the
    node of its result. fn is traced once per abstract signature of its arguments (each tensor's
    dtype, device, and sizes and strides with every symbolic size replaced by its place among the
    distinct symbolic sizes, so equal sizes stay equal; every other argument by value): what the
    trace can depend on. The trace is kept on fn and replayed node by node, each node's fake value
    computed anew in g's own fake mode, as a replacement built by hand would be."""
    key = _signature(values)
    traces = fn.__dict__.setdefault("_mla_traces", {}) if hasattr(fn, "__dict__") else {}
    template = traces.get(key) if key is not None else None
    if template is None:
        template = _trace(fn, values, name)
        if key is not None:
            traces[key] = template
    env: dict[Node, Any] = {}
    placeholders = iter(i for i, v in enumerate(values) if isinstance(v, Node))
    result = None
    for node in template.nodes:
        if node.op == "placeholder":
            env[node] = values[next(placeholders)]
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = call(g, node.target, *args, **kwargs)    # named by its op, as by hand
        elif node.op == "output":
            (result,) = torch.fx.node.map_arg(node.args, lambda n: env[n])
    if isinstance(result, (tuple, list)):
        (result,) = result
    return result


def _signature(values: list) -> tuple | None:
    """The abstract signature emit_traced keys traces by, or None when an argument cannot be keyed."""
    symbols: dict[Any, int] = {}

    def size(s: Any) -> Any:
        if isinstance(s, torch.SymInt):
            return ("sym", symbols.setdefault(s.node.expr, len(symbols)))
        return s

    key = []
    for v in values:
        if isinstance(v, Node):
            fake = v.meta.get("val")
            if not isinstance(fake, torch.Tensor):
                return None
            key.append(("tensor", fake.dtype, fake.device.type, tuple(map(size, fake.shape)),
                        tuple(map(size, fake.stride()))))
        else:
            item = tuple(v) if isinstance(v, list) else v
            try:
                hash(item)
            except TypeError:
                return None
            key.append(("value", type(v).__name__, item))
    return tuple(key)


def _trace(fn: Callable, values: list, name: str) -> Graph:
    """make_fx at the dispatch level over the Node values' fake values: a graph whose placeholders are
    those values in order."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    from mla_graph.torch_compat import fake_mode_context

    tensors = [i for i, v in enumerate(values) if isinstance(v, Node)]

    def over_tensors(*fakes):
        full = list(values)
        for i, fake in zip(tensors, fakes):
            full[i] = fake
        return fn(*full)
    fakes = [values[i].meta["val"] for i in tensors]
    mode = detect_fake_mode(fakes)
    with fake_mode_context(mode):
        # make_fx knows an input by its tensor object: two nodes holding one fake value (rope cos and
        # sin are made alike) would both trace as the last; each gets an object of its own
        seen: set[int] = set()
        for i, fake in enumerate(fakes):
            if id(fake) in seen:
                fakes[i] = fake.detach()
            seen.add(id(fakes[i]))
        try:
            trace = make_fx(over_tensors, tracing_mode="real", pre_dispatch=False)(*fakes)
        except Exception as error:   # e.g. a real tensor met the fake ones
            raise ValueError(f"replacement {name}: tracing it over the match's fake values failed ({error}); "
                             f"pass every tensor it reads in as an argument") from error
    for node in trace.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise ValueError(f"replacement {name}: makes a tensor ({node.op} {node.target}); pass every tensor it "
                             f"reads in as an argument")
    return trace.graph


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
        """The node (a plain rule) or the Match (a Pattern rule); None or a Skip when it does not apply.
        A Pattern match is refused before the rule's own check where replacing it would be wrong or
        wasteful (exclusive_and_unwritten)."""
        m = self.anchor.match(node) if isinstance(self.anchor, Pattern) else node
        if m is None:
            return Skip(f"{node.name}: {self.missed}") if self.missed else None
        if isinstance(m, Match):
            refused = exclusive_and_unwritten(m)
            if refused is not None:
                return refused
        verdict = self.check(m)
        return m if verdict is True else (verdict if isinstance(verdict, Skip) else None)


# reads of a value's size alone (a later pass reads the size elsewhere; they need no second copy)
_SIZE_READS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default})


def exclusive_and_unwritten(m: Match) -> Skip | None:
    """The matcher's own guards, for every Pattern rule: a Skip saying why `m` may not be replaced, or None.

    - Single use: an intermediate of the match (a matched node that is not one of its outputs) read
      by a node outside it would stay alive beside the replacement and be computed twice (and a
      cache write fused away from a value still read elsewhere would no longer be the one write);
      only intermediates calling the pattern's `shared` ops may be. Reading a size is no use.
    - No write in between: the replacement is built at the anchor and reads the match's inputs
      there; a node between the match's first node and its anchor that writes one of them (through
      any view) would make the replacement read the value after the write, where the match read it
      before."""
    inside, outputs = set(m.nodes), set(m.outputs)
    for n in m.nodes:
        if n in outputs or n.target in m.pattern.shared:
            continue
        outside = [u for u in n.users if u not in inside and u.target not in _SIZE_READS]
        if outside:
            return Skip(f"{m.node.name}: {n.name} of the match is also read by {outside[0].name}; not rewritten")
    read = {base_of(v) for v in vars(m).values() if isinstance(v, Node)} | {base_of(n) for n in inside - outputs}
    order = {n: i for i, n in enumerate(m.node.graph.nodes)}
    first = min(order[n] for n in inside)
    cursor = m.node.prev
    while cursor.op != "root" and order[cursor] > first:
        if cursor not in inside:
            hit = [v for v in written(cursor) if base_of(v) in read]
            if hit:
                return Skip(f"{m.node.name}: {cursor.name} writes {hit[0].name} between the match's nodes; "
                            f"not rewritten")
        cursor = cursor.prev
    return None


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
            before = node.prev
            with g.inserting_before(node):
                new = rule.emit(g, m)
            _record_source(before, node, rule.name)
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


def _record_source(before: Node, anchor: Node, rule: str) -> None:
    """The nodes an emit put before `anchor` (after `before`) came from it: torch.fx's standard
    provenance, node.meta["from_node"] (NodeSource: the node replaced, the rule as the pass name),
    beside ours (node.meta["mla_pass"], set by the manager)."""
    from torch.fx.traceback import NodeSource, NodeSourceAction

    source = None
    cursor = before.next
    while cursor is not anchor:
        if "from_node" not in cursor.meta:
            source = source or NodeSource(anchor, pass_name=rule, action=NodeSourceAction.REPLACE)
            cursor.meta["from_node"] = [source]
        cursor = cursor.next


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
