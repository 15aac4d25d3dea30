"""The "mla_graph" torch.compile backend: MLA layers through their lowering, the rest to a normal backend.

    torch.compile(model, backend="mla_graph",
                  options={"target": "npu", "dump_dir": "dumps", "inner_backend": "inductor",
                           "target_options": {...}})   # the target's own options, as lower() takes them

Dynamo's graph holds one `mla::layer` node per MLAAttention call (see mla_graph.layer_op). The graph is
split at those nodes (torch.fx.passes.split_module, as vLLM's split_graph does): every piece
between them is compiled by the inner backend; every MLA piece runs the layer's LoweredMLA for
the target, outside the inner backend, so the paged caches are written in place and never
copied by functionalization.

Lowering is lazy and cached per (layer, target, block size, phase, dump dir): a layer is
lowered for the phase of the first batch that needs it ("decode", "prefill" or "mixed"), and
dumped to `<dump_dir>/<layer path>/<phase>/`.

Batch composition: `num_decodes` and `num_prefills` are Python ints on MLAMetadata and reach
the graph as arguments of mla::layer. Dynamo first specialises them (and the token and request
counts) to the first batch's values; the first batch that differs recompiles once with them
symbolic (automatic dynamic shapes), and a change in the number of requests may recompile once
more. After that every composition reuses the graph: the phase is chosen per call, at run time.
Recompiles re-split the graph but reuse the cached lowerings.

Targets with a graph-mode decode runtime (torchair, torchair-multistream) get more: a decode
batch runs the whole step as one graph per batch bucket, every layer's lowered decode graph
inlined into Dynamo's graph (see whole_step); other batches run split as above.

Inference only: the lowered layers run under no_grad and mla::layer has no autograd formula.
"""
from __future__ import annotations

import logging
import os
import re
import weakref
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.split_module import split_module

from ..lowering import LoweredMLA, lower
from ..runtime.binding import StepMemo
from ..targets import TARGETS
from ..layer_op import ensure_layer_op, is_layer_op, registered_layer, unflatten

BACKEND_NAME = "mla_graph"
log = logging.getLogger("mla_graph.compile")
LOG_ENV = "MLA_GRAPH_LOG"
# MLA modules of other libraries: a graph holding one but no mla::layer was handed an unconverted model
FOREIGN_MLA = {
    "DeepseekV3Attention": "convert the model first: mla_graph.hf.convert(model, target=...)",
    "DeepseekV2Attention": "convert the model first: mla_graph.hf.convert(model, target=...)",
    "MultiHeadLatentAttentionWrapper": "run it inside vLLM with MLA_GRAPH_VLLM=1 (docs/vllm.md)",
    "DeepseekV2MLAAttention": "run it inside vLLM with MLA_GRAPH_VLLM=1 (docs/vllm.md)",
}


class UnconvertedModelError(ValueError):
    """The graph holds another library's MLA modules, which this backend cannot lower."""


def _log_to_stderr_if_asked() -> None:
    """MLA_GRAPH_LOG=1: the backend says what it lowered (logger "mla_graph.compile", on stderr)."""
    if os.environ.get(LOG_ENV, "").strip().lower() in ("1", "true", "yes", "on", "info") and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[mla_graph] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
ensure_layer_op()


@dataclass(frozen=True)
class BackendOptions:
    target: str = "npu"                       # a key of mla_graph.targets.TARGETS
    dump_dir: str | None = None               # per-layer lowering dumps: <dump_dir>/<layer>/<phase>/
    inner_backend: str = "inductor"           # compiles everything that is not an MLA layer
    target_options: Mapping[str, Any] | None = None   # as lower(..., target_options=): torchair's graph_batch_sizes, ...
    # target_options as the target's typed object, set by parse() (Target.parse): what travels on
    parsed_target_options: Any = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown {BACKEND_NAME} option(s) {unknown}; valid options: {', '.join(valid)}")
        parsed = cls(**options)
        if parsed.target not in TARGETS:
            raise ValueError(f"unknown {BACKEND_NAME} target {parsed.target!r}; valid targets: {', '.join(TARGETS)}")
        if parsed.dump_dir is not None and not isinstance(parsed.dump_dir, (str, os.PathLike)):
            raise ValueError(f"{BACKEND_NAME} option dump_dir must be a path, got {parsed.dump_dir!r}")
        if not isinstance(parsed.inner_backend, str) or parsed.inner_backend == BACKEND_NAME:
            raise ValueError(f"{BACKEND_NAME} option inner_backend must name another torch.compile backend, "
                             f"got {parsed.inner_backend!r}; valid: {', '.join(_inner_backends())}")
        parsed.inner_compiler()   # fails now, with the valid names, on a backend that does not exist
        # bad values fail here; the typed result is what every layer's lowering and the whole-step runner get
        object.__setattr__(parsed, "parsed_target_options", TARGETS[parsed.target].parse(
            parsed.target_options, f"{BACKEND_NAME} option target_options"))
        return parsed

    @property
    def options_key(self) -> tuple:
        """target_options as a hashable key (lowerings are cached per options)."""
        return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in (self.target_options or {}).items()))

    def inner_compiler(self) -> Callable:
        try:
            return torch._dynamo.lookup_backend(self.inner_backend)
        except torch._dynamo.exc.InvalidBackend:
            raise ValueError(f"{BACKEND_NAME} option inner_backend={self.inner_backend!r} is not a torch.compile "
                             f"backend; valid: {', '.join(_inner_backends())}") from None


