"""Small hand-built FX graphs for the isolated pass tests (tests/test_pass_units.py).

A GraphBuilder makes a torch.fx.Graph node by node, every node with its fake value, sizes that
vary per call (tokens, requests, blocks) as symbols of one shape environment the way capture()
makes them, and the GraphMeta the passes read (mla_graph.contract). An input named like one of the
contract's (capture's, or one a pass declares; "decode_seq_lens" is the decode part's seq_lens) reads
that GraphInput; any other is an input of the hand-built graph alone. Values for a run are given by
placeholder name, so a graph a pass added inputs to is called with its own placeholders (`inputs_for`).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

import mla_graph.primitives  # noqa: F401  (registers torch.ops.mla)
from mla_graph import contract
from mla_graph.contract import register_fake_mode
from mla_graph.passes.graph_utils import call
from mla_graph.passes.npu_lower import (CONTEXT_ENDS_LIST, CONTEXT_SLOTS, QUERY_ENDS_LIST, ROPE_COS, ROPE_SIN,
                              SEQ_LENS_LIST)
from mla_graph.passes.torchair_lower import SEQ_LENS_INT64

aten, mla = torch.ops.aten, torch.ops.mla


KNOWN = {i.name: i for i in (*contract.INPUTS, ROPE_COS, ROPE_SIN, SEQ_LENS_LIST, QUERY_ENDS_LIST,
                              CONTEXT_ENDS_LIST, CONTEXT_SLOTS, SEQ_LENS_INT64)}


def graph_input(name: str, host: bool) -> contract.GraphInput:
    part, _, base = name.partition("_")
    if part in contract.PARTS and base in KNOWN:
        return KNOWN[base].of_part(part)
    # an input of a hand-built graph only: no call provides it (binding says so); give its value by name
    return KNOWN.get(name) or contract.GraphInput(name, on="host" if host else "device", per="layer")


class GraphBuilder:
    def __init__(self, *, phase: str = "decode", dtype: torch.dtype = torch.float32, block_size: int = 4,
                 num_heads: int = 2) -> None:
        self.shape_env = ShapeEnv(duck_shape=False)
        self.mode = FakeTensorMode(shape_env=self.shape_env)
        register_fake_mode(self.mode)
        self.graph = Graph()
        self.root = torch.nn.Module()
        self.inputs: list[contract.GraphInput] = []
        self.symbols: dict[str, str] = {}
        self.meta = dict(phase=phase, block_size=block_size, num_heads=num_heads, dtype=dtype, config=None)

    def sym(self, name: str, hint: int) -> torch.SymInt:
        source = ConstantSource(name)
        s = self.shape_env.create_symbol(hint, source=source, dynamic_dim=DimDynamic.DYNAMIC)
        self.symbols[str(s)] = name
        return self.shape_env.create_symintnode(s, hint=hint, source=source)

    def input(self, name: str, shape: tuple | None = None, dtype: torch.dtype = torch.float32, *,
              value: Any = None) -> Node:
        """A graph input: a tensor of `shape` (ints or symbols), or a host value (e.g. a list)."""
        node = self.graph.placeholder(name)
        if shape is None:
            node.meta["val"] = value
        else:
            with self.mode:
                node.meta["val"] = torch.empty(*shape, dtype=dtype)
        node.meta["mla_input"] = graph_input(name, shape is None)
        self.inputs.append(node.meta["mla_input"])
        return node

    def weight(self, name: str, tensor: torch.Tensor, *, parameter: bool = True) -> Node:
        if parameter:
            self.root.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            self.root.register_buffer(name, tensor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node = self.graph.get_attr(name)
        node.meta["val"] = self.mode.from_tensor(tensor, static_shapes=True)
        return node

    def op(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        return call(self.graph, target, *args, **kwargs)

    def finish(self, output: Any, **meta: Any) -> GraphModule:
        self.graph.output(output)
        gm = GraphModule(self.root, self.graph, class_name="Hand")
        gm.meta["mla"] = contract.GraphMeta(**self.meta, fake_mode=self.mode, inputs=list(self.inputs),
                                            symbols=dict(self.symbols), **meta)
        gm.recompile()
        return gm


def placeholders(gm: GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def inputs_for(values: Mapping[str, Any]):
    """make_inputs for check_pass: each placeholder's value by name, tensors cloned per call."""
    def make(gm: GraphModule) -> list[Any]:
        missing = [name for name in placeholders(gm) if name not in values]
        if missing:
            raise KeyError(f"no value for graph inputs {missing}; have {sorted(values)}")
        return [values[n].clone() if isinstance(values[n], torch.Tensor) else values[n] for n in placeholders(gm)]
    return make


