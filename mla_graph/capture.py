"""capture(layer, phase): the definition as an FX graph over aten + mla::, with symbolic shapes.

One capture serves every batch of its phase: the token count T, request count B, cache size
and block-table width are symbols (for decode T and B are one symbol, one token per request).
Weights are `get_attr` nodes that refer to the layer's own parameters, never copies.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode

from passes.graph_utils import register_fake_mode

from .attention import MLAAttention
from .cache import PagedLatentCache
from .metadata import MLAMetadata

PHASES = ("prefill", "decode", "mixed")


@dataclass
class Call:
    """One call's arguments; graph inputs are read from it by name (see GRAPH_INPUTS)."""

    hidden_states: torch.Tensor
    positions: torch.Tensor
    kv_cache: PagedLatentCache
    metadata: MLAMetadata
    cos_sin: torch.Tensor | None = None   # the layer's rope table, for inputs derived from it


# Every graph input a pass may ask for, and how a call provides it. Passes that need another
# form of the metadata (a host list, a cumulative length) add it here and as a placeholder.
GRAPH_INPUTS: dict[str, Callable[[Call], object]] = {
    "hidden_states": lambda c: c.hidden_states,
    "positions": lambda c: c.positions,
    "latent_cache": lambda c: c.kv_cache.latent,
    "rope_cache": lambda c: c.kv_cache.rope,
    # Index tensors reach the kernels in the one dtype each GE op takes (a no-op when the caller's
    # metadata already has it; MLAMetadata accepts int32 or int64): slots are int64 (the cache
    # writers' index / cache_index), block tables int32 (FIA's block_table).
    "slot_mapping": lambda c: c.metadata.slot_mapping.to(torch.int64),
    "block_table": lambda c: c.metadata.block_table.to(torch.int32),
    "seq_lens": lambda c: c.metadata.seq_lens,
    "query_start_loc": lambda c: c.metadata.query_start_loc,
    # FIA's length tensors (torchair's air FIA in graph mode) are int64 only in GE; converted on
    # the host once per call, so the graph carries no cast kernel.
    "seq_lens_int64": lambda c: c.metadata.seq_lens.to(torch.int64),
    # host-side forms for kernels that take lengths as lists (torch_npu's SymInt[] arguments)
    "seq_lens_list": lambda c: c.metadata.seq_lens.tolist(),
    "query_ends_list": lambda c: c.metadata.query_start_loc[1:].tolist(),
    "context_ends_list": lambda c: c.metadata.seq_lens.cumsum(0).tolist(),
    # rope cos / sin rows of each token in the layout the NPU rope kernels take: [T, 1, 1, R],
    # each half-table repeated (computed once per call, outside the graph, as vllm-ascend does)
    "rope_cos": lambda c: _rope_rows(c, 0),
    "rope_sin": lambda c: _rope_rows(c, 1),
    # the cache slot of every context token, request by request: [sum(seq_lens)]
    "context_slots": lambda c: context_slots(c.metadata, c.kv_cache.block_size),
}


def _rope_rows(call: Call, which: int) -> torch.Tensor:
    if call.cos_sin is None:
        raise ValueError("this graph reads rope cos/sin rows: the call must carry the layer's cos_sin table")
    half = call.cos_sin.shape[-1] // 2
    rows = call.cos_sin[call.positions.long(), which * half:(which + 1) * half]
    return torch.cat([rows, rows], dim=-1).to(call.hidden_states.dtype)[:, None, None, :]


