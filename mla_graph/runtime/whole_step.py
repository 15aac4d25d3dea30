"""Whole-model decode steps in graph mode: every layer's lowered decode graph inlined into the
model's graph, one compiled graph per batch bucket for the whole step.

For a target with a graph-mode decode runtime (torchair, torchair-multistream), the backend
returns a `WholeStep` instead of a graph split at the MLA layers. On a decode batch (every request
one new token) it runs:

    pad the step's inputs to the bucket  ->  per-step inputs, once  ->  one graph per bucket
    (rows of every token-major input,       (rope cos/sin rows of the      (Dynamo's graph with each
     metadata as BucketedDecode pads it)     positions, int64 lengths)      mla::layer replaced by the
                                                                            layer's lowered decode graph)

The inlined graph goes to torchair on Ascend (the stand-in backend elsewhere) with static shapes:
a bucket reused is the same compiled graph, never a recompile. Prefill and mixed batches, and
graphs a bucket cannot pad safely (see `plan`), run as the split graph does: each MLA layer's
lowered module between pieces compiled by the inner backend.

Padding needs the token count symbolic in Dynamo's graph (so the code between the layers runs at
any bucket size). While Dynamo still specialises it (the first batch size seen, unless
torch.compile(dynamic=True)), the step runs at its own size: one graph for that size. A graph whose
inputs a bucket cannot pad (an integer input with one entry per token, such as the token index of
a converted Hugging Face model, whose padding would point at real rows; a batch dimension Dynamo
kept static while the token count varies) also runs at its own size: one graph per batch size, at
most as many sizes as there are buckets (later sizes run layer by layer); MLA_GRAPH_LOG=1 says why.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from mla_graph import contract
from mla_graph.passes.side_effects import Effects, effects, eliminate_dead_code
from mla_graph.passes.verifier import PassVerificationError

from ..attention import check_values, checked_mode
from ..cache import PADDING_BLOCK, PagedLatentCache
from ..inputs import derivation
from ..layer_op import is_layer_op
from ..lowering import LoweredMLA
from ..metadata import MLAMetadata
from .graph_mode import BucketRunner, TorchairOptions, _pad_metadata, _pad_rows, check_width

log = logging.getLogger("mla_graph.compile")

# mla::layer's arguments, by position
HIDDEN, POSITIONS, LATENT, ROPE, SLOTS, TABLE, SEQ_LENS, QSL, KEY, NUM_DECODES, NUM_PREFILLS = range(11)
STEP_ARGS = {POSITIONS: "positions", SLOTS: "slot_mapping", TABLE: "block_table", SEQ_LENS: "seq_lens",
             QSL: "query_start_loc", NUM_DECODES: "num_decodes", NUM_PREFILLS: "num_prefills"}
# lowered-graph inputs that are one of mla::layer's arguments; the others are per-step inputs
LAYER_INPUTS = {contract.HIDDEN_STATES: HIDDEN, contract.POSITIONS: POSITIONS, contract.LATENT_CACHE: LATENT,
                contract.ROPE_CACHE: ROPE, contract.SLOT_MAPPING: SLOTS, contract.BLOCK_TABLE: TABLE,
                contract.SEQ_LENS: SEQ_LENS, contract.QUERY_START_LOC: QSL}

# live WholeStep runners, for tests and debugging (compiled_steps())
_STEPS: "weakref.WeakSet[WholeStep]" = weakref.WeakSet()


def compiled_steps() -> list["WholeStep"]:
    """The WholeStep runners the backend made that are still alive (oldest first)."""
    return sorted(_STEPS, key=lambda s: s.serial)


@dataclasses.dataclass
class Plan:
    """How a Dynamo graph's inputs are padded to a bucket: placeholder index -> role."""
    step: dict[str, int]            # STEP_ARGS name -> placeholder index (or absent: a constant in the graph)
    constants: dict[str, int]       # num_decodes / num_prefills baked into the graph
    caches: list[tuple[int, int]]   # per layer: (latent, rope) cache placeholder indices
    token_rows: list[int]           # tensor inputs with one row per token: zero rows appended
    sym_values: dict[int, str]      # SymInt placeholder index -> "tokens" | "width" | "num_prefills"
    token_outputs: list[int]        # outputs with one row per token: cut back to the batch
    padded: bool                    # False: the step runs at its own size (one graph per size seen)
    width_padded: bool              # the block-table width is symbolic: padded to the graph's width
    tokens: Any                     # the token count and block-table width as Dynamo knows them (_expr)
    width: Any
    unpadded_because: str = ""      # why a symbolic token count is not padded to a bucket