def _inner_backends() -> list[str]:
    return [b for b in torch._dynamo.list_backends(exclude_tags=()) if b != BACKEND_NAME]


def mla_graph_backend(gm: GraphModule, example_inputs: Sequence[Any], *,
                      options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
    """torch.compile backend (entry point `mla_graph`); `options` as torch.compile(options=...) passes them."""
    if mode is not None:
        raise ValueError(f"{BACKEND_NAME} takes no mode (got {mode!r}); pass options="
                         f"{{'inner_backend': ...}} to choose how non-MLA code is compiled")
    opts = BackendOptions.parse(options)
    inner = opts.inner_compiler()
    _log_to_stderr_if_asked()
    mla_nodes = [n for n in gm.graph.nodes if is_layer_op(n)]
    if not mla_nodes:
        foreign = _foreign_mla_modules(gm)
        if foreign:
            (path, name), = list(foreign.items())[:1]
            raise UnconvertedModelError(
                f"{BACKEND_NAME} backend: this graph holds {len(foreign)} {name} module(s) ({path}, ...) and no "
                f"mla-graph MLA layer, so it would lower nothing; {FOREIGN_MLA[name]}")
        log.info("%s backend: no MLA layer in this graph (%d nodes); all of it goes to %s",
                 BACKEND_NAME, len(gm.graph.nodes), opts.inner_backend)
        return inner(gm, example_inputs)
    log.info("%s backend: %d MLA layer(s) lowered lazily for target %s; the code between them goes to %s",
             BACKEND_NAME, len(mla_nodes), opts.target, opts.inner_backend)

    split = _split_at_layers(gm, mla_nodes)
    mla_pieces = {name for name, piece in split.named_children()
                  if any(map(is_layer_op, piece.graph.nodes))}
    _compile_pieces(split, gm, example_inputs, mla_pieces, inner)
    memo = StepMemo()   # the layers of this graph's step compute each per-step input once
    for name in mla_pieces:
        _run_lowered_in(getattr(split, name), opts, memo)
    if "decode" in TARGETS[opts.target].runtimes:
        return _whole_step(gm, example_inputs, mla_nodes, split, opts)
    return split


def _whole_step(gm: GraphModule, example_inputs: Sequence[Any], mla_nodes: list[Node], split: Callable,
                opts: BackendOptions) -> Callable:
    """Graph-mode targets: decode steps as one inlined graph per bucket (whole_step), the rest split."""
    from ..runtime.whole_step import WholeStep

    placeholders = {n: real for n, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)}
    latent = placeholders.get(mla_nodes[0].args[2])
    if not isinstance(latent, torch.Tensor):
        log.info("decode steps: layer by layer (the first layer's cache is not a graph input)")
        return split
    block_size = int(latent.shape[1])
    layers = [(node.args[8], _layer_dump_dir(node, opts)) for node in mla_nodes]

    def lower_layers() -> list[LoweredMLA]:
        return [lowered_for(registered_layer(key), opts.target, block_size, "decode", dump_dir, opts)
                for key, dump_dir in layers]
    return WholeStep(gm, example_inputs, opts.target, lower_layers, block_size, split,
                     opts.parsed_target_options)


def _foreign_mla_modules(gm: GraphModule) -> dict[str, str]:
    """{module path: class name} of FOREIGN_MLA modules the graph's nodes came from (Dynamo's
    nn_module_stack)."""
    found = {}
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
            if name in FOREIGN_MLA:
                found.setdefault(path, name)
    return found


def _split_at_layers(gm: GraphModule, mla_nodes: list[Node]) -> GraphModule:
    """Each mla::layer node in a piece of its own; the code between them in pieces in between."""
    partition, current = {}, 0
    layers = set(mla_nodes)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node in layers:
            partition[node.name] = current + 1
            current += 2
        else:
            partition[node.name] = current
    return split_module(gm, None, lambda node: partition[node.name], keep_original_order=True)


