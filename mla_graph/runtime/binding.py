"""A lowered graph's calling convention, and its signature bound to one call.

`bind(signature, call, memo)` gives the value of each input of the signature (GraphMeta.inputs),
derived by key as mla_graph.inputs declares it; an input of a part reads that part of the call.
A per-step input (declared with memo=True) is computed once per model step: the layers of one step
share a StepMemo (their modules hold the same one: mla_graph.lowering.share_step_memo), and reuse
the value while what it was derived from is the same (tensors: the same objects, unwritten since).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..contract import graph_meta
from ..inputs import Call, Derivation, GraphInput, derivation
from ..metadata import MLAMetadata


class StepMemo:
    """The per-step inputs computed for the last step: key -> (what it read, their versions, value)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[tuple, tuple, object]] = {}

    def value(self, derive: Derivation, arguments: dict[str, Any]) -> object:
        key = tuple(_identity(arguments[name]) for name in derive.reads)
        versions = tuple(t._version for part in key for t in (part if isinstance(part, tuple) else (part,))
                         if isinstance(t, torch.Tensor))
        held = self._values.get(derive.input.name)
        if held is not None and _same(key, held[0]) and versions == held[1]:
            return held[2]
        value = derive(arguments)
        self._values[derive.input.name] = (key, versions, value)
        return value


def _identity(value: Any) -> Any:
    """What a memoised value depends on: tensors as themselves (compared by identity), metadata as
    its tensors and counts."""
    if isinstance(value, MLAMetadata):
        return (value.slot_mapping, value.block_table, value.seq_lens, value.query_start_loc,
                value.num_decodes, value.num_decode_tokens, value.num_prefills)
    return value


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not _same(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


def bind(signature: Sequence[GraphInput], call: Call, memo: StepMemo | None = None) -> list[object]:
    """The values of `signature`'s inputs for `call`, in order."""
    arguments = call.arguments()
    parts: dict[str, dict[str, Any]] = {}
    values = []
    for inp in signature:
        derive = derivation(inp)
        if inp.part is not None:   # parts are not memoised (a part's tensors are new every call)
            if inp.part not in parts:
                parts[inp.part] = part_of(call, inp.part).arguments()
            values.append(derive(parts[inp.part]))
        elif derive.memo and memo is not None:
            values.append(memo.value(derive, arguments))
        else:
            values.append(derive(arguments))
    return values


@dataclass(frozen=True, eq=False)
class CallingConvention:
    """How a lowered graph is called, owned by the lowered artifact (LoweredMLA, a graph-mode runner):
    the graph, its signature frozen when lowering finished (each input by key: how it is derived,
    device or host, per layer or per step), and the recipes of its derived constants (buffer ->
    source weight and how it is cut; LoweredMLA recuts them when the weight changes)."""

    graph: torch.fx.GraphModule
    signature: tuple[GraphInput, ...]
    derived_constants: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "CallingConvention":
        meta = graph_meta(gm)
        return cls(gm, tuple(meta.inputs), tuple(meta.derived_constants.items()))

    @property
    def block_size(self) -> int:
        """Tokens per cache block the graph was captured for (its GraphMeta: the one place it is kept)."""
        return graph_meta(self.graph).block_size

    @property
    def config(self) -> Any:
        return graph_meta(self.graph).config

    def bind(self, call: Call, memo: StepMemo | None = None) -> list[object]:
        """The graph's arguments for `call`, in its signature's order."""
        return bind(self.signature, call, memo)

    def __call__(self, call: Call, memo: StepMemo | None = None) -> Any:
        return self.graph(*self.bind(call, memo))


def graph_inputs(gm: torch.fx.GraphModule, call: Call, memo: StepMemo | None = None) -> list[object]:
    """The values of gm's inputs for `call` (gm's signature: its GraphMeta.inputs)."""
    return bind(graph_meta(gm).inputs, call, memo)


def part_of(call: Call, part: str) -> Call:
    """The decode requests (the first num_decodes) or the prefill requests of a call, as a call."""
    md = call.metadata
    reqs = slice(0, md.num_decodes) if part == "decode" else slice(md.num_decodes, md.num_reqs)
    tokens = slice(0, md.num_decode_tokens) if part == "decode" else slice(md.num_decode_tokens, md.num_tokens)
    qsl = md.query_start_loc[reqs.start: reqs.stop + 1]
    metadata = MLAMetadata(
        slot_mapping=md.slot_mapping[tokens], block_table=md.block_table[reqs], seq_lens=md.seq_lens[reqs],
        query_start_loc=qsl - qsl[:1] if qsl.numel() else md.query_start_loc[:1],
        num_decodes=md.num_decodes if part == "decode" else 0,
        num_decode_tokens=md.num_decode_tokens if part == "decode" else 0,
        num_prefills=0 if part == "decode" else md.num_prefills)
    return Call(call.hidden_states[tokens], call.positions[tokens], call.kv_cache, metadata, call.cos_sin)
