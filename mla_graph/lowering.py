"""lower(layer, target) -> LoweredMLA: capture each phase, run the target's pipeline, wrap it."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from mla_graph.passes import PassManager, PassRecord, PipelineReport
from mla_graph.passes.base import GraphPass
from mla_graph.passes.cost_model import Dims, batch_costs
from mla_graph.contract import graph_meta
from mla_graph.dumptool.render import FORMATS_ENV, parse_formats

from .attention import MLAAttention, check_call, check_values, checked_mode
from .cache import PADDING_BLOCK, PagedLatentCache
from .capture import ALL_PHASES, MULTI_DECODE, MULTI_MIXED, PHASES, capture
from .inputs import Call
from .runtime.binding import CallingConvention, StepMemo
from .metadata import MLAMetadata
from .targets import TARGETS, Target


FORMS = ("absorbed", "decompressed")


class LoweringError(RuntimeError):
    pass


class LoweredMLA(nn.Module):
    """Same call signature as MLAAttention; runs the lowered graph of the batch's phase.

    A decode-only batch runs the "decode" graph, a prefill-only batch the "prefill" graph, any
    other batch the "mixed" graph (which also serves the other two when they were not lowered).
    Decodes with several new tokens (speculative decoding) run the "multi_decode" graph (no
    prefills in the batch) or the "multi_mixed" graph (prefills too) where lowered; otherwise the
    "prefill" graph, which takes any request as it comes (the mixed graph's split assumes one token
    per decode).
    A target with `form_per_call` also has "<phase>:<form>", the phase in the other attention form:
    each call runs the one whose attention costs less for its own batch (cost_model.batch_costs over
    each prefill request's new tokens and context; a split batch's decodes are absorbed in both).
    """

    def __init__(self, layer: MLAAttention, target: Target, graphs: dict[str, GraphModule],
                 reports: dict[str, PipelineReport],
                 options: object | None = None, checked: bool | None = None) -> None:
        super().__init__()
        self.config = layer.config
        self.num_heads = layer.num_heads
        self.target = target
        self.graphs = nn.ModuleDict(graphs)
        # how each phase's graph is called (its signature, frozen now; its derived constants' recipes)
        self.conventions = {phase: CallingConvention.of(gm) for phase, gm in graphs.items()}
        self.reports = reports
        self._dtype = layer.dtype
        self.cos_sin = layer.cos_sin  # shared rope table (never copied), for per-call rope rows
        self.options = target.parse(options)   # the target's typed options (Target.parse), None without
        # the per-step inputs computed this step; the modules of one model share one (share_step_memo)
        self.step_memo = StepMemo()
        self.checked = checked   # value checks before each call; None: $MLA_GRAPH_CHECKED decides
        # fingerprints only where checked mode will compare them (they cost a float64 pass over the weight)
        self._derived = _derived_constants(layer, graphs, fingerprint=checked_mode(checked))
        # phase -> graph-mode runner (torchair decode), built over this module's own graphs
        self.runners = {phase: target.runtimes[phase](gm, self.options)
                        for phase, gm in graphs.items() if phase in target.runtimes}
        # phase -> {form: graph key} where a phase has a graph in each form; what ran, per (phase, form)
        self.forms: dict[str, dict[str, str]] = {}
        for key in graphs:
            if ":" in key:
                phase, form = key.split(":", 1)
                self.forms[phase] = {graph_meta(graphs[phase]).attention_form: phase, form: key}
        self.form_choices: collections.Counter = collections.Counter()
        self.graph_calls: collections.Counter = collections.Counter()   # graph key -> calls it ran

    @property
    def block_size(self) -> int:
        """Tokens per cache block the graphs were lowered for (kept once, in each graph's GraphMeta)."""
        return next(iter(self.conventions.values())).block_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer was lowered for (its weights' then)."""
        return self._dtype

    @property
    def phases(self) -> list[str]:
        return [key for key in self.graphs if ":" not in key]

    def graph_for(self, phase: str) -> GraphModule:
        return self.graphs[self._lowered_phase(phase)]

    def _lowered_phase(self, phase: str) -> str:
        """The lowered phase that serves a batch of `phase`."""
        if phase in self.graphs and ":" not in phase:
            return phase
        if phase in (MULTI_DECODE, MULTI_MIXED):
            if "prefill" in self.graphs:
                return "prefill"
            raise LoweringError(f"this {phase} batch has decode requests of several new tokens, which only the "
                                f"{phase!r} graph or the 'prefill' graph runs, but only {self.phases} were "
                                f"lowered; lower with phases including {phase!r} or 'prefill'")
        if "mixed" in self.graphs:
            return "mixed"
        raise LoweringError(f"this batch is a {phase} batch but only {self.phases} were lowered; "
                            f"lower with phases including {phase!r} or 'mixed'")

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor,
                kv_cache: PagedLatentCache, metadata: MLAMetadata, *,
                step_memo: StepMemo | None = None) -> torch.Tensor:
        """`step_memo`: the per-step inputs of the step this call is part of (default: this module's,
        which share_step_memo shares with the other layers of its model)."""
        check_call(self.config, self._dtype, hidden_states, positions, kv_cache, metadata)
        if kv_cache.block_size != self.block_size:
            raise ValueError(f"kv_cache has block_size {kv_cache.block_size} but this module was lowered "
                             f"for block_size {self.block_size}; lower again with block_size="
                             f"{kv_cache.block_size}")
        checked = checked_mode(self.checked)
        if checked:
            # graph-mode runners (torchair decode) write padded rows into the padding block
            reserved = PADDING_BLOCK if metadata.phase in self.runners else None
            check_values(self.config, positions, kv_cache, metadata, reserved)
        if hidden_states.shape[0] == 0:
            return hidden_states.new_zeros(0, self.config.hidden_size)
        self.refresh_derived(by_value=checked)
        lowered = self._lowered_phase(metadata.phase)
        if lowered in self.forms:
            lowered = self._form_for(lowered, metadata)
        call = Call(hidden_states, positions, kv_cache, metadata, self.cos_sin)
        runner = self.runners.get(metadata.phase)
        self.graph_calls[lowered] += 1
        with torch.no_grad():
            memo = step_memo or self.step_memo
            if runner is not None:
                return runner(call, memo)
            return self.conventions[lowered](call, memo)

    def _form_for(self, phase: str, metadata: MLAMetadata) -> str:
        """The graph of `phase` in the form whose attention costs less for this batch's prefill requests."""
        c = self.config
        dims = Dims(heads=self.num_heads, qk_nope=c.qk_nope_head_dim, rope=c.qk_rope_head_dim,
                    latent=c.kv_lora_rank, v=c.v_head_dim, dtype_bytes=self._dtype.itemsize)
        starts, lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
        requests = [(starts[b + 1] - starts[b], lens[b]) for b in range(metadata.num_decodes, len(lens))]
        costs = batch_costs(dims, [(new, seq) for new, seq in requests if new > 0])   # context: all keys seen
        form = min(costs, key=lambda f: costs[f].seconds)
        self.form_choices[(phase, form)] += 1
        return self.forms[phase][form]

    def refresh_derived(self, force: bool = False, by_value: bool = False) -> int:
        """Recut the weights passes derived at lowering time (W_UK/W_UV, the prolog's transposed
        weights) from their source weights, in place, so compiled graphs keep their addresses.
        Returns how many were recut.

        Without `force`, only those whose source was written since: in place through a tensor op
        (autograd's version counter: a few integer compares, done on every forward), or, with
        `by_value` (checked mode does it on every call), any write at all, `.data` writes included,
        seen as a change of the source's fingerprint (two float64 reductions over it). Writes
        through `.data` (`param.data.copy_`, the body of vLLM's default_weight_loader) leave the
        version as it was: outside checked mode, call with force=True after those (the vLLM plugin
        does, from its weight-loader hooks)."""
        refreshed = 0
        for derived in self._derived:
            stale = force or derived.source._version != derived.version
            if not stale and by_value:   # no baseline yet (lowered outside checked mode): recut once
                stale = derived.fingerprint is None or _fingerprint(derived.source) != derived.fingerprint
            if stale:
                with torch.no_grad():
                    getattr(derived.gm, derived.buffer).copy_(derived.derive(derived.source))
                derived.version = derived.source._version
                derived.fingerprint = (_fingerprint(derived.source)
                                       if by_value or derived.fingerprint is not None else None)
                refreshed += 1
        return refreshed


def share_step_memo(modules: Iterable[LoweredMLA]) -> None:
    """The layers of one model compute each per-step input (rope rows, host lengths) once per step:
    give them one StepMemo."""
    modules = list(modules)
    if modules:
        for module in modules[1:]:
            module.step_memo = modules[0].step_memo


def _fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    """Sum and position-weighted sum in float64: changes with any write short of an adversarial one."""
    with torch.no_grad():
        flat = weight.detach().reshape(-1).double()
        ramp = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
        return float(flat.sum()), float((flat * ramp).sum())


@dataclass
class DerivedWeight:
    """A constant a pass cut from a weight (graph_meta(gm).derived_constants), and how to recut it."""
    gm: GraphModule
    buffer: str                                          # its attribute on gm
    source: torch.Tensor                                 # the layer's weight it was cut from
    derive: Callable[[torch.Tensor], torch.Tensor]       # source -> value
    version: int                                         # source._version when last cut
    fingerprint: tuple[float, float] | None              # _fingerprint(source) when last cut (checked mode)


def _derived_constants(layer: MLAAttention, graphs: dict[str, GraphModule], fingerprint: bool) -> list[DerivedWeight]:
    out, prints = [], {}
    for gm in graphs.values():
        for buffer, recipe in graph_meta(gm).derived_constants.items():
            if recipe is not None:
                source = layer.get_parameter(recipe[0])
                if fingerprint and recipe[0] not in prints:   # once per source weight
                    prints[recipe[0]] = _fingerprint(source)
                out.append(DerivedWeight(gm, buffer, source, recipe[1], source._version, prints.get(recipe[0])))
    return out


# stages after which no pass rewrites the graph (cleanup and checks): a plain list of user passes runs
# before them
FINAL_STAGES = ("finish", "check-lowered", "multistream")


def _with_passes(spec: Target, passes: Mapping[str, Sequence[GraphPass]] | Sequence[GraphPass] | None) -> Target:
    if passes is None:
        return spec
    if isinstance(passes, Mapping):
        return spec.extended(passes)
    if callable(passes) or isinstance(passes, (str, bytes)) or not all(callable(p) for p in passes):
        raise ValueError(f"passes must be a list of passes (GraphModule -> PassResult) or a dict "
                         f"{{stage: [pass, ...]}}, got {passes!r}")
    after = {}
    for phase in ALL_PHASES:
        stages = [s for s in spec.stages(phase) if s not in FINAL_STAGES]
        if stages:
            after[stages[-1]] = list(passes)
    return spec.extended(after)


def lower(layer: MLAAttention, target: str = "reference", phases: Iterable[str] = PHASES, *,
          block_size: int = 128, dump_dir: str | os.PathLike | None = None, verify: bool = True,
          on_pass: Callable[[str, PassRecord], None] | None = None,
          target_options: dict | object | None = None, dump_formats: Iterable[str] | None = None,
          checked: bool | None = None,
          passes: Mapping[str, Sequence[GraphPass]] | Sequence[GraphPass] | None = None) -> LoweredMLA:
    """Lower `layer` for `target`. Never mutates `layer` or its weights; derived weights are new
    tensors held by the lowered graphs. With `dump_dir`, writes `<dump_dir>/<phase>/NN-<pass>.*`.
    `dump_dir` defaults to $MLA_GRAPH_DUMP when that is set; `dump_formats` (txt, dot, svg, html) to
    $MLA_GRAPH_DUMP_FORMAT, else txt. With html, `<dump_dir>/report.html` is written too.

    `target_options`: the target's options as a dict (torchair's graph_batch_sizes, ...), or the
    typed object `TARGETS[target].parse(dict)` made of one (parsed once, used as it is).

    `checked=True` checks the values of each call's metadata and positions before anything is
    written (a device sync per call; see check_values); False never; None (default): when
    $MLA_GRAPH_CHECKED is set to 1/true/yes/on. Shape, dtype and count checks always run.

    `passes` adds your own passes (docs/writing-a-pass.md): `{stage: [pass, ...]}` runs them right
    after that stage of the target's pipeline (mla_graph.targets.STAGES; `Target.stages` gives a
    target's per phase), a plain list right after the target's last rewriting stage, before the
    final dead-code elimination and checks. The verifier and the stage invariants judge them as
    they judge ours."""
    if checked not in (None, True, False):
        raise ValueError(f"checked must be True, False or None ($MLA_GRAPH_CHECKED decides), got {checked!r}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    phases = list(dict.fromkeys(phases))
    bad = [p for p in phases if p not in ALL_PHASES]
    if bad or not phases:
        raise ValueError(f"unknown phase(s) {bad or phases!r}; expected a non-empty subset of "
                         f"{', '.join(ALL_PHASES)}")
    if dump_dir is None and os.environ.get("MLA_GRAPH_DUMP"):
        dump_dir = os.environ["MLA_GRAPH_DUMP"]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (tokens per cache block), got {block_size!r}")
    spec = _with_passes(TARGETS[target], passes)
    options = spec.parse(target_options)   # bad values fail here, before any work
    spec.prepare()
    graphs, reports = {}, {}

    def lower_phase(phase: str, key: str, forced_form: str | None = None) -> GraphModule:
        """Capture `phase`, run the pipeline (the attention form forced, for a second graph), keep it under `key`."""
        gm = capture(layer, phase, block_size=block_size)
        graph_meta(gm).forced_attention_form = forced_form
        manager = PassManager(
            spec.pipeline(phase),
            dump_dir=os.path.join(os.fspath(dump_dir), key.replace(":", "-")) if dump_dir is not None else None,
            verify=verify,
            formats=dump_formats,
            on_pass=(lambda record: on_pass(key, record)) if on_pass else None,
        )
        reports[key] = manager.run(gm)
        graph_meta(gm).target = target
        graphs[key] = gm
        return gm

    for phase in phases:
        chosen = graph_meta(lower_phase(phase, phase)).attention_form
        if spec.form_per_call and phase not in ("decode", MULTI_DECODE) and chosen in FORMS:
            other = next(f for f in FORMS if f != chosen)
            lower_phase(phase, f"{phase}:{other}", forced_form=other)
    if dump_dir is not None and "html" in parse_formats(dump_formats or os.environ.get(FORMATS_ENV) or "txt"):
        from .dumptool import write_report
        write_report(dump_dir)
    return LoweredMLA(layer, spec, graphs, reports, options, checked)
