"""insert_multistream_scopes: run an independent branch of the decode DAG on a second stream."""
from __future__ import annotations

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .base import VIEW_OPS, PassResult, graph_pass
from .graph_utils import call
from .torchair_lower import WRITEBACK_ORDER

aten = torch.ops.aten
STREAM_KEYS = ["_user_stream_label", "_user_stream_priority"]   # what torchair.scope.npu_stream_switch sets


def _is_attention(node: Node) -> bool:
    return node.op == "call_function" and "fused_infer_attention_score" in str(node.target)


def _compute(node: Node) -> bool:
    return node.op == "call_function"


@graph_pass(ensures=[WRITEBACK_ORDER])
def insert_multistream_scopes(gm: GraphModule) -> PassResult:
    """Split the attention's producers into branches that share only graph inputs and weights
    (weakly connected components of its ancestor DAG); the branch with fewer ops moves, as one
    contiguous block, into a secondary-stream scope, and the attention waits for it.

        mm_1 = aten.mm(h, t(kv_a)); kv = npu.npu_kv_rmsnorm_rope_cache(..)   # independent of q
        ... q branch ...; o = npu.npu_fused_infer_attention_score(q, kv[1], ..)
      ->
        air.scope_enter(['_user_stream_label', '_user_stream_priority'], ['mla_secondary', '0'])
        mm_1 = ...; kv = ...
        air.scope_exit()
        ... q branch ...; q = air.wait_tensor(q, kv[1]); o = npu.npu_fused_infer_attention_score(q, ...)

    A graph whose attention has one producer chain (e.g. the fused mla prolog) is left alone.
    """
    result = PassResult(changed=False)
    if not hasattr(torch.ops, "air") or not hasattr(torch.ops.air, "scope_enter"):
        raise RuntimeError("torch.ops.air scope ops are not registered; call "
                           "mla_graph.npu.air_ops.ensure_air_ops() first")
    g = gm.graph
    dag = nx.DiGraph()
    for node in g.nodes:
        if _compute(node):
            dag.add_node(node)
            dag.add_edges_from((src, node) for src in node.all_input_nodes if _compute(src))
    for attn in [n for n in g.nodes if _is_attention(n)]:
        producers = dag.subgraph(nx.ancestors(dag, attn))
        branches = sorted((sorted(c, key=_order(g)) for c in nx.weakly_connected_components(producers)), key=len)
        if len(branches) < 2:
            result.notes.append(f"{attn.name}: one producer chain; nothing to overlap")
            continue
        side = branches[0]
        moved = set(side)
        # the scope opens before the first op that stays: the branch may itself start the graph
        first = next(n for n in g.nodes if _compute(n) and n not in moved)
        with g.inserting_before(first):
            call(g, torch.ops.air.scope_enter.default, STREAM_KEYS, ["mla_secondary", "0"])
        for node in side:
            first.prepend(node)
        with g.inserting_before(first):
            call(g, torch.ops.air.scope_exit.default)
        kernels = {}  # one wait per kernel whose results leave the branch (views of it need none)
        for node in side:
            if any(u not in side for u in node.users):
                kernels.setdefault(_kernel_of(node), node)
        query = attn.args[0]
        with g.inserting_before(attn):
            for dep in kernels.values():
                query = call(g, torch.ops.air.wait_tensor.default, query, dep)
        attn.args = (query, *attn.args[1:])
        result.count("secondary-stream branch")
        result.notes.append(f"{attn.name}: {len(side)} ops on 'mla_secondary': {[n.name for n in side]}")
    return result


def _kernel_of(node: Node) -> Node:
    while node.op == "call_function" and node.target in VIEW_OPS and node.args:
        node = node.args[0]
    return node


def _order(g):
    index = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: index[n]
