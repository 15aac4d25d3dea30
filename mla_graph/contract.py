"""The typed contract between capture, the passes and the runtime: graph inputs and graph metadata.

Every graph input is a GraphInput declared once, by key, in mla_graph.inputs with how a call
provides it (the definition's eight, and the forms of the metadata the kernels take);
placeholders carry theirs in node.meta["mla_input"]. What capture knows of a graph, and what
passes record on it, is one GraphMeta in gm.meta["mla"] (graph_meta(gm)); its `inputs` are the
graph's signature. Nothing is matched by name.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from mla_graph.inputs import (BLOCK_TABLE, HIDDEN_STATES, INPUTS, LATENT_CACHE, PARTS, POSITIONS, QUERY_START_LOC,
                              ROPE_CACHE, SEQ_LENS, SLOT_MAPPING, GraphInput)

__all__ = ["BLOCK_TABLE", "HIDDEN_STATES", "INPUTS", "LATENT_CACHE", "PARTS", "POSITIONS", "QUERY_START_LOC",
           "ROPE_CACHE", "SEQ_LENS", "SLOT_MAPPING", "GraphInput", "GraphMeta", "fake_mode_of", "find_input",
           "graph_meta", "input_of", "maybe_meta", "register_fake_mode"]


@dataclass
class GraphMeta:
    """What a captured graph is, and what passes record on it (gm.meta['mla'])."""

    phase: str                      # 'prefill' | 'decode' | 'mixed'
    config: Any                     # the layer's MLAConfig
    dtype: torch.dtype
    num_heads: int                  # heads on this rank
    block_size: int
    fake_mode: Any                  # the FakeTensorMode of every meta['val'] (one shape environment)
    inputs: list[GraphInput]        # the placeholders, in order: the graph's signature
    symbols: dict[str, str] = field(default_factory=dict)   # size symbol -> its name in dumps
    # buffer -> (get_attr target of its source weight, fn(weight) -> buffer) or None (weight-independent)
    derived_constants: dict[str, Any] = field(default_factory=dict)
    attention_form: str | None = None   # the cost model's choice for the graph (per node: node.meta)
    # set by lower() on a target's second graph of a phase (Target.form_per_call): the form every
    # attention but a split batch's decode part takes, whatever the cost model's representative batch
    forced_attention_form: str | None = None
    target: str | None = None           # set by lower()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def copy(self) -> "GraphMeta":
        """A copy whose containers a pass may edit without touching this one's."""
        return dataclasses.replace(self, inputs=list(self.inputs), symbols=dict(self.symbols),
                                   derived_constants=dict(self.derived_constants))


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
