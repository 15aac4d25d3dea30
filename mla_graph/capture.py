"""capture(layer, phase): the definition as an FX graph over aten + mla::, with symbolic shapes.

One capture serves every batch of its phase: the token count T, request count B, cache size
and block-table width are symbols (for decode T and B are one symbol, one token per request).
Weights are `get_attr` nodes that refer to the layer's own parameters, never copies.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_graph.contract import INPUTS, GraphInput, GraphMeta, graph_meta, register_fake_mode

from .attention import MLAAttention
from .cache import PagedLatentCache
from .metadata import MLAMetadata

PHASES = ("prefill", "decode", "mixed")


@dataclass
class Call:
    """One call's arguments; each graph input (mla_graph.contract.GraphInput) derives its value from it."""

    hidden_states: torch.Tensor
    positions: torch.Tensor
    kv_cache: PagedLatentCache
    metadata: MLAMetadata
    cos_sin: torch.Tensor | None = None   # the layer's rope table, for inputs derived from it


# The definition's inputs (HIDDEN_STATES ... QUERY_START_LOC, mla_graph.contract.INPUTS) are the
# captured graph's placeholders; passes declare the inputs they add (another form of the metadata:
# a host list, int64 lengths, rope rows) beside the pass, with how a call provides them.

# memoised step inputs -> (what the value was computed from, their versions, value): the last step's only
_STEP_VALUES: dict[GraphInput, tuple[tuple, tuple, object]] = {}


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


def step_input(inp: GraphInput, call: Call) -> object:
    """inp.derive(call); for a memoised step input, the value already computed this step: the layers
    of one step get the same positions and metadata tensors, so it is computed for the first layer
    and reused by the others while those tensors are the same objects, unwritten since."""
    if inp.memo is None:
        return inp.derive(call)
    key = inp.memo(call)
    versions = tuple(t._version for t in key if isinstance(t, torch.Tensor))
    seen = _STEP_VALUES.get(inp)
    if _same(key, versions, seen):
        return seen[2]
    value = inp.derive(call)
    _STEP_VALUES[inp] = (key, versions, value)
    return value


def graph_inputs(gm: GraphModule, call: Call) -> list[object]:
    """The values of gm's inputs for `call`, in order (a part's inputs from that part of the call)."""
    parts: dict[str, Call] = {}
    values = []
    for inp in graph_meta(gm).inputs:
        if inp.part is not None:
            if inp.part not in parts:
                parts[inp.part] = part_of(call, inp.part)
            values.append(inp.base.derive(parts[inp.part]))
        else:
            values.append(step_input(inp, call))
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
        fake_inputs = [
            torch.empty(T, config.hidden_size, dtype=dtype),                          # hidden_states
            torch.empty(T, dtype=torch.int64),                                        # positions
            torch.empty(NB, block_size, 1, config.kv_lora_rank, dtype=dtype),         # latent_cache
            torch.empty(NB, block_size, 1, config.qk_rope_head_dim, dtype=dtype),     # rope_cache
            torch.empty(T, dtype=torch.int64),                                        # slot_mapping
            torch.empty(B, MB, dtype=torch.int32),                                    # block_table
            torch.empty(B, dtype=torch.int32),                                        # seq_lens
            torch.empty(B + 1, dtype=torch.int32),                                    # query_start_loc
        ]
    fake_weights = [fake_mode.from_tensor(t.detach(), static_shapes=True) for t in named.values()]
    weight_names = list(named)

    def traced(*flat):
        weights = {f"layer.{k}": v for k, v in zip(weight_names, flat[: len(weight_names)])}
        return torch.func.functional_call(_PlainForward(layer), weights, flat[len(weight_names):])

    with torch.no_grad():
        traced_gm = make_fx(traced, tracing_mode="symbolic", pre_dispatch=True)(
            *fake_weights, *fake_inputs)
    gm = _finish(traced_gm, layer, weight_names, phase)
    gm.meta["mla"] = GraphMeta(phase=phase, config=config, dtype=dtype, num_heads=layer.num_heads,
                               block_size=block_size, fake_mode=fake_mode, inputs=list(INPUTS), symbols=symbols)
    register_fake_mode(fake_mode)
    return gm


class _PlainForward(torch.nn.Module):
    def __init__(self, layer: MLAAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.layer.plain_forward(*inputs)


def _finish(traced: GraphModule, layer: MLAAttention, weight_names: list[str], phase: str) -> GraphModule:
    """Weights become get_attr nodes on the layer's own tensors; inputs get their names and GraphInputs."""
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
    for node, inp in zip(input_nodes, INPUTS):
        node.name = node.target = inp.name
        node.meta["mla_input"] = inp
    graph._codegen = torch.fx.graph.CodeGen()
    for node in graph.nodes:
        node.meta["mla_pass"] = "capture"
    gm = GraphModule(layer, graph, class_name=f"MLA_{phase}")
    gm.recompile()
    return gm