def context_slots(metadata: MLAMetadata, block_size: int) -> torch.Tensor:
    """Flat cache slots of each request's context tokens 0..seq_len-1, concatenated."""
    offsets = torch.arange(block_size, device=metadata.block_table.device)
    rows = []
    for b, seq_len in enumerate(metadata.seq_lens.tolist()):
        blocks = metadata.block_table[b, : -(-seq_len // block_size)].long()
        rows.append((blocks[:, None] * block_size + offsets).flatten()[:seq_len])
    return torch.cat(rows) if rows else metadata.slot_mapping.new_empty(0)


# A graph that attends over the decode and prefill requests of a mixed batch separately
# (passes.split_mixed) reads "<part>_<input>" from that part of the call.
BATCH_PARTS = ("decode", "prefill")


# Inputs derived from the step, not the layer, and what each depends on: the layers of one step
# get the same positions and metadata tensors, so each is computed once per step (for the first
# layer) and reused by the others while those tensors are the same objects, unwritten since.
STEP_DERIVED: dict[str, Callable[[Call], tuple]] = {
    "rope_cos": lambda c: (c.positions, c.cos_sin, c.hidden_states.dtype),
    "rope_sin": lambda c: (c.positions, c.cos_sin, c.hidden_states.dtype),
    "seq_lens_int64": lambda c: (c.metadata.seq_lens,),
    "seq_lens_list": lambda c: (c.metadata.seq_lens,),
    "query_ends_list": lambda c: (c.metadata.query_start_loc,),
    "context_ends_list": lambda c: (c.metadata.seq_lens,),
    "context_slots": lambda c: (c.metadata.block_table, c.metadata.seq_lens, c.kv_cache.block_size),
}
# name -> (what it was computed from, their versions, value): the last step's only
_STEP_VALUES: dict[str, tuple[tuple, tuple, object]] = {}


def _same(key: tuple, versions: tuple, seen: tuple[tuple, tuple, object] | None) -> bool:
    if seen is None or len(seen[0]) != len(key):
        return False
    for a, b in zip(key, seen[0]):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if a is not b:
                return False
        elif a != b:
            return False
    return versions == seen[1]


def step_input(name: str, call: Call) -> object:
    """GRAPH_INPUTS[name](call); for step-derived inputs, the value already computed this step."""
    depends = STEP_DERIVED.get(name)
    if depends is None:
        return GRAPH_INPUTS[name](call)
    key = depends(call)
    versions = tuple(t._version for t in key if isinstance(t, torch.Tensor))
    seen = _STEP_VALUES.get(name)
    if _same(key, versions, seen):
        return seen[2]
    value = GRAPH_INPUTS[name](call)
    _STEP_VALUES[name] = (key, versions, value)
    return value


def graph_inputs(gm: GraphModule, call: Call) -> list[object]:
    parts: dict[str, Call] = {}
    values = []
    for name in gm.meta["mla_inputs"]:
        part, _, base = name.partition("_")
        if part in BATCH_PARTS and base in GRAPH_INPUTS:
            if part not in parts:
                parts[part] = part_of(call, part)
            values.append(GRAPH_INPUTS[base](parts[part]))
        else:
            values.append(step_input(name, call))
    return values


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


def capture(layer: MLAAttention, phase: str, *, block_size: int = 128) -> GraphModule:
    """Trace `layer.plain_forward` for `phase` ("prefill", "decode" or "mixed")."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    if not isinstance(layer, MLAAttention):
        raise TypeError(f"capture expects an MLAAttention, got {type(layer).__name__}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    config = layer.config
    shape_env = ShapeEnv(duck_shape=False)
    fake_mode = FakeTensorMode(shape_env=shape_env)

    def symbol(name: str, hint: int) -> torch.SymInt:
        source = ConstantSource(name)
        sym = shape_env.create_symbol(hint, source=source, dynamic_dim=DimDynamic.DYNAMIC)
        return shape_env.create_symintnode(sym, hint=hint, source=source)

    B = symbol("num_reqs", 3)
    T = B if phase == "decode" else symbol("num_tokens", 11)
    NB, MB = symbol("num_blocks", 13), symbol("max_blocks_per_req", 5)
    dtype = layer.dtype
    symbols = {str(s.node.expr): name for s, name in
               ((B, "B"), (T, "T"), (NB, "num_blocks"), (MB, "max_blocks"))}

    named = dict(layer.named_parameters())
    named.update(layer.named_buffers())
    with fake_mode:
        fake_inputs = {
            "hidden_states": torch.empty(T, config.hidden_size, dtype=dtype),
            "positions": torch.empty(T, dtype=torch.int64),
            "latent_cache": torch.empty(NB, block_size, 1, config.kv_lora_rank, dtype=dtype),
            "rope_cache": torch.empty(NB, block_size, 1, config.qk_rope_head_dim, dtype=dtype),
            "slot_mapping": torch.empty(T, dtype=torch.int64),
            "block_table": torch.empty(B, MB, dtype=torch.int32),
            "seq_lens": torch.empty(B, dtype=torch.int32),
            "query_start_loc": torch.empty(B + 1, dtype=torch.int32),
        }
    fake_weights = [fake_mode.from_tensor(t.detach(), static_shapes=True) for t in named.values()]
    weight_names = list(named)

    def traced(*flat):
        weights = {f"layer.{k}": v for k, v in zip(weight_names, flat[: len(weight_names)])}
        return torch.func.functional_call(_PlainForward(layer), weights, flat[len(weight_names):])

    with torch.no_grad():
        traced_gm = make_fx(traced, tracing_mode="symbolic", pre_dispatch=True)(
            *fake_weights, *fake_inputs.values())
    gm = _finish(traced_gm, layer, weight_names, list(fake_inputs), phase, block_size, symbols)
    gm.meta["mla_fake_mode"] = fake_mode
    register_fake_mode(fake_mode)
    return gm


class _PlainForward(torch.nn.Module):
    def __init__(self, layer: MLAAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.layer.plain_forward(*inputs)


def _finish(traced: GraphModule, layer: MLAAttention, weight_names: list[str], input_names: list[str],
            phase: str, block_size: int, symbols: dict[str, str]) -> GraphModule:
    """Weights become get_attr nodes on the layer's own tensors; inputs get their names."""
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    weight_nodes, input_nodes = placeholders[: len(weight_names)], placeholders[len(weight_names):]
    first = input_nodes[0]
    for node, name in zip(weight_nodes, weight_names):
        with graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the owning module is attached below
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    for node, name in zip(input_nodes, input_names):
        node.name = node.target = name
    graph._codegen = torch.fx.graph.CodeGen()
    for node in graph.nodes:
        node.meta["mla_pass"] = "capture"
    gm = GraphModule(layer, graph, class_name=f"MLA_{phase}")
    gm.meta.update(mla_phase=phase, mla_inputs=input_names, mla_block_size=block_size,
                   mla_symbols=symbols, mla_num_heads=layer.num_heads, mla_config=layer.config,
                   mla_dtype=layer.dtype)
    gm.recompile()
    return gm
