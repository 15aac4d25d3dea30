"""split_mixed_batch: a mixed batch's attention runs as a decode part and a prefill part (multi_mixed:
decodes of 1..16 tokens, the decode part's token count its own size).

FIA's MLA mode (query_rope/key_rope) admits 1..16 query tokens per request, so a prefill chunk
cannot ride along with the decodes in one MLA call (vllm-ascend keeps that mode to decode and
MTP). As vllm-ascend does, the batch is cut where the decodes end (vLLM orders them first): the
decode requests get their own attention (absorbed, then FIA BNSD) and the prefill chunks theirs
(decompressed FIA TND where admitted). Everything else in the layer is per token and stays whole.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from mla_graph.contract import BLOCK_TABLE, PARTS, QUERY_START_LOC, SEQ_LENS, SLOT_MAPPING, graph_meta

from .base import PassResult, graph_pass
from .graph_utils import add_input, call, fake_empty, fake_run, new_symbol
from .mla_patterns import DECOMPRESSED, val
from .rewrite import Match, Rule, rewrite

aten = torch.ops.aten
# A part's graph inputs (GraphInput.of_part) are read from that part of the call's metadata
# (mla_graph.runtime.binding.bind); "decode" is the first num_decodes requests.


@graph_pass()
def split_mixed_batch(gm: GraphModule) -> PassResult:
    """Mixed phase only: one attention over all requests -> one per part, outputs concatenated.

        o = mla.attention(cat(q_nope, q_pe), k(gather(latent, bt)), v(...), qsl, seq_lens, s)   # [T, N, V]
      ->
        o_d = mla.attention(cat(q_nope[:Bd], q_pe[:Bd]), k(gather(latent, decode_block_table)), ...,
                            decode_query_start_loc, decode_seq_lens, s)
        o_p = mla.attention(cat(q_nope[Bd:], q_pe[Bd:]), k(gather(latent, prefill_block_table)), ...,
                            prefill_query_start_loc, prefill_seq_lens, s)
        o = cat([o_d, o_p])
    Each part's attention is marked node.meta["mla_batch_part"] for the passes after it.
    """
    result = PassResult(changed=False)
    phase = graph_meta(gm).phase
    if phase not in ("mixed", "multi_mixed"):
        result.notes.append(f"phase {phase!r}: only mixed batches are split")
        return result
    return rewrite(gm, [SPLIT], dead_code=True)


def _split(g: Graph, m: Match) -> Node:
    gm, node = g.owning_module, m.node
    decodes = new_symbol(gm, "num_decodes", 2)
    inputs = {part: _part_inputs(gm, part, m, decodes) for part in PARTS}
    # sizes as graph values (sym_size), never baked-in symbols: one token per decode request, or (multi_mixed)
    # the decode part's own token count, the length of its slot_mapping
    if graph_meta(gm).phase == "multi_mixed":
        slots = add_input(gm, SLOT_MAPPING, fake_empty(gm, new_symbol(gm, "num_decode_tokens", 5),
                                                       dtype=torch.int64), "decode")
        split = call(g, aten.sym_size.int, slots, 0)
    else:
        split = call(g, aten.sym_size.int, inputs["decode"]["seq_lens"], 0)
    end = call(g, aten.sym_size.int, m.q_nope, 0)
    outs = []
    for part, (start, stop) in zip(PARTS, ((0, split), (split, end))):
        own = inputs[part]
        subst = {m.q_nope: call(g, aten.slice.Tensor, m.q_nope, 0, start, stop),
                 m.q_pe: call(g, aten.slice.Tensor, m.q_pe, 0, start, stop),
                 m.block_table: own["block_table"], m.query_start_loc: own["query_start_loc"],
                 m.seq_lens: own["seq_lens"]}
        attention = clone_with(g, node, subst)
        attention.meta["mla_batch_part"] = part
        outs.append(attention)
    return call(g, aten.cat.default, outs)


SPLIT = Rule("split mixed attention", DECOMPRESSED, emit=_split, check=lambda m: "mla_batch_part" not in m.node.meta)


def _part_inputs(gm: GraphModule, part: str, m, decodes: torch.SymInt) -> dict[str, Node]:
    """The part's block table, seq_lens and query_start_loc (rebased to 0) as graph inputs."""
    B = val(m.seq_lens).shape[0]
    rows = decodes if part == "decode" else B - decodes
    bt = val(m.block_table)
    return {"block_table": add_input(gm, BLOCK_TABLE, fake_empty(gm, rows, bt.shape[1], dtype=bt.dtype), part),
            "seq_lens": add_input(gm, SEQ_LENS, fake_empty(gm, rows, dtype=val(m.seq_lens).dtype), part),
            "query_start_loc": add_input(gm, QUERY_START_LOC, fake_empty(gm, rows + 1, dtype=val(m.query_start_loc).dtype),
                                         part)}


def clone_with(g: Graph, root: Node, subst: dict[Node, Node]) -> Node:
    """A copy of `root` and of every node between it and the keys of `subst` (its inputs replaced by
    their values), inserted at the current insertion point; nodes that reach no key are shared."""
    cone, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node in cone or node in subst:
            continue
        cone.add(node)
        stack.extend(node.all_input_nodes)
    env = dict(subst)
    for node in [n for n in g.nodes if n in cone]:   # graph order: inputs before users
        if any(arg in env for arg in node.all_input_nodes):
            copy = g.node_copy(node, lambda arg: env.get(arg, arg))
            copy.meta = {k: v for k, v in node.meta.items() if k not in ("val", "mla_pass")}
            copy.meta["val"] = fake_run(copy.target, copy.args, copy.kwargs)
            env[node] = copy
    return env[root]
