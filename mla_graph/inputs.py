"""Every input a lowered graph can take, declared once, by key, with how a call provides it.

A graph's signature (GraphMeta.inputs, one GraphInput per placeholder) names its inputs by key and
says where each value lives; it holds no function. How one call gives each value is declared here
with `declare(key, fn, ...)`: `fn`'s parameter names say what it reads of the call (ARGUMENTS), so
the runtime can give it exactly that, and say what a caller lacks. Passes ask for an input by key
(`graph_input("rope_cos")`); the runtime (mla_graph.runtime.binding) derives values by key.

The definition's eight inputs come first (what capture makes the placeholders); then the forms of
them the NPU kernels take, each computed once per model step outside the graph, as vllm-ascend
builds them: rope cos / sin rows of each token in the layout the NPU rope kernels take
([T, 1, 1, R], each half-table repeated), lengths as host lists for torch_npu's SymInt[]
arguments or as int64 tensors for torchair's, and the cache slot of every context token.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cache import PagedLatentCache
from .metadata import MLAMetadata

PARTS = ("decode", "prefill")   # the parts of a split mixed batch (mla_graph.passes.split_mixed)

# What a derivation may read of a call, by parameter name.
ARGUMENTS = ("hidden_states", "positions", "latent_cache", "rope_cache", "metadata", "cos_sin", "dtype", "block_size")


@dataclass
class Call:
    """One call's arguments, from which every graph input is derived."""

    hidden_states: torch.Tensor
    positions: torch.Tensor
    kv_cache: PagedLatentCache
    metadata: MLAMetadata
    cos_sin: torch.Tensor | None = None   # the layer's rope table, for inputs derived from it

    def arguments(self) -> dict[str, Any]:
        """The call as derivations read it (ARGUMENTS)."""
        return {"hidden_states": self.hidden_states, "positions": self.positions,
                "latent_cache": self.kv_cache.latent, "rope_cache": self.kv_cache.rope, "metadata": self.metadata,
                "cos_sin": self.cos_sin, "dtype": self.hidden_states.dtype, "block_size": self.kv_cache.block_size}


@dataclass(frozen=True, eq=False)
class GraphInput:
    """One entry of a graph's signature: a declared input (by key), or a part of one.

    on:   'device', a tensor, or 'host', a list of ints (kernels with SymInt[] lengths)
    per:  'layer', each layer's own (its hidden states, its caches), or 'step', the same for every
          layer of a model step (metadata and what is derived from it)
    part: read from that part ('decode' / 'prefill') of a mixed call; `base` is the whole-call input
    Compared by identity: `graph_input(key)` always gives the same object.
    """

    name: str
    on: str = "device"
    per: str = "step"
    part: str | None = None
    base: "GraphInput | None" = None

    def of_part(self, part: str) -> "GraphInput":
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return dataclasses.replace(self, name=f"{part}_{self.name}", part=part, base=self)

    @property
    def kind(self) -> "GraphInput":
        """The input this is a part of, or itself: what a pass compares inputs by."""
        return self.base or self

    @property
    def key(self) -> str:
        """The key it was declared under."""
        return self.kind.name


@dataclass(frozen=True)
class Derivation:
    """How a call provides a declared input: fn(**the arguments it reads)."""

    input: GraphInput
    fn: Callable[..., object]
    reads: tuple[str, ...]
    memo: bool   # a per-step value: the layers of one step compute it once (mla_graph.runtime.binding)

    def __call__(self, arguments: dict[str, Any]) -> object:
        return self.fn(**{name: arguments[name] for name in self.reads})


_DECLARED: dict[str, Derivation] = {}


def declare(key: str, fn: Callable[..., object], *, on: str = "device", per: str = "step",
            memo: bool = False) -> GraphInput:
    """Declare graph input `key`, derived from a call by `fn`, whose parameter names (ARGUMENTS)
    say what it reads. `memo`: computed once per model step (a step input derived from the step's
    positions or metadata). Returns the input, which `graph_input(key)` gives from then on."""
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"a graph input's key must be an identifier (it names a placeholder), got {key!r}")
    if on not in ("device", "host") or per not in ("layer", "step"):
        raise ValueError(f"graph input {key!r}: on must be 'device' or 'host' and per 'layer' or 'step', "
                         f"got on={on!r}, per={per!r}")
    reads = tuple(inspect.signature(fn).parameters)
    unknown = [name for name in reads if name not in ARGUMENTS]
    if unknown:
        raise ValueError(f"graph input {key!r}: its function reads {unknown}, which a call does not give; it "
                         f"may read {', '.join(ARGUMENTS)} (by parameter name)")
    if memo and per != "step":
        raise ValueError(f"graph input {key!r}: only a per-step input can be computed once per step (memo)")
    held = _DECLARED.get(key)
    if held is not None:
        same = (held.input.on, held.input.per, held.reads, held.memo) == (on, per, reads, memo) \
            and (held.fn.__module__, held.fn.__qualname__) == (fn.__module__, fn.__qualname__)
        if not same:
            raise ValueError(f"graph input {key!r} is declared already (by {held.fn.__module__}); "
                             f"choose another key")
        return held.input    # the same declaration again (a module imported twice)
    inp = GraphInput(key, on=on, per=per)
    _DECLARED[key] = Derivation(inp, fn, reads, memo)
    return inp


