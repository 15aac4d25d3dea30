"""lower_layers: lower a model's MLA layers, each distinct shape once, the rest by re-binding.

A model has many MLA layers of one shape (DeepSeek-V3: 61). Capture and the pass pipeline depend
only on (config, dtype, heads per rank, target, phases, block_size), not on the weights' values, so
the first layer of each shape is lowered and every further layer gets a copy of its lowered graphs
whose get_attr nodes read that layer's own tensors (no weight is copied). Constants a pass derived
from a weight (absorb's W_UK / W_UV) are cut again from the layer's own weight, following the recipe
the pass left in graph_meta(gm).derived_constants:

    {buffer name: (get_attr target of the source weight, fn(weight) -> constant)}
    {buffer name: None}            a constant that does not depend on the weights (shared)

A graph holding a constant with no recipe cannot be re-bound safely; such a shape is lowered
layer by layer (`LayerLowering.reused` says which happened).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule

from mla_graph.contract import graph_meta
from mla_graph.passes.verifier import PassVerificationError, verify_attrs

from .attention import MLAAttention
from .capture import PHASES
from .lowering import LoweredMLA, lower, share_step_memo
from .targets import TARGETS


@dataclass
class LayerLowering:
    """What lower_layers did: one entry per distinct layer shape, in first-seen order."""

    key: tuple
    layers: list[int] = field(default_factory=list)   # indices into the input list
    reused: bool = True                                 # False: each layer lowered on its own
    reason: str = ""                                    # why not reused


def shape_key(layer: MLAAttention, target: str, phases: Sequence[str], block_size: int) -> tuple:
    """Everything capture and the pipelines depend on: equal keys give equal lowered graphs."""
    return (layer.config, layer.dtype, layer.num_heads, target, tuple(phases), block_size)


def lower_layers(layers: Iterable[MLAAttention], target: str = "reference", phases: Iterable[str] = PHASES, *,
                 block_size: int = 128, verify: bool = True, dump_dir: str | os.PathLike | None = None,
                 summary: list[LayerLowering] | None = None,
                 target_options: dict | None = None) -> list[LoweredMLA]:
    """One LoweredMLA per layer, as `lower(layer, ...)` would give, lowering each shape once.

    `dump_dir` dumps the passes of each lowered shape (under `<dump_dir>/shape<i>/`). Pass a list as
    `summary` to receive one LayerLowering per distinct shape. `target_options` as for `lower`
    (e.g. torchair's graph_batch_sizes), the same for every layer.
    """
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, MLAAttention):
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}; lower_layers expects MLAAttention layers")
    phases = list(dict.fromkeys(phases))
    if target in TARGETS:   # parsed once for every layer (lower() says what is wrong with an unknown target)
        target_options = TARGETS[target].parse(target_options)
    groups: dict[tuple, LayerLowering] = {}
    for i, layer in enumerate(layers):
        key = shape_key(layer, target, phases, block_size)
        groups.setdefault(key, LayerLowering(key)).layers.append(i)
    out: list[LoweredMLA | None] = [None] * len(layers)
    for n, group in enumerate(groups.values()):
        first = group.layers[0]
        shape_dump = None if dump_dir is None else os.path.join(os.fspath(dump_dir), f"shape{n}")
        template = lower(layers[first], target, phases, block_size=block_size, verify=verify, dump_dir=shape_dump,
                         target_options=target_options)
        out[first] = template
        group.reason = _why_not_rebindable(template, set(_layer_tensors(layers[first])))
        group.reused = not group.reason
        # the layers' derived weights are cut by worker threads (tensor copies release the GIL) while
        # this thread copies the graphs
        cuts = {i: _cut_in_background(template, _layer_tensors(layers[i])) for i in group.layers[1:]} \
            if group.reused else {}
        try:
            for i in group.layers[1:]:
                out[i] = (rebind(template, layers[i], verify=verify, derived=cuts[i].result()) if group.reused
                          else lower(layers[i], target, phases, block_size=block_size, verify=verify,
                                     target_options=target_options))
        finally:
            for future in cuts.values():    # after a failure: cuts not started yet are not made
                future.cancel()
    if summary is not None:
        summary.extend(groups.values())
    share_step_memo(out)   # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _cutter() -> ThreadPoolExecutor:
    global _CUTTER
    if _CUTTER is None:
        # two: the transposing copies run one thread each, and every worker thread that reaches a
        # parallel copy brings its own intra-op team
        _CUTTER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mla-cut")
    return _CUTTER


_CUTTER: ThreadPoolExecutor | None = None


def _forget_cutter() -> None:
    global _CUTTER
    _CUTTER = None      # a forked child has none of the parent's worker threads: it starts its own


os.register_at_fork(after_in_child=_forget_cutter)


def _cut_in_background(template: LoweredMLA, own: dict[str, torch.Tensor]) -> Future:
    """derived_weights on a worker, under the caller's grad and inference modes (they are per thread)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def cut() -> dict[tuple, torch.Tensor]:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return derived_weights(template, own)
    return _cutter().submit(cut)


def derived_weights(template: LoweredMLA, own: dict[str, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """Every constant the template's passes derived from a weight, cut from `own`'s weights, keyed
    by (source weight, recipe): W_UK of the decode graph serves mixed too."""
    out: dict[tuple, torch.Tensor] = {}
    for gm in template.graphs.values():
        read = set(_get_attr_targets(gm))
        for target, recipe in graph_meta(gm).derived_constants.items():
            if recipe is not None and target in read and target not in own:
                source, derive = recipe
                key = (source, _recipe_key(derive))
                if key not in out:
                    out[key] = derive(own[source])
    return out


def rebind(template: LoweredMLA, layer: MLAAttention, *, verify: bool = True,
           derived: dict[tuple, torch.Tensor] | None = None) -> LoweredMLA:
    """`template`'s lowered graphs reading `layer`'s tensors; derived constants recomputed from them.

    The graphs are the template's, node for node, so the full verifier (which the template passed)
    is not run again; with `verify`, what re-binding can break is: every tensor a graph reads
    (the layer's own and each recut constant) has the shape and dtype its node records."""
    if (layer.config, layer.dtype, layer.num_heads) != (template.config, template._dtype, template.num_heads):
        raise ValueError(f"cannot rebind a lowering of {template.config.name} ({template._dtype}, "
                         f"{template.num_heads} heads) to a layer of {layer.config.name} ({layer.dtype}, "
                         f"{layer.num_heads} heads); lower that layer on its own")
    own = _layer_tensors(layer)
    reason = _why_not_rebindable(template, set(own))
    if reason:
        raise ValueError(f"the lowering cannot be re-bound to another layer: {reason}")
    derived_cache = derived if derived is not None else derived_weights(template, own)
    graphs = {}
    for phase, gm in template.graphs.items():
        tensors = {}
        recipes = graph_meta(gm).derived_constants
        for target in _get_attr_targets(gm):
            if target in own:
                tensors[target] = own[target]
            elif recipes.get(target) is None:
                tensors[target] = _fetch(gm, target)            # independent of the weights: shared
            else:
                source, derive = recipes[target]
                tensors[target] = derived_cache[(source, _recipe_key(derive))]
        graphs[phase] = _graph_module(gm, tensors)
        problems = verify_attrs(graphs[phase]) if verify else []
        if problems:
            node, message = problems[0]
            raise PassVerificationError("rebind", node, f"{phase} graph re-bound to another layer: {message}")
    return LoweredMLA(layer, template.target, graphs, template.reports, template.options, template.checked)


def _why_not_rebindable(lowered: LoweredMLA, layer_tensors: set[str]) -> str:
    """'' if every tensor a graph reads is a layer tensor or a recorded constant, else why not."""
    for phase, gm in lowered.graphs.items():
        recipes = graph_meta(gm).derived_constants
        for target in _get_attr_targets(gm):
            if target not in layer_tensors and target not in recipes:
                return (f"the {phase} graph reads constant {target!r}, which no pass recorded in "
                        f"graph_meta(gm).derived_constants (derived from which weight, or None)")
    return ""


def _layer_tensors(layer: MLAAttention) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(layer.named_parameters())
    tensors.update(layer.named_buffers())
    return tensors


def _get_attr_targets(gm: GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]


def _fetch(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _recipe_key(derive: Callable) -> tuple:
    """functools.partial has no __eq__: compare function and bound arguments."""
    return (getattr(derive, "func", derive), getattr(derive, "args", ()),
            tuple(sorted(getattr(derive, "keywords", {}).items())))


def _graph_module(template: GraphModule, tensors: dict[str, torch.Tensor]) -> GraphModule:
    """A GraphModule over a copy of template's graph whose get_attr targets resolve to `tensors`."""
    root = torch.nn.Module()
    for target, tensor in tensors.items():
        *path, name = target.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(tensor, torch.nn.Parameter):
            owner.register_parameter(name, tensor)
        else:
            owner.register_buffer(name, tensor, persistent=False)
    gm = GraphModule(root, copy.deepcopy(template.graph), class_name=type(template).__name__)
    gm.meta.update(template.meta)
    gm.meta["mla"] = graph_meta(template).copy()    # its own: a pass on one layer's graph leaves the others'
    return gm
