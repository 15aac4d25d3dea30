"""absorb_kv_weights: attention over decompressed K/V becomes attention in latent space."""
from __future__ import annotations

from functools import partial

import torch
from torch.fx import Graph, GraphModule, Node

from mla_graph.contract import graph_meta, maybe_meta

from .base import Invariant, PassResult, Violation, graph_pass
from .graph_utils import add_constant, first_user_position
from .mla_patterns import DECOMPRESSED, val
from .rewrite import Match, Rule, Skip, emit_traced, rewrite

aten, mla = torch.ops.aten, torch.ops.mla


def _latent_where_chosen(gm: GraphModule) -> list[Violation]:
    """Every attention the cost model chose to absorb attends in latent space (its values are the
    kv_lora_rank-wide latent): a pass run before this one that changes the pattern it matches would
    otherwise leave the decompressed form in place, silently."""
    meta = maybe_meta(gm)
    if meta is None or meta.config is None:
        return []
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not mla.attention.default:
            continue
        form = node.meta.get("mla_attention_form", meta.attention_form)
        if form == "absorbed" and val(node.args[2]).shape[-1] != meta.config.kv_lora_rank:
            out.append((node, f"the cost model chose 'absorbed' for {node.name} but it still attends over "
                              f"decompressed values (kv_b_proj not folded): a pass before absorb_kv_weights "
                              f"changed the pattern it matches"))
    return out


LATENT_WHERE_CHOSEN = Invariant("absorbed where the cost model chose it", _latent_where_chosen)


@graph_pass(ensures=[LATENT_WHERE_CHOSEN])
def absorb_kv_weights(gm: GraphModule) -> PassResult:
    """Fold kv_b_proj into the query and output (DeepSeek's weight absorption).

        lin = aten.linear(gather_paged(latent_cache, bt), kv_b_proj_weight)    # [B, S, N*(P+V)]
        k = cat(k_nope, expand(k_pe)); v = split(lin)[1]
        out = mla.attention(cat(q_nope, q_pe), k, v, qsl, seq_lens, scale)     # [T, N, V]
      ->
        ql = aten.bmm(q_nope^T, w_uk)                                           # [N, T, L]
        o = mla.attention(cat(ql^T, q_pe), cat(latent, k_pe)[B,S,1,L+R], latent[B,S,1,L], ...)
        out = aten.bmm(o^T, w_uv)^T                                             # [T, N, V]

    W_UK [N, P, L] and W_UV [N, L, V] are new tensors cut from kv_b_proj's weight once, here;
    the weight itself is not touched. Fires only where the cost model chose 'absorbed' (per node,
    else for the graph).
    How each is cut is recorded in graph_meta(gm).derived_constants as
    {buffer: (get_attr target of the source weight, function of that weight)}, so a layer of the
    same shape can reuse this graph with its own weights (mla_graph.model_lowering replays it).
    """
    return rewrite(gm, [ABSORB], dead_code=True)


def _chosen(m: Match) -> bool | Skip:
    gm = m.node.graph.owning_module
    form = m.node.meta.get("mla_attention_form", graph_meta(gm).attention_form or "absorbed")
    if form != "absorbed":
        return Skip(f"{m.node.name}: attention form is {form!r}: not absorbed")
    if m.w_kv_b.op != "get_attr":
        return Skip(f"{m.node.name}: kv_b_proj weight is not a constant; not absorbed")
    return True


def _absorbed(g: Graph, m: Match) -> Node:
    gm = g.owning_module
    weight = gm.get_parameter(m.w_kv_b.target)
    _, N, P = val(m.q_nope).shape
    cut_uk = partial(cut_w_uk, heads=N, nope_dim=P, v_dim=m.sizes[1])
    cut_uv = partial(cut_w_uv, heads=N, nope_dim=P, v_dim=m.sizes[1])
    anchor = first_user_position(gm)
    w_uk_node = add_constant(gm, f"{m.node.name}_w_uk", cut_uk(weight), anchor)
    w_uv_node = add_constant(gm, f"{m.node.name}_w_uv", cut_uv(weight), anchor)
    derived = graph_meta(gm).derived_constants
    derived[w_uk_node.target] = (m.w_kv_b.target, cut_uk)
    derived[w_uv_node.target] = (m.w_kv_b.target, cut_uv)
    return emit_traced(g, absorbed_attention, [m.q_nope, m.q_pe, m.latent_cache, m.rope_cache, m.block_table,
                                               w_uk_node, w_uv_node, m.query_start_loc, m.seq_lens, m.scale])


def absorbed_attention(q_nope, q_pe, latent_cache, rope_cache, block_table, w_uk, w_uv, query_start_loc, seq_lens,
                       scale):
    """Attention over the latent itself: W_UK folded into the query, W_UV applied after."""
    lat = mla.gather_paged.default(latent_cache, block_table)                   # [B, S, L]
    rope = mla.gather_paged.default(rope_cache, block_table)                    # [B, S, R]
    k = torch.cat([lat, rope], -1).unsqueeze(2)
    v = lat.unsqueeze(2)
    ql = torch.bmm(q_nope.permute(1, 0, 2), w_uk)                               # [N, T, L]
    q = torch.cat([ql.permute(1, 0, 2), q_pe], -1)
    o = mla.attention.default(q, k, v, query_start_loc, seq_lens, scale)
    return torch.bmm(o.permute(1, 0, 2), w_uv).permute(1, 0, 2)


ABSORB = Rule("absorb decompressed attention", DECOMPRESSED, emit=_absorbed, check=_chosen)


def cut_w_uk(kv_b_weight: torch.Tensor, *, heads: int, nope_dim: int, v_dim: int) -> torch.Tensor:
    """W_UK [N, P, L]: the key half of kv_b_proj's weight [N*(P+V), L], a new tensor."""
    with torch.no_grad():
        return kv_b_weight.detach().view(heads, nope_dim + v_dim, -1)[:, :nope_dim, :].clone()


def cut_w_uv(kv_b_weight: torch.Tensor, *, heads: int, nope_dim: int, v_dim: int) -> torch.Tensor:
    """W_UV [N, L, V]: the value half of kv_b_proj's weight, transposed, a new tensor."""
    with torch.no_grad():
        w = kv_b_weight.detach().view(heads, nope_dim + v_dim, -1)
        return w[:, nope_dim:, :].transpose(1, 2).contiguous()
