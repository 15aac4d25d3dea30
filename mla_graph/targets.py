"""Targets: which passes run for which target and phase, as data.

A pipeline is a sequence of named stages (STAGES), each a flat list, one line per pass, with why it
sits where it does. `pipeline(target, phase)` gives the passes; `Target.extended` adds user passes
after named stages (what `lower(..., passes=)` does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mla_graph.passes import eliminate_dead_code, no_namespace, remove_noop_views
from mla_graph.passes.absorb import absorb_kv_weights
from mla_graph.passes.attention_fallback import lower_paged_attention_to_aten
from mla_graph.passes.base import GraphPass, graph_pass
from mla_graph.passes.cost_model import choose_attention_form
from mla_graph.passes.cpu_lower import lower_attention_to_cpu, lower_paged_attention_to_cpu
from mla_graph.passes.npu_lower import (choose_npu_attention_form, fuse_kv_rmsnorm_rope_cache, lower_context_attention,
                              lower_paged_attention, lower_rms_norm, lower_rope)
from mla_graph.passes.page import page_latent_attention
from mla_graph.passes.multistream import insert_multistream_scopes
from mla_graph.passes.split_mixed import split_mixed_batch
from mla_graph.passes.torchair_lower import (WRITEBACK_ORDER, decompose_linear, fuse_kv_rmsnorm_rope_cache_functional,
                                   fuse_mla_prolog, lengths_as_tensors)

from .npu import ensure_npu_ops
from .runtime.graph_mode import BucketedDecode, BucketedMultiDecode, TorchairOptions


# Stages: named, ordered groups of passes. A target's pipeline for a phase is a sequence of stages
# (Target.stages); each stage's list says why every pass sits where it does. Users add passes after
# a stage by name (lower(..., passes={stage: [...]}) or Target.extended).
@graph_pass(ensures=[no_namespace("mla"), WRITEBACK_ORDER])
def check_fully_lowered(gm):
    """No mla:: primitive is left for the NPU to run, and functional cache writes are still read and
    copied back in order (checked by the manager after every pass, a user's included; changes nothing)."""
    from mla_graph.passes import PassResult
    return PassResult(changed=False)


STAGES: dict[str, tuple[GraphPass, ...]] = {
    "tidy": (
        remove_noop_views,                       # capture leaves reshapes to the shape a tensor already has
    ),
    "split-mixed": (
        split_mixed_batch,                       # mixed: decodes and prefill chunks attend apart (FIA MLA: <= 16 query
                                                 # tokens; cpu: each part gets its own form)
    ),
    "choose-form": (
        choose_attention_form,                   # cost model per attention: absorbed for decode, decompressed for long prefill
    ),
    "choose-npu-form": (
        choose_npu_attention_form,               # cost model per attention; decompressed only where FIA TND admits it
    ),
    "absorb-page": (
        absorb_kv_weights,                       # only where absorbed won; folds W_UK / W_UV once, here
        page_latent_attention,                   # after absorb: the latent gathers it removes exist only then
    ),
    "cpu-kernels": (
        lower_paged_attention_to_cpu,            # after page: the paged attention it lowers exists only then
        lower_attention_to_cpu,                  # after absorb: the decompressed attention the cost model kept
    ),
    "npu-kernels": (
        fuse_kv_rmsnorm_rope_cache,              # before the single-op lowerings: it consumes rms_norm and rope
        lower_rope,                              # the q rope left after the fusion
        lower_rms_norm,                          # q_a_layernorm (kv_a_layernorm went into the fusion)
        lower_paged_attention,                   # one token per request -> FIA MLA BNSD, where its limits admit it
        lower_context_attention,                 # decompressed attention -> FIA TND over the ragged context
        lower_paged_attention_to_aten,           # after the FIA lowerings: latent attention no FIA form admits
    ),
    "torchair-kernels": (
        fuse_mla_prolog,                         # whole prolog -> npu_mla_prolog_v3_functional, where its limits hold
        fuse_kv_rmsnorm_rope_cache_functional,   # otherwise: the functional (converter-backed) cache writer
        lower_rope,                              # q rope left when the prolog did not fuse
        lower_rms_norm,                          # likewise for a leftover norm
        lower_paged_attention,                   # FIA BNSD over the updated caches, where its limits admit it
        lower_paged_attention_to_aten,           # otherwise (fp32 models, dims FIA does not take): aten ops
        lengths_as_tensors,                      # after the FIA lowering: lengths as int64 device tensors (air::)
        decompose_linear,                        # GE has no aten.linear converter: mm + t
    ),
    "finish": (
        eliminate_dead_code,                     # gathers and splits the rewrites orphaned
    ),
    "check-lowered": (
        check_fully_lowered,                     # last: no mla:: op may reach the device (or GE)
    ),
    "multistream": (
        insert_multistream_scopes,               # last: it reorders the finished graph into stream scopes
    ),
}


def _stages_fixed(*names: str) -> Callable[[str], tuple[str, ...]]:
    return lambda phase: names


_NPU = ("tidy", "split-mixed", "choose-npu-form", "absorb-page", "npu-kernels", "finish", "check-lowered")
_TORCHAIR_DECODE = ("tidy", "choose-npu-form", "absorb-page", "torchair-kernels", "finish", "check-lowered")


_GRAPH_MODE_PHASES = ("decode", "multi_decode")


def _torchair_stages(phase: str) -> tuple[str, ...]:
    return _TORCHAIR_DECODE if phase in _GRAPH_MODE_PHASES else _NPU   # graph mode is for decodes; other batches eager


def _torchair_multistream_stages(phase: str) -> tuple[str, ...]:
    return _TORCHAIR_DECODE + ("multistream",) if phase in _GRAPH_MODE_PHASES else _NPU


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    stages: Callable[[str], Sequence[str]]          # phase -> names of STAGES, in order
    prepare: Callable[[], object] = field(default=lambda: None)
    # phase -> factory(gm, parsed options) of a callable that runs that phase
    # (e.g. graph mode for decode); phases without one run the lowered graph eagerly
    runtimes: dict[str, Callable] = field(default_factory=dict)
    options: tuple[str, ...] = ()   # keys `lower(..., target_options=)` accepts
    # prefill and mixed phases get a second graph in the other attention form, and each call runs the
    # one the cost model prefers for the batch it is given (needs the lengths on the host: CPU targets)
    form_per_call: bool = False
    # options dict -> the typed options object (options_type); raises ValueError naming the option,
    # value and what is allowed. Called by Target.parse only.
    parse_options: Callable[[dict], object] | None = None
    options_type: type | None = None
    # user passes: stage name -> passes run right after that stage (Target.extended)
    extra: tuple[tuple[str, tuple[GraphPass, ...]], ...] = ()

    def parse(self, given: Mapping[str, Any] | object | None, where: str = "target_options") -> object | None:
        """The target's options as its typed object (None for a target without options): the one place
        they are parsed. lower() and the compile backend call it; what it returns travels to the
        runtimes, and an object it returned passes through unchanged (the backend parses once, then
        lowers each layer with the result)."""
        if self.options_type is not None and isinstance(given, self.options_type):
            return given
        if given is not None and not isinstance(given, Mapping):
            raise ValueError(f"{where} must be a dict of option name -> value, got {given!r}")
        unknown = sorted(set(given or {}) - set(self.options))
        if unknown:
            raise ValueError(f"unknown target option(s) {unknown} for target {self.name!r}; valid: "
                             f"{', '.join(self.options) or 'none'}")
        return self.parse_options(dict(given or {})) if self.parse_options is not None else None

    def pipeline(self, phase: str) -> list[GraphPass]:
        """The passes for `phase`: each stage's passes, then any passes added after it."""
        added = dict(self.extra)
        out: list[GraphPass] = []
        for stage in self.stages(phase):
            out += STAGES[stage]
            out += added.get(stage, ())
        return out

    def extended(self, after: Mapping[str, Sequence[GraphPass]], name: str | None = None) -> "Target":
        """This target with user passes run after named stages ({stage: [pass, ...]}). A stage must
        be one of this target's (for some phase); passes after a stage a phase lacks do not run there."""
        known = [s for s in STAGES if any(s in self.stages(p) for p in ("prefill", "decode", "mixed", "multi_decode", "multi_mixed"))]
        if not isinstance(after, Mapping):
            raise ValueError(f"passes must map a stage name to a list of passes, e.g. {{'finish': [my_pass]}}; "
                             f"got {type(after).__name__}")
        for stage, passes in after.items():
            if stage not in known:
                raise ValueError(f"unknown stage {stage!r} for target {self.name!r}; its stages: {', '.join(known)}")
            if callable(passes) or not all(callable(p) for p in passes):
                raise ValueError(f"passes after stage {stage!r} must be a list of passes (GraphModule -> "
                                 f"PassResult), got {passes!r}")
        merged = dict(self.extra)
        for stage, passes in after.items():
            merged[stage] = tuple(merged.get(stage, ())) + tuple(passes)
        return dataclasses.replace(self, name=name or self.name, extra=tuple(merged.items()))


def pipeline(target: str, phase: str) -> list[GraphPass]:
    """The passes `lower(layer, target)` runs for `phase`, in order."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[target].pipeline(phase)


_TORCHAIR_OPTIONS = dict(runtimes={"decode": BucketedDecode, "multi_decode": BucketedMultiDecode},
                         options=tuple(f.name for f in dataclasses.fields(TorchairOptions)),
                         parse_options=TorchairOptions.from_dict, options_type=TorchairOptions)


def _prepare_torchair():
    from .npu.air_ops import ensure_air_ops
    ensure_npu_ops()
    ensure_air_ops()


TARGETS: dict[str, Target] = {
    "reference": Target("reference", "mla:: primitives run as plain PyTorch (the golden)",
                        _stages_fixed("tidy", "finish")),
    "npu": Target("npu", "eager torch_npu kernels (emulated with exact schemas where torch_npu is absent)",
                  _stages_fixed(*_NPU), prepare=ensure_npu_ops),
    "torchair": Target("torchair", "decode as one static-shape graph of GE-convertible kernels per batch "
                       "bucket (multi-token decodes: per batch and tokens-per-request bucket; torchair on Ascend; "
                       "torch.compile stand-in elsewhere); other phases as npu",
                       _torchair_stages, prepare=_prepare_torchair, **_TORCHAIR_OPTIONS),
    "torchair-multistream": Target("torchair-multistream", "torchair, with independent decode branches in a "
                                   "secondary-stream scope (npu_stream_switch / npu_wait_tensor)",
                                   _torchair_multistream_stages, prepare=_prepare_torchair, **_TORCHAIR_OPTIONS),
    "cpu": Target("cpu", "mixed batches split into decodes and prefill chunks; decodes absorbed, prompts in the "
                  "form the cost model prefers for each call's batch (both graphs lowered); latent attention as per-request GEMMs "
                  "(mla_cpu::paged_attention), decompressed attention in causal row blocks (mla_cpu::attention), "
                  "other mla:: primitives as PyTorch CPU code",
                  _stages_fixed("tidy", "split-mixed", "choose-form", "absorb-page", "cpu-kernels", "finish"),
                  form_per_call=True),
}
