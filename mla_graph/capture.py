"""capture(layer, phase): the definition as an FX graph over aten + mla::, with symbolic shapes.

One capture serves every batch of its phase: the token count T, request count B, cache size
and block-table width are symbols (for decode T and B are one symbol, one token per request; a
multi_decode batch has 1..16 tokens per request, T and B apart).
Weights are `get_attr` nodes that refer to the layer's own parameters, never copies.
"""
from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_graph.contract import INPUTS, GraphMeta, register_fake_mode

from .attention import MLAAttention

PHASES = ("prefill", "decode", "mixed")   # what lower() builds unless told
# decode requests with several new tokens each (speculative decoding's verification), alone or beside
# prefills; lowered where asked for (the vLLM plugin with speculative decoding): else such batches run
# the prefill graph
MULTI_DECODE, MULTI_MIXED = "multi_decode", "multi_mixed"
ALL_PHASES = PHASES + (MULTI_DECODE, MULTI_MIXED)


def capture(layer: MLAAttention, phase: str, *, block_size: int = 128) -> GraphModule:
    """Trace `layer.plain_forward` for `phase` (one of ALL_PHASES)."""
    if phase not in ALL_PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(ALL_PHASES)}")
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