class WholeStep:
    """What the backend returns for a graph-mode target: decode batches as one graph per bucket for
    the whole step, other batches through `split` (the graph split at the MLA layers)."""

    _serial = 0

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], target: str,
                 lower_layers: Callable[[], list[LoweredMLA]], block_size: int, split: Callable,
                 options: TorchairOptions) -> None:
        WholeStep._serial += 1
        self.serial = WholeStep._serial
        self.target = target
        self.split = split
        self.options = options
        self.block_size = block_size
        self.gm = gm
        self._lower_layers = lower_layers
        self.lowered: list[LoweredMLA] = []
        self.plan, self.reason = plan(gm, example_inputs)
        self.whole_steps = 0
        self.split_steps = 0
        self.runner: BucketRunner | None = None   # made at the first decode step
        self.sizes: set[int] = set()          # the sizes an unpadded plan has compiled
        self._said_full = False               # logged once that no further size gets a graph
        if self.plan is None:
            log.info("decode steps: layer by layer (%s)", self.reason)
        elif self.plan.unpadded_because:
            log.info("decode steps: one graph per batch size, not padded to buckets (%s)", self.plan.unpadded_because)
        _STEPS.add(self)

    def _prepare(self) -> None:
        """At the first decode step (outside Dynamo's trace, where lowering may run its own fake mode):
        lower every layer for decode, inline them, set up the bucket compiler."""
        self.lowered = self._lower_layers()
        self.width = max(m.runners["decode"].width for m in self.lowered)
        self.inlined, self.step_inputs = inline_layers(self.gm, self.lowered)
        # Dynamo's inputs the inlined step still reads (HF's mask code is dead once attention is
        # ours): only those are passed, so a dead input's size never recompiles the step
        self.live = prune_inputs(self.inlined, sum(1 for n in self.gm.graph.nodes if n.op == "placeholder"))
        varying = _varying_input(self.gm, self.plan, self.live)
        if varying:
            self.plan, self.reason = None, varying
            log.info("decode steps: layer by layer (%s)", varying)
            return
        on_npu = all(m.runners["decode"].on_npu for m in self.lowered)
        self.runner = BucketRunner(self._run, f"mla_whole_step_{self.serial}", self.options, on_npu)
        log.info("decode steps: %d MLA layer(s) inlined, one %s graph per batch bucket %s%s", len(self.lowered),
                 self.target, list(self.options.graph_batch_sizes),
                 "" if self.plan.padded else " (not padded here: one graph per batch size)")

    @property
    def buckets_run(self) -> list[int]:
        return self.runner.buckets_run if self.runner is not None else []

    @property
    def graphs(self) -> list[GraphModule]:
        """What the stand-in compiled (on Ascend torchair does not expose them)."""
        return self.runner.graphs if self.runner is not None else []

    def _run(self, *inputs: Any) -> Any:
        return self.inlined(*inputs)

    def __call__(self, *args: Any) -> Any:
        p = self.plan
        if p is None:
            self.split_steps += 1
            return self.split(*args)
        counts = {name: (args[p.step[name]] if name in p.step else p.constants[name])
                  for name in ("num_decodes", "num_prefills")}
        tokens = args[p.step["slot_mapping"]].shape[0]
        decode = counts["num_prefills"] == 0 and counts["num_decodes"] == tokens > 0 \
            and all(args[i].shape[1] == self.block_size for i, _ in p.caches)
        if not decode or (p.padded and self.options.bucket(tokens) is None) or not self._fits(tokens):
            self.split_steps += 1
            return self.split(*args)
        if self.runner is None:
            self._prepare()
            if self.plan is None:
                self.split_steps += 1
                return self.split(*args)
        self.whole_steps += 1
        return self._decode(args, tokens)

    def _fits(self, tokens: int) -> bool:
        """An unpadded plan compiles one graph per size, as many sizes as there are buckets (the
        recompile budget); a size past that runs layer by layer (said once)."""
        if self.plan.padded or tokens in self.sizes:
            return True
        if len(self.sizes) < len(self.options.graph_batch_sizes):
            self.sizes.add(tokens)
            return True
        if not self._said_full:
            self._said_full = True
            log.info("decode steps: %d batch sizes compiled already (%s); a batch of %d runs layer by layer",
                     len(self.sizes), sorted(self.sizes), tokens)
        return False

    def _decode(self, args: Sequence[Any], tokens: int) -> Any:
        p = self.plan
        metadata = MLAMetadata(*(args[p.step[n]] for n in ("slot_mapping", "block_table", "seq_lens",
                                                            "query_start_loc")),
                               num_decodes=tokens, num_decode_tokens=tokens, num_prefills=0)
        positions = args[p.step["positions"]]
        self._check(args, positions, metadata)
        size = self.options.bucket(tokens) if p.padded else tokens
        width = self.width if p.width_padded else metadata.block_table.shape[1]
        check_width(metadata.block_table, width)
        padded = _pad_metadata(metadata, size, width, self.block_size)
        values = list(args)
        values[p.step["positions"]] = _pad_rows(positions, size, 0)
        values[p.step["slot_mapping"]] = padded.slot_mapping
        values[p.step["block_table"]] = padded.block_table.to(torch.int32)
        values[p.step["seq_lens"]] = padded.seq_lens
        values[p.step["query_start_loc"]] = padded.query_start_loc
        for name in ("num_decodes", "num_prefills"):
            if name in p.step:
                values[p.step[name]] = size if name == "num_decodes" else 0
        for i in p.token_rows:
            values[i] = _pad_rows(args[i], size, 0)
        for i, role in p.sym_values.items():
            values[i] = {"tokens": size, "width": width, "num_prefills": 0}[role]
        for lowered in self.lowered:
            lowered.refresh_derived(by_value=checked_mode(lowered.checked))
        # the per-step inputs the layers' graphs read, computed once for the whole step
        extra = [fn(values[p.step["positions"]], padded, dtype, self.block_size) for fn, dtype in self.step_inputs]
        out = self.runner(size, *(values[i] for i in self.live), *extra)
        if size == tokens:
            return out
        return type(out)(o[:tokens] if i in p.token_outputs else o for i, o in enumerate(out))

    def _check(self, args: Sequence[Any], positions: torch.Tensor, metadata: MLAMetadata) -> None:
        """Checked mode: the step's metadata and positions against every layer's cache, once per
        distinct cache shape (graph mode writes padded rows into the padding block, which no
        request may hold)."""
        seen = set()
        for lowered, (latent, rope) in zip(self.lowered, self._caches(args)):
            if not checked_mode(lowered.checked):
                continue
            key = (lowered.config, tuple(latent.shape), tuple(rope.shape))
            if key not in seen:
                seen.add(key)
                check_values(lowered.config, positions, PagedLatentCache(latent, rope), metadata, PADDING_BLOCK)

    def _caches(self, args: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(args[i], args[j]) for i, j in self.plan.caches]