def ops(gm: GraphModule) -> list[str]:
    """The call_function targets in graph order, as 'aten.bmm.default', 'getitem', ..."""
    from mla_graph.passes.base import op_name
    return [op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def nodes(gm: GraphModule, target: Any) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# ---- paged batches, built by hand ----------------------------------------------------------------

def paged_batch(requests: list[tuple[int, int]], *, block_size: int, num_blocks: int, latent: int, rope: int,
                dtype: torch.dtype, seed: int = 0, nan_outside: bool = True) -> dict[str, torch.Tensor]:
    """requests: (new tokens, seq_len) each. Blocks handed out in reverse order (never block 0, the
    padding block); every cache slot outside a request's context holds NaN (or random data). The new
    tokens of each request are the last of its context; slot_mapping points at them."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for _, s in requests) + 1
    fill = float("nan") if nan_outside else 0.0
    latent_cache = torch.full((num_blocks, block_size, 1, latent), fill).to(dtype)
    rope_cache = torch.full((num_blocks, block_size, 1, rope), fill).to(dtype)
    if not nan_outside:
        latent_cache.normal_(generator=gen)
        rope_cache.normal_(generator=gen)
    table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    free = list(range(1, num_blocks))
    slots, starts = [], [0]
    for b, (new, s) in enumerate(requests):
        for j in range(-(-s // block_size)):
            table[b, j] = free.pop()
        for p in range(s):
            blk, off = int(table[b, p // block_size]), p % block_size
            latent_cache[blk, off, 0] = torch.randn(latent, generator=gen).to(dtype)
            rope_cache[blk, off, 0] = torch.randn(rope, generator=gen).to(dtype)
        slots += [int(table[b, p // block_size]) * block_size + p % block_size for p in range(s - new, s)]
        starts.append(starts[-1] + new)
    positions = torch.tensor([p for new, s in requests for p in range(s - new, s)], dtype=torch.int64)
    return dict(latent_cache=latent_cache, rope_cache=rope_cache, block_table=table,
                seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32),
                query_start_loc=torch.tensor(starts, dtype=torch.int32),
                slot_mapping=torch.tensor(slots, dtype=torch.int64), positions=positions)


def rope_rows(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """rope_cos / rope_sin graph inputs: [T, 1, 1, R], each half of the token's table row repeated
    (cos_sin [max_pos, R] holds cos in its first half, sin in its second)."""
    half = cos_sin.shape[-1] // 2
    rows = cos_sin[positions]
    cos, sin = rows[:, :half], rows[:, half:]
    return {"rope_cos": torch.cat([cos, cos], -1)[:, None, None, :].to(dtype),
            "rope_sin": torch.cat([sin, sin], -1)[:, None, None, :].to(dtype)}


def rope_table(max_pos: int, rope: int, seed: int = 1) -> torch.Tensor:
    """A cos/sin table [max_pos, R] from random angles (not the model's: any angles rotate)."""
    angles = torch.rand(max_pos, rope // 2, generator=torch.Generator().manual_seed(seed)) * 6.283
    return torch.cat([angles.cos(), angles.sin()], -1)
