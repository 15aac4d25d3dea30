"""The typed contract between capture, the passes and the runtime: graph inputs and graph metadata.

Every graph input is a GraphInput, declared by whoever adds it (capture the definition's eight, a
pass the forms of the metadata its kernels take) with how a call provides it; placeholders carry
theirs in node.meta["mla_input"]. What capture knows of a graph, and what passes record on it, is
one GraphMeta in gm.meta["mla"] (graph_meta(gm)). Nothing is matched by name.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

__all__ = ["BLOCK_TABLE", "HIDDEN_STATES", "INPUTS", "LATENT_CACHE", "PARTS", "POSITIONS", "QUERY_START_LOC",
           "ROPE_CACHE", "SEQ_LENS", "SLOT_MAPPING", "GraphInput", "GraphMeta", "fake_mode_of", "find_input",
           "graph_meta", "input_of", "maybe_meta", "register_fake_mode"]

PARTS = ("decode", "prefill")   # the parts of a split mixed batch (passes.split_mixed)


@dataclass(frozen=True, eq=False)
class GraphInput:
    """A graph input: `derive(call)` gives its value from one call's arguments (a
    mla_graph.capture.Call: hidden_states, positions, kv_cache, metadata, cos_sin).

    on:   'device', a tensor, or 'host', a list of ints (kernels with SymInt[] lengths)
    per:  'layer', each layer's own (its hidden states, its caches), or 'step', the same for every
          layer of a model step (metadata and what is derived from it)
    memo: for a derived step input, what its value is computed from (tensors by identity and
          version): the layers of one step then compute it once (mla_graph.capture.step_input)
    part: read from that part ('decode' / 'prefill') of a mixed call; `base` is the whole-call input
    """

    name: str
    derive: Callable[[Any], object]
    on: str = "device"
    per: str = "step"
    memo: Callable[[Any], tuple] | None = None
    part: str | None = None
    base: "GraphInput | None" = None

    def of_part(self, part: str) -> "GraphInput":
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return dataclasses.replace(self, name=f"{part}_{self.name}", part=part, base=self, memo=None)   # parts: not memoised

    @property
    def kind(self) -> "GraphInput":
        """The input this is a part of, or itself: what a pass compares inputs by."""
        return self.base or self


@dataclass
class GraphMeta:
    """What a captured graph is, and what passes record on it (gm.meta['mla'])."""

    phase: str                      # 'prefill' | 'decode' | 'mixed'
    config: Any                     # the layer's MLAConfig
    dtype: torch.dtype
    num_heads: int                  # heads on this rank
    block_size: int
    fake_mode: Any                  # the FakeTensorMode of every meta['val'] (one shape environment)
    inputs: list[GraphInput]        # the placeholders, in order
    symbols: dict[str, str] = field(default_factory=dict)   # size symbol -> its name in dumps
    # buffer -> (get_attr target of its source weight, fn(weight) -> buffer) or None (weight-independent)
    derived_constants: dict[str, Any] = field(default_factory=dict)
    attention_form: str | None = None   # the cost model's choice for the graph (per node: node.meta)
    target: str | None = None           # set by lower()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def copy(self) -> "GraphMeta":
        """A copy whose containers a pass may edit without touching this one's."""
        return dataclasses.replace(self, inputs=list(self.inputs), symbols=dict(self.symbols),
                                   derived_constants=dict(self.derived_constants))


# The definition's inputs, in order (mla_graph.capture makes them the captured graph's placeholders).
# Index tensors reach the kernels in the one dtype each GE op takes (a no-op when the caller's
# metadata already has it; MLAMetadata accepts int32 or int64): slots are int64 (the cache
# writers' index / cache_index), block tables int32 (FIA's block_table).
HIDDEN_STATES = GraphInput("hidden_states", lambda c: c.hidden_states, per="layer")
POSITIONS = GraphInput("positions", lambda c: c.positions)
LATENT_CACHE = GraphInput("latent_cache", lambda c: c.kv_cache.latent, per="layer")
ROPE_CACHE = GraphInput("rope_cache", lambda c: c.kv_cache.rope, per="layer")
SLOT_MAPPING = GraphInput("slot_mapping", lambda c: c.metadata.slot_mapping.to(torch.int64))
BLOCK_TABLE = GraphInput("block_table", lambda c: c.metadata.block_table.to(torch.int32))
SEQ_LENS = GraphInput("seq_lens", lambda c: c.metadata.seq_lens)
QUERY_START_LOC = GraphInput("query_start_loc", lambda c: c.metadata.query_start_loc)
INPUTS = (HIDDEN_STATES, POSITIONS, LATENT_CACHE, ROPE_CACHE, SLOT_MAPPING, BLOCK_TABLE, SEQ_LENS, QUERY_START_LOC)


def graph_meta(gm: GraphModule) -> GraphMeta:
    meta = gm.meta.get("mla")
    if not isinstance(meta, GraphMeta):
        raise ValueError("this graph was not captured by mla_graph.capture (gm.meta['mla'] holds no GraphMeta); "
                         "capture the layer with mla_graph.capture.capture(layer, phase)")
    return meta


def maybe_meta(gm: GraphModule) -> GraphMeta | None:
    """gm's GraphMeta, or None for a graph not captured by mla_graph (a user's own, in tests)."""
    meta = gm.meta.get("mla")
    return meta if isinstance(meta, GraphMeta) else None


def input_of(node: Node) -> GraphInput | None:
    """The GraphInput a placeholder reads, or None for any other node."""
    return node.meta.get("mla_input") if node.op == "placeholder" else None


def find_input(gm: GraphModule, kind: GraphInput, part: str | None = None) -> Node | None:
    """The placeholder reading `kind` (of `part`), if the graph has one."""
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and (i := input_of(n)) is not None
                 and i.kind is kind and i.part == part), None)


# shape environment -> the fake mode made over it (capture registers each graph's), so a factory
# op whose only inputs are symbolic sizes (aten.arange(0, s0)) runs in its graph's fake mode
_FAKE_MODES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_fake_mode(mode) -> None:
    _FAKE_MODES[mode.shape_env] = mode


def fake_mode_of(shape_env) -> Any:
    """The fake mode registered over `shape_env`, or None."""
    return _FAKE_MODES.get(shape_env)