def _expr(value: Any) -> Any:
    """A size as Dynamo knows it: the sympy expression of a SymInt with the equalities Dynamo has
    guarded on substituted (two inputs checked to have one length share one symbol), else the int."""
    if not isinstance(value, torch.SymInt):
        return value
    expr = value.node.shape_env.simplify(value.node.expr)
    return int(expr) if expr.is_number else expr


def _example(node: Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def plan(gm: GraphModule, example_inputs: Sequence[Any]) -> tuple[Plan | None, str]:
    """How to pad this graph's inputs to a bucket, or (None, why not)."""
    nodes = [n for n in gm.graph.nodes if is_layer_op(n)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    step, constants = {}, {}
    for position, name in STEP_ARGS.items():
        args = {n.args[position] for n in nodes}
        if len(args) != 1:
            return None, f"the layers do not share one {name}"
        (arg,) = args
        if isinstance(arg, Node):
            if arg not in index:
                return None, f"{name} is computed inside the graph, not a graph input"
            step[name] = index[arg]
        elif name in ("num_decodes", "num_prefills"):
            constants[name] = arg
        else:
            return None, f"{name} is not a tensor input"
    tokens = _expr(_example(placeholders[step["slot_mapping"]]).shape[0])
    width = _expr(_example(placeholders[step["block_table"]]).shape[1])
    symbolic = not isinstance(tokens, int)
    width_padded = not isinstance(width, int)
    unpadded = ""    # why a symbolic token count cannot be padded: the step then runs at its own size
    if symbolic and tokens.free_symbols & getattr(width, "free_symbols", set()):
        # Dynamo met a first batch whose block table was as wide as its token count (or its request
        # count + 1, ...: duck sizing): the graph holds only where that relation does
        unpadded = (f"the block-table width is {width} and the token count {tokens} in this graph (Dynamo's "
                    f"duck sizing)")
        width_padded = False
    caches = []
    for n in nodes:
        if not all(isinstance(n.args[i], Node) and n.args[i] in index for i in (LATENT, ROPE)):
            return None, "a layer's cache is not a graph input"
        caches.append((index[n.args[LATENT]], index[n.args[ROPE]]))
    layer_inputs = {i for pair in caches for i in pair}
    token_rows, sym_values = [], {}
    for i, (node, real) in enumerate(zip(placeholders, example_inputs)):
        if i in step.values() or i in layer_inputs:
            continue
        value = _example(node)
        if isinstance(value, torch.SymInt):
            expr = _expr(value)
            if expr == tokens:
                sym_values[i] = "tokens"
            elif width_padded and expr == width:
                sym_values[i] = "width"
            continue
        if not isinstance(value, torch.Tensor) or not symbolic:
            continue
        dims = [_expr(d) for d in value.shape]
        if any(tokens.free_symbols & getattr(d, "free_symbols", set()) for d in dims[1:]):
            unpadded = unpadded or f"input {node.name} has the token count in a dimension other than its first"
        elif dims and dims[0] == tokens:
            if isinstance(real, nn.Parameter):
                unpadded = unpadded or f"parameter {node.name} has one row per token"
            elif not value.is_floating_point():
                # rows of zeros appended to an index would point at real rows
                unpadded = unpadded or (f"{value.dtype} input {node.name} has one entry per token, which a bucket "
                                        f"cannot pad")
            else:
                token_rows.append(i)
    if symbolic and not unpadded:
        for i, n in ((i, placeholders[i]) for i in layer_inputs):
            if tokens in [_expr(d) for d in _example(n).shape]:
                unpadded = f"cache {n.name} has the token count in its shape"
    padded = symbolic and not unpadded
    if not padded:
        token_rows = []
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    token_outputs = [i for i, o in enumerate(outs) if isinstance(o, Node) and isinstance(_example(o), torch.Tensor)
                     and _example(o).dim() and _expr(_example(o).shape[0]) == tokens]
    return Plan(step, constants, caches, token_rows, sym_values, token_outputs, padded, width_padded, tokens, width,
                unpadded), ""


def prune_inputs(gm: GraphModule, count: int) -> list[int]:
    """Erase the first `count` placeholders of `gm` (Dynamo's inputs) that nothing reads; returns
    the indices of those kept."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:count]
    live = []
    for i, node in enumerate(placeholders):
        if node.users:
            live.append(i)
        else:
            gm.graph.erase_node(node)
    gm.recompile()
    return live


def _varying_input(gm: GraphModule, plan: Plan, live: list[int]) -> str:
    """Why a static graph per bucket would recompile at every step, or "": a live input whose size
    (or a live size input) is symbolic in something other than the token count and the block-table
    width (an attention mask that grows by a column every step)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in live:
        if i in plan.step.values() or i in plan.sym_values or any(i in pair for pair in plan.caches):
            continue
        value = _example(placeholders[i])
        sizes = [value] if isinstance(value, torch.SymInt) else list(getattr(value, "shape", ()))
        for size in map(_expr, sizes):
            if not isinstance(size, int) and size not in (plan.tokens, plan.width):
                return (f"input {placeholders[i].name} has size {size}, which changes from step to step: a static "
                        f"graph would recompile at every step")
    return ""


def inline_layers(gm: GraphModule, layers: list[LoweredMLA]) -> tuple[GraphModule, list]:
    """Dynamo's graph with each mla::layer node replaced by its layer's lowered decode graph.

    The lowered graphs' inputs that are not mla::layer arguments (rope rows, int64 lengths) become
    per-step inputs of the whole graph, appended after Dynamo's: one per (name, rope table, dtype),
    so layers that share a rope table share its rows. Returns the graph and, per appended input,
    (fn(positions, padded metadata, dtype) -> value, dtype)."""
    graph = Graph()
    attrs: dict[str, Any] = {}
    env: dict[Node, Node] = {}
    step_inputs: list = []
    step_nodes: dict[tuple, Node] = {}
    tables: list[torch.Tensor] = []
    nodes = [n for n in gm.graph.nodes if is_layer_op(n)]
    mla_index = {n: i for i, n in enumerate(nodes)}
    output_node = None
    # every side effect of Dynamo's graph and of each layer's graph, as nodes of the new graph
    kept = Effects({}, [])
    for node in gm.graph.nodes:
        if node.op == "output":
            output_node = node
            continue
        if node.op in ("get_attr", "call_module"):
            attrs[node.target] = _fetch(gm, node.target)
        if node in mla_index:
            env[node], inner = _inline(graph, node, layers[mla_index[node]], mla_index[node], env, attrs,
                                       step_nodes, tables)
            _carry(kept, effects(layers[mla_index[node]].graphs["decode"].graph), inner)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    _carry(kept, effects(gm.graph), env)   # mla::layer's writes too: its inlined graph must make them
    # per-step inputs: placeholders after Dynamo's (their order is the call's order)
    for inp, table_id, dtype in step_nodes:
        step_inputs.append((_step_input(inp, tables[table_id]), dtype))
    graph.output(torch.fx.graph.map_arg(output_node.args[0], lambda n: env[n]))
    eliminate_dead_code(graph)
    lost = kept.lost(graph)
    if lost:
        node, message = lost[0]
        raise PassVerificationError("inline_layers", node, message)
    inlined = GraphModule(attrs, graph, class_name="MLAWholeStep")
    return inlined, step_inputs


def _carry(kept: Effects, found: Effects, mapping: dict[Node, Node]) -> None:
    """Add `found` (a source graph's side effects) to `kept`, as the nodes `mapping` copied them to."""
    for value, writers in found.writes.items():
        kept.writes.setdefault(mapping[value], []).extend(writers)
    kept.impure += [mapping[n] for n in found.impure]


def _fetch(module: nn.Module, target: str) -> Any:
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _inline(graph: Graph, node: Node, lowered: LoweredMLA, layer: int, env: dict, attrs: dict,
            step_nodes: dict, tables: list) -> tuple[Node, dict[Node, Node]]:
    """The layer's lowered decode graph copied into `graph` in place of mla::layer `node`: its
    result node, and the copy of each of its nodes."""
    gm = lowered.graphs["decode"]
    table = next((i for i, t in enumerate(tables) if t.shape == lowered.cos_sin.shape and torch.equal(t, lowered.cos_sin)),
                 None)
    if table is None:
        tables.append(lowered.cos_sin)
        table = len(tables) - 1
    inner: dict[Node, Node] = {}
    result = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            inp = contract.input_of(n)
            if inp in LAYER_INPUTS:
                inner[n] = env[node.args[LAYER_INPUTS[inp]]]
            else:
                if inp is None or inp.per != "step" or inp.part is not None:
                    raise ValueError(f"layer {layer}'s decode graph reads {n.name!r}, which a whole step cannot provide")
                key = (inp, table, lowered._dtype)
                if key not in step_nodes:
                    # placeholders must come first: insert before the first non-placeholder
                    first = next((m for m in graph.nodes if m.op != "placeholder"), None)
                    if first is not None:
                        with graph.inserting_before(first):
                            step_nodes[key] = graph.placeholder(f"step_{inp.name}_{len(step_nodes)}")
                    else:
                        step_nodes[key] = graph.placeholder(f"step_{inp.name}_{len(step_nodes)}")
                    step_nodes[key].meta.update(n.meta)
                inner[n] = step_nodes[key]
        elif n.op == "output":
            result = torch.fx.graph.map_arg(n.args[0], lambda m: inner[m])
        else:
            if n.op in ("get_attr", "call_module"):
                name = f"mla{layer}_{n.target.replace('.', '_')}"
                attrs[name] = _fetch(gm, n.target)
                copy = graph.node_copy(n, lambda m: inner[m])
                copy.target = name
            else:
                copy = graph.node_copy(n, lambda m: inner[m])
            inner[n] = copy
    if isinstance(result, (tuple, list)):
        (result,) = result
    return result, inner


# what a per-step input of a whole decode step may read: the step's, never a layer's own
_STEP_ARGUMENTS = ("positions", "metadata", "cos_sin", "dtype", "block_size")


def _step_input(inp: contract.GraphInput, cos_sin: torch.Tensor) -> Callable:
    """fn(positions, padded metadata, dtype, block_size) -> the value of per-step input `inp`, derived
    as mla_graph.inputs declares it."""
    derive = derivation(inp)
    layer_own = [name for name in derive.reads if name not in _STEP_ARGUMENTS]
    if layer_own:
        raise ValueError(f"graph input {inp.name!r} reads {layer_own} of a layer's call; a whole decode step "
                         f"computes its per-step inputs once for every layer, from {', '.join(_STEP_ARGUMENTS)}")

    def compute(positions: torch.Tensor, metadata: MLAMetadata, dtype: torch.dtype, block_size: int):
        return derive({"positions": positions, "metadata": metadata, "cos_sin": cos_sin, "dtype": dtype,
                       "block_size": block_size})
    return compute