def _compile_pieces(split: GraphModule, gm: GraphModule, example_inputs: Sequence[Any], mla_pieces: set[str],
                    inner: Callable) -> None:
    """Compile every non-MLA piece with `inner`, on the fake values that reach it.

    The inputs are Dynamo's own fake values (node.meta["example_value"]) moved into the fake mode
    Dynamo hands to backends (the same ShapeEnv), so pieces see the symbolic shapes Dynamo
    guarded on."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = []
    for node, real in zip(placeholders, example_inputs):
        value = node.meta.get("example_value", real)
        fake_inputs.append(fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value)

    class CompilePieces(Interpreter):
        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            if target not in mla_pieces:
                # a plain attribute, not a submodule: the compiled callable need not be an nn.Module
                split.__dict__[target] = _compile_piece(self.fetch_attr(target), list(args), inner)
            return out

    with fake_mode:
        CompilePieces(split).run(*fake_inputs)


def _compile_piece(piece: GraphModule, args: list[Any], inner: Callable) -> Callable:
    """Backends (AOT's) want a graph that returns a tuple; split pieces with one output return it bare."""
    (output,) = [n for n in piece.graph.nodes if n.op == "output"]
    if isinstance(output.args[0], (tuple, list)):
        return inner(piece, args)
    output.args = ((output.args[0],),)
    piece.recompile()
    compiled = inner(piece, args)
    return lambda *inputs: compiled(*inputs)[0]


def _layer_path(node: Node) -> str:
    """The layer's module path in the compiled model (from Dynamo's nn_module_stack), as a folder name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else node.name
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"\['?([^]']+)'?\]", r".\1", path)).strip("._") or node.name


def _layer_dump_dir(node: Node, options: BackendOptions) -> str | None:
    """<dump_dir>/<layer path>, dump_dir falling back to $MLA_GRAPH_DUMP as lower() does; None: no dumps."""
    base = options.dump_dir or os.environ.get("MLA_GRAPH_DUMP")
    return os.path.join(os.fspath(base), _layer_path(node)) if base else None


def _run_lowered_in(piece: GraphModule, options: BackendOptions, memo: StepMemo) -> None:
    """Rewire a piece's mla::layer node to call the layer's lowered module (same arguments)."""
    (node,) = [n for n in piece.graph.nodes if is_layer_op(n)]
    piece.add_submodule("run_lowered", _RunLowered(options, _layer_dump_dir(node, options), memo))
    node.op, node.target = "call_module", "run_lowered"
    piece.recompile()


# (layer) -> {(target, block_size, phase, dump_dir): LoweredMLA}. A LoweredMLA holds the layer's
# tensors, not the layer, so the weak key does not keep layers alive.
_LOWERED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, LoweredMLA]]" = weakref.WeakKeyDictionary()


def lowered_for(layer: nn.Module, target: str, block_size: int, phase: str, dump_dir: str | None,
                options: BackendOptions | None = None) -> LoweredMLA:
    """The layer lowered for `target` and one phase; lowered on first use, then cached."""
    cache = _LOWERED.setdefault(layer, {})
    key = (target, block_size, phase, dump_dir, options.options_key if options else ())
    pre = layer.__dict__.get("prelowered")   # lowered already (mla_graph.hf.convert): the same module
    if (key not in cache and pre is not None and pre.target.name == target and pre.block_size == block_size
            and phase in pre.graphs and dump_dir is None
            and pre.options == (options.parsed_target_options if options else pre.target.parse(None))):
        cache[key] = pre
    if key not in cache:
        cache[key] = lower(layer, target, [phase], block_size=block_size, dump_dir=dump_dir,
                           target_options=options.parsed_target_options if options else None)
    return cache[key]


class _RunLowered(nn.Module):
    """Same arguments as mla::layer; runs the layer's LoweredMLA for this batch's phase."""

    def __init__(self, options: BackendOptions, dump_dir: str | None, memo: StepMemo) -> None:
        super().__init__()
        self.options, self.dump_dir, self.memo = options, dump_dir, memo

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor,
                rope_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, layer_key: int, num_decodes: int,
                num_prefills: int) -> torch.Tensor:
        kv_cache, metadata = unflatten(latent_cache, rope_cache, slot_mapping, block_table, seq_lens,
                                       query_start_loc, int(num_decodes), int(num_prefills))
        lowered = lowered_for(registered_layer(layer_key), self.options.target, kv_cache.block_size,
                              metadata.phase, self.dump_dir, self.options)
        return lowered(hidden_states, positions, kv_cache, metadata, step_memo=self.memo)