def graph_input(key: str) -> GraphInput:
    """The input declared under `key`."""
    if key not in _DECLARED:
        raise ValueError(f"no graph input is declared as {key!r}; declared: {', '.join(_DECLARED)} "
                         f"(declare one with mla_graph.inputs.declare)")
    return _DECLARED[key].input


def derivation(inp: GraphInput) -> Derivation:
    """How a call provides `inp` (a part of an input: how it provides the whole input)."""
    held = _DECLARED.get(inp.key)
    if held is None or held.input is not inp.kind:
        raise ValueError(f"graph input {inp.name!r} has no declaration (mla_graph.inputs.declare), so no call "
                         f"can provide it")
    return held


# --- the definition's inputs, in order: capture makes them the captured graph's placeholders. Index
# tensors reach the kernels in the one dtype each GE op takes (a no-op when the caller's metadata
# already has it; MLAMetadata accepts int32 or int64): slots int64 (the cache writers' index /
# cache_index), block tables int32 (FIA's block_table).
HIDDEN_STATES = declare("hidden_states", lambda hidden_states: hidden_states, per="layer")
POSITIONS = declare("positions", lambda positions: positions)
LATENT_CACHE = declare("latent_cache", lambda latent_cache: latent_cache, per="layer")
ROPE_CACHE = declare("rope_cache", lambda rope_cache: rope_cache, per="layer")
SLOT_MAPPING = declare("slot_mapping", lambda metadata: metadata.slot_mapping.to(torch.int64))
BLOCK_TABLE = declare("block_table", lambda metadata: metadata.block_table.to(torch.int32))
SEQ_LENS = declare("seq_lens", lambda metadata: metadata.seq_lens)
QUERY_START_LOC = declare("query_start_loc", lambda metadata: metadata.query_start_loc)
INPUTS = (HIDDEN_STATES, POSITIONS, LATENT_CACHE, ROPE_CACHE, SLOT_MAPPING, BLOCK_TABLE, SEQ_LENS, QUERY_START_LOC)


# --- what the NPU and torchair kernels take beside them (mla_graph.passes.npu_lower, torchair_lower)
def rope_rows(positions: torch.Tensor, cos_sin: torch.Tensor | None, dtype: torch.dtype, which: int) -> torch.Tensor:
    """cos (which=0) or sin (1) of each token, [T, 1, 1, R], each half-table repeated twice."""
    if cos_sin is None:
        raise ValueError("this graph reads rope cos/sin rows: the call must carry the layer's cos_sin table")
    half = cos_sin.shape[-1] // 2
    rows = cos_sin[positions.long(), which * half:(which + 1) * half]
    return torch.cat([rows, rows], dim=-1).to(dtype)[:, None, None, :]


def context_slots(metadata: MLAMetadata, block_size: int) -> torch.Tensor:
    """Flat cache slots of each request's context tokens 0..seq_len-1, concatenated (int64): every
    slot of each request's block-table row, the first seq_len kept (no loop over requests)."""
    table = metadata.block_table.long()
    offsets = torch.arange(block_size, device=table.device)
    slots = (table[:, :, None] * block_size + offsets).flatten(1)                   # [B, MB * block_size]
    positions = torch.arange(slots.shape[1], device=table.device)
    return slots[positions < metadata.seq_lens.to(table.device)[:, None].long()]


declare("rope_cos", lambda positions, cos_sin, dtype: rope_rows(positions, cos_sin, dtype, 0), memo=True)
declare("rope_sin", lambda positions, cos_sin, dtype: rope_rows(positions, cos_sin, dtype, 1), memo=True)
declare("seq_lens_list", lambda metadata: metadata.seq_lens.tolist(), on="host", memo=True)
declare("query_ends_list", lambda metadata: metadata.query_start_loc[1:].tolist(), on="host", memo=True)
declare("context_ends_list", lambda metadata: metadata.seq_lens.cumsum(0).tolist(), on="host", memo=True)
declare("context_slots", context_slots, memo=True)
declare("seq_lens_int64", lambda metadata: metadata.seq_lens.to(torch.int64), memo=True)
declare("query_ends_int64", lambda metadata: metadata.query_start_loc[1:].to(torch.int64), memo=True)
