"""Targets: which passes run for which target, as data.

Each pipeline is a flat list, one line per pass, with why it sits where it does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from passes import eliminate_dead_code, no_namespace, remove_noop_views
from passes.absorb import absorb_kv_weights
from passes.attention_fallback import lower_paged_attention_to_aten
from passes.base import GraphPass, graph_pass
from passes.cost_model import choose_attention_form
from passes.cpu_lower import lower_paged_attention_to_cpu
from passes.npu_lower import (choose_npu_attention_form, fuse_kv_rmsnorm_rope_cache, lower_context_attention,
                              lower_paged_attention, lower_rms_norm, lower_rope)
from passes.page import page_latent_attention
from passes.multistream import insert_multistream_scopes
from passes.split_mixed import split_mixed_batch
from passes.torchair_lower import decompose_linear, lengths_as_tensors, fuse_kv_rmsnorm_rope_cache_functional, fuse_mla_prolog

from .npu import ensure_npu_ops


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    pipeline: Callable[[str], Sequence[GraphPass]]
    prepare: Callable[[], object] = field(default=lambda: None)
    # phase -> factory(gm, options dict, config, block_size) of a callable that runs that phase
    # (e.g. graph mode for decode); phases without one run the lowered graph eagerly
    runtimes: dict[str, Callable] = field(default_factory=dict)
    options: tuple[str, ...] = ()   # keys `lower(..., target_options=)` accepts
    # options dict -> parsed options; raises ValueError naming the option, value and what is allowed
    parse_options: Callable[[dict], object] | None = None


def _reference_pipeline(phase: str) -> list[GraphPass]:
    return [
        remove_noop_views,     # capture leaves reshapes to the shape a tensor already has
        eliminate_dead_code,   # last: earlier rewrites orphan the nodes they replaced
    ]


def _cpu_pipeline(phase: str) -> list[GraphPass]:
    return [
        remove_noop_views,              # capture leaves reshapes to the shape a tensor already has
        choose_attention_form,          # cost model per attention: absorbed for decode, decompressed for long prefill
        absorb_kv_weights,              # where absorbed won: W_UK / W_UV folded once, no per-step decompression
        page_latent_attention,          # latent attention reads each request's blocks (no gather of the context)
        lower_paged_attention_to_cpu,   # after page: the paged attention it lowers exists only then
        eliminate_dead_code,            # gathers and splits the rewrites orphaned
    ]


@graph_pass(ensures=[no_namespace("mla")])
def check_fully_lowered(gm):
    """No mla:: primitive is left for the NPU to run (checked by the manager, changes nothing)."""
    from passes import PassResult
    return PassResult(changed=False)


def _npu_pipeline(phase: str) -> list[GraphPass]:
    return [
        remove_noop_views,               # capture leaves reshapes to the shape a tensor already has
        split_mixed_batch,               # mixed: decodes and prefill chunks attend apart (FIA MLA: <= 16 query tokens)
        choose_npu_attention_form,       # cost model per attention; decompressed only where FIA TND admits it
        absorb_kv_weights,               # only where absorbed won; folds W_UK / W_UV once, here
        page_latent_attention,           # after absorb: the latent gathers it removes exist only then
        fuse_kv_rmsnorm_rope_cache,      # before the single-op lowerings: it consumes rms_norm and rope
        lower_rope,                      # the q rope left after the fusion
        lower_rms_norm,                  # q_a_layernorm (kv_a_layernorm went into the fusion)
        lower_paged_attention,           # one token per request -> FIA MLA BNSD, where its limits admit it
        lower_context_attention,         # decompressed attention -> FIA TND over the ragged context
        lower_paged_attention_to_aten,   # after the FIA lowerings: latent attention no FIA form admits
        eliminate_dead_code,             # gathers and splits the rewrites orphaned
        check_fully_lowered,             # last: nothing mla:: may reach the device
    ]


def _bucketed_decode(gm, options, config, block_size):
    from .torchair_runtime import BucketedDecode, TorchairOptions
    return BucketedDecode(gm, TorchairOptions.from_dict(options), config, block_size)


def _parse_torchair_options(options):
    from .torchair_runtime import TorchairOptions
    return TorchairOptions.from_dict(options)


def _torchair_option_names() -> tuple[str, ...]:
    import dataclasses
    from .torchair_runtime import TorchairOptions
    return tuple(f.name for f in dataclasses.fields(TorchairOptions))


def _torchair_pipeline(phase: str) -> list[GraphPass]:
    if phase != "decode":
        return _npu_pipeline(phase)   # graph mode is for decode; other batches run the eager kernels
    return _torchair_decode_passes()


def _torchair_multistream_pipeline(phase: str) -> list[GraphPass]:
    if phase != "decode":
        return _npu_pipeline(phase)
    return _torchair_decode_passes() + [
        insert_multistream_scopes,               # last: it reorders the finished graph into stream scopes
    ]


def _prepare_torchair():
    from .torchair_compat.air_ops import ensure_air_ops
    ensure_npu_ops()
    ensure_air_ops()


def _torchair_decode_passes() -> list[GraphPass]:
    return [
        remove_noop_views,                       # as for npu
        choose_npu_attention_form,               # decode: absorbed (the cost model decides)
        absorb_kv_weights,                       # W_UK / W_UV folded once
        page_latent_attention,                   # attention reads the paged cache
        fuse_mla_prolog,                         # whole prolog -> npu_mla_prolog_v3_functional, where its limits hold
        fuse_kv_rmsnorm_rope_cache_functional,   # otherwise: the functional (converter-backed) cache writer
        lower_rope,                              # q rope left when the prolog did not fuse
        lower_rms_norm,                          # likewise for a leftover norm
        lower_paged_attention,                   # FIA BNSD over the updated caches, where its limits admit it
        lower_paged_attention_to_aten,           # otherwise (fp32 models, dims FIA does not take): aten ops
        lengths_as_tensors,                      # after the FIA lowering: lengths as int64 device tensors (air::)
        decompose_linear,                        # GE has no aten.linear converter: mm + t
        eliminate_dead_code,
        check_fully_lowered,                     # no mla:: op may reach GE
    ]


TARGETS: dict[str, Target] = {
    "reference": Target("reference", "mla:: primitives run as plain PyTorch (the golden)",
                        _reference_pipeline),
    "npu": Target("npu", "eager torch_npu kernels (emulated with exact schemas where torch_npu is absent)",
                  _npu_pipeline, prepare=ensure_npu_ops),
    "torchair": Target("torchair", "decode as one static-shape graph of GE-convertible kernels per batch "
                       "bucket (torchair on Ascend; torch.compile stand-in elsewhere); other phases as npu",
                       _torchair_pipeline, prepare=_prepare_torchair,
                       runtimes={"decode": _bucketed_decode}, options=_torchair_option_names(),
                       parse_options=_parse_torchair_options),
    "torchair-multistream": Target("torchair-multistream", "torchair, with independent decode branches in a "
                                   "secondary-stream scope (npu_stream_switch / npu_wait_tensor)",
                                   _torchair_multistream_pipeline, prepare=_prepare_torchair,
                                   runtimes={"decode": _bucketed_decode}, options=_torchair_option_names(),
                                   parse_options=_parse_torchair_options),
    "cpu": Target("cpu", "absorbed / paged forms chosen per phase by the cost model; latent attention as "
                  "per-request GEMMs (mla_cpu::paged_attention), other mla:: primitives as PyTorch CPU code",
                  _cpu_pipeline),
}
