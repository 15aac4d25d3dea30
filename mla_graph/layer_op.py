"""`mla::layer`: one whole MLAAttention call as one opaque op, so torch.compile can see layers.

Dynamo inlines module forwards into one flat graph; inside it an MLA layer would be dozens of
nodes with no boundary. Under torch.compile `MLAAttention.forward` calls `call_layer` instead,
which records a single `mla::layer` node. The "mla_graph" backend finds those nodes and runs
each through the layer's lowered module; any other backend just runs the op, whose kernel is
the eager layer.

The layer itself cannot be an op argument, so the node carries an int key into `_LAYERS`, a
weak registry every MLAAttention joins when it is made (or copied, or unpickled). The key is the
layer's id(): Dynamo evaluates id() of a module from outside the graph while tracing, bakes the int
into the graph and guards on the module's identity (ID_MATCH), so a compiled graph never runs with
another instance's key. (Not `assume_constant_result` over the module: Dynamo hands such a
function a module argument only from torch 2.13 on; torch 2.10 refuses it, "UnspecializedNNModuleVariable
is not a constant". id() is traced the same way by both.)
"""
from __future__ import annotations

import weakref

import torch

from .cache import PagedLatentCache
from .metadata import MLAMetadata

_lib: torch.library.Library | None = None


def ensure_layer_op() -> None:
    """Define `mla::layer` (its kernel: the eager layer; its fake: a [T, hidden] output), once.
    Called by call_layer and by the backend, not as a side effect of importing this module."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("mla", "FRAGMENT")
    lib.define(
        "layer(Tensor hidden_states, Tensor positions, Tensor(a!) latent_cache, Tensor(b!) rope_cache, "
        "Tensor slot_mapping, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, int layer_key, "
        "SymInt num_decodes, SymInt num_prefills) -> Tensor")
    lib.impl("layer", _layer_eager, "CompositeExplicitAutograd")
    torch.library.register_fake("mla::layer", _layer_fake, lib=lib)
    _lib = lib

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def is_layer_op(node: torch.fx.Node) -> bool:
    """An mla::layer call in a graph (Dynamo's, with the op as a packet or an overload)."""
    if node.op != "call_function":
        return False
    ensure_layer_op()
    return node.target in (torch.ops.mla.layer, torch.ops.mla.layer.default)


def register_layer(layer: torch.nn.Module) -> None:
    """Make `layer` reachable from its key (weakly: the registry never keeps a layer alive)."""
    _LAYERS[id(layer)] = layer


def layer_key(layer: torch.nn.Module) -> int:
    """The key `mla::layer` nodes use for `layer` (traced by Dynamo to a constant guarded on the
    layer's identity). Outside torch.compile it (re)registers the layer too; under it the layer must
    already be registered, as every MLAAttention is from construction."""
    if not torch.compiler.is_compiling():
        register_layer(layer)
    return id(layer)


def registered_layer(key: int) -> torch.nn.Module:
    layer = _LAYERS.get(key)
    if layer is None:
        raise LookupError(f"mla::layer refers to layer key {key}, which is not (or no longer) registered: "
                          f"the MLAAttention module it was compiled for has been freed")
    return layer


def call_layer(layer: torch.nn.Module, hidden_states: torch.Tensor, positions: torch.Tensor,
               kv_cache: PagedLatentCache, metadata: MLAMetadata) -> torch.Tensor:
    """What `MLAAttention.forward` does under torch.compile: one `mla::layer` node."""
    if metadata.num_decode_tokens != metadata.num_decodes:
        # the op carries num_decodes and num_prefills only (its kernel rebuilds one token per decode)
        raise NotImplementedError(
            f"multi-token decodes under torch.compile (num_decode_tokens {metadata.num_decode_tokens} for "
            f"{metadata.num_decodes} decode requests): the mla::layer op takes one token per decode; count "
            f"the multi-token requests as prefills (build_metadata's default decode_tokens=1), or call the "
            f"lowered module (lower(..., phases incl. 'multi_decode')) outside torch.compile")
    ensure_layer_op()
    return torch.ops.mla.layer(hidden_states, positions, kv_cache.latent, kv_cache.rope,
                               metadata.slot_mapping, metadata.block_table, metadata.seq_lens,
                               metadata.query_start_loc, layer_key(layer), metadata.num_decodes,
                               metadata.num_prefills)


def unflatten(latent_cache: torch.Tensor, rope_cache: torch.Tensor, slot_mapping: torch.Tensor,
              block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
              num_decodes: int, num_prefills: int) -> tuple[PagedLatentCache, MLAMetadata]:
    """The op's flat arguments back as the cache and metadata objects layers take."""
    metadata = MLAMetadata(slot_mapping, block_table, seq_lens, query_start_loc,
                           num_decodes=num_decodes, num_decode_tokens=num_decodes, num_prefills=num_prefills)
    return PagedLatentCache(latent_cache, rope_cache), metadata


def _layer_eager(hidden_states, positions, latent_cache, rope_cache, slot_mapping, block_table, seq_lens,
                 query_start_loc, layer_key, num_decodes, num_prefills):
    kv_cache, metadata = unflatten(latent_cache, rope_cache, slot_mapping, block_table, seq_lens,
                                   query_start_loc, num_decodes, num_prefills)
    return registered_layer(layer_key)(hidden_states, positions, kv_cache, metadata)


def _layer_fake(hidden_states, positions, latent_cache, rope_cache, slot_mapping, block_table, seq_lens,
                query_start_loc, layer_key, num_decodes, num_prefills):
    return torch.empty_like(hidden_states)   # o_proj maps back to hidden_size: [T, hidden]

