"""check_torchair: would torchair's GE mode (max-autotune) accept this FX graph?

GE mode converts every node through a converter registered for its target and has no per-node
fallback: a missing or stub converter is a compile error (reference: torchair 2.13.0,
fx2ge_converter.py). The rules, per call_function node:

- an OpOverload needs a real converter in the vendored list (data/ge_converters-<release>.txt). An op
  without one that is CompositeImplicitAutograd (aten.linear) is judged by what it decomposes
  into on this host, since torchair's AOT trace decomposes it before any converter runs (on an
  NPU, torch_npu keeps a few composites whole, e.g. aten.matmul, which has a converter);
- aten.sym_size.int and aten.sym_numel have real converters and pass by the data;
  aten.sym_stride.int, aten.sym_storage_offset and air.record/wait torchair computes itself;
  dynamic shapes are reported once, at the placeholders (rule "dynamic-dim");
- Python builtins torchair evaluates on the host (operator.getitem) unless the list has a
  converter for them (operator.add on SymInts);
- air.scope_enter / air.scope_exit must nest and pair up;
- atb:: ops and index_put get their own rules: they are the usual ways an eager NPU graph fails.

Where the torch-npu 2.13.0 wheel is available (mla_graph.ascend_toolchain), the wheel's own
checks follow (toolchain_checks.py): torchair's real converters, GE input dtypes, the wheel's meta
functions and the documented kernel limits. `report.checked` says which ran.
"""
from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mla_graph.torch_compat import fake_mode_context

from .converters import ConverterTable, is_host_builtin, load_converters, target_keys
from .report import Finding, TorchairReport
from .toolchain_checks import run_toolchain_checks

SCOPE_ENTER, SCOPE_EXIT = "air.scope_enter.default", "air.scope_exit.default"
# Targets torchair handles without a converter (fx2ge_converter.py: _SPECIAL_TARGETS and the
# symbolic stride/offset it infers from the input shapes).
HANDLED_BY_TORCHAIR = frozenset({SCOPE_ENTER, SCOPE_EXIT, "air.record.default", "air.wait.default",
                                 "aten.sym_stride.int", "aten.sym_storage_offset.default"})
INDEX_PUT = ("aten.index_put.", "aten.index_put_.", "aten._unsafe_index_put.")
CACHE_WRITE = "write the cache with npu_kv_rmsnorm_rope_cache / npu_scatter_nd_update_ / scatter_update_"
SUGGESTIONS: dict[str, str] = {   # op name (without overload) -> what GE mode can run instead
    "atb._npu_paged_attention_mla": "npu_fused_infer_attention_score with query_rope/key_rope",
    "atb._npu_paged_attention": "npu_fused_infer_attention_score (BNSD, block_table)",
    "atb._npu_reshape_and_cache": "npu_kv_rmsnorm_rope_cache (PA) or scatter_update_",
    "atb.npu_ring_mla": "npu_fused_infer_attention_score (TND, sparse_mode 3)",
    "npu.npu_rotary_mul": "npu_interleave_rope (real converter) for DeepSeek's interleaved rope",
}
LOWER_FIRST = "lower it first (target npu/torchair)"
SCOPE_SUGGESTION = ("emit air.scope_enter / air.scope_exit in pairs, properly nested "
                    "(torchair.scope.npu_stream_switch or super_kernel as a context manager)")
STATIC_SUGGESTION = ("capture with static sizes: pad the batch to a bucket and compile one graph per bucket "
                     "(torchair graph mode); pass static_dims=False to accept a dynamic GE graph (no AOE)")


def check_torchair(gm: GraphModule, *, static_dims: bool = True, toolchain: bool | None = None) -> TorchairReport:
    """Every node of `gm` that torchair's GE mode would reject, with what to emit instead.

    `toolchain`: None runs the wheel's checks when ascend_toolchain.available(), False never,
    True requires them (ToolchainUnavailable, with the reason, when the wheel cannot be loaded)."""
    table = load_converters()
    report = TorchairReport(converters=f"torch-npu {table.version}",
                            checked=[f"converter list of torch-npu {table.version} (every node has a real GE "
                                     f"converter; no atb:: or index_put; scopes paired"
                                     f"{'; static input sizes' if static_dims else ''})"])
    open_scopes: list[Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and static_dims:
            report.findings += _dynamic_dims(node)
        elif node.op == "call_function":
            name = _name(node.target)
            if name == SCOPE_ENTER:
                open_scopes.append(node)
            elif name == SCOPE_EXIT and open_scopes:
                open_scopes.pop()
            elif name == SCOPE_EXIT:
                report.findings.append(Finding("unpaired-scope", node.name, name,
                                               "scope_exit without an open scope_enter", SCOPE_SUGGESTION))
            elif name not in HANDLED_BY_TORCHAIR:
                report.findings += _check_call(node, table)
        elif node.op == "call_method":
            report.findings.append(Finding("no-converter", node.name, f"Tensor.{node.target}",
                                           "a call_method node: torchair converts only function calls",
                                           "trace the graph to aten ops (make_fx / capture)"))
    report.findings += [Finding("unpaired-scope", n.name, SCOPE_ENTER, "scope_enter never closed by a scope_exit",
                                SCOPE_SUGGESTION) for n in open_scopes]
    run_toolchain_checks(gm, report, toolchain)
    return report


def _name(target: object) -> str:
    keys = target_keys(target)
    return keys[0] if keys else str(target)


def _check_call(node: Node, table: ConverterTable) -> list[Finding]:
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator) and target.name() == "auto_functionalized_v2":
        target = node.args[0]   # torchair converts the op it wraps
    name = _name(target)
    packet = name.rsplit(".", 1)[0]
    if name.startswith("atb."):
        return [Finding("atb-op", node.name, name, "atb:: ops have no GE converter (they run only in aclgraph "
                        "mode)", SUGGESTIONS.get(packet, "the torch_npu kernel of the same computation"))]
    if name.startswith(INDEX_PUT):
        return [Finding("index-put", node.name, name, "index_put has only a stub converter in torchair "
                        "(`cache[idx] = x` traces to it)", CACHE_WRITE)]
    if name.startswith("mla."):
        return [Finding("no-converter", node.name, name, "an mla:: primitive: it has no NPU kernel", LOWER_FIRST)]
    kind = next((k for k in map(table.kind, target_keys(target)) if k is not None), None)
    if kind == "real" or (kind is None and is_host_builtin(target)):
        return []
    decomposed = _decomposition(node, target) if target is node.target else None
    if decomposed is not None:   # what torchair's AOT trace would hand to the converters instead
        bad = {op: table.kind(op) for op in decomposed if table.kind(op) != "real"}
        if not bad:
            return []
        kind = next(k for k in (None, "stub", "partial") if k in bad.values())
        listed = ", ".join(f"{op} ({k or 'no converter'})" for op, k in bad.items())
        message = f"CompositeImplicitAutograd; decomposes into {listed}"
    else:
        message = {None: "no GE converter registered in torchair",
                   "stub": "its converter only raises (a compile error in GE mode)",
                   "partial": "its converter raises NotImplementedError for some arguments "
                              f"(see it in torch-npu {table.version})"}[kind]
    rule = {None: "no-converter", "stub": "stub-converter", "partial": "partial-converter"}[kind]
    return [Finding(rule, node.name, name, message, _alternative(name, packet, table, kind))]


def _alternative(name: str, packet: str, table: ConverterTable, kind: str | None) -> str:
    if packet in SUGGESTIONS:
        return SUGGESTIONS[packet]
    functional = f"{packet.removesuffix('_')}_functional.default"
    if table.kind(functional) == "real":
        return f"emit {functional} and copy the result into the input (torchair functionalizes in-place ops)"
    others = [k for k in table.real_overloads(packet) if k != name]
    if others:
        return f"use an overload with a real converter: {', '.join(others)}"
    rewrite = "rewrite it with ops that have a real GE converter (listed in mla_graph/data/ge_converters-<release>.txt)"
    if kind == "partial":
        return f"keep it only with arguments its torch-npu {table.version} converter supports; otherwise {rewrite}"
    return rewrite


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.prim.device.default:   # a metadata query make_fx does not record either
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _decomposition(node: Node, target: object) -> list[str] | None:
    """The ops a CompositeImplicitAutograd op becomes below autograd (as in torchair's AOT trace),
    run on the node's fake values; None when it does not decompose or has no fake values."""
    if not isinstance(target, torch._ops.OpOverload) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            target.name(), "CompositeImplicitAutograd"):
        return None
    missing = object()
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val", missing))
    fake_mode = detect_fake_mode(tree_leaves((args, kwargs)))
    if fake_mode is None or any(v is missing for v in tree_leaves((args, kwargs))):
        return None
    with fake_mode_context(fake_mode), _OpRecorder() as recorder:
        target.decompose(*args, **kwargs)
    return list(dict.fromkeys(recorder.ops))


def _dynamic_dims(node: Node) -> list[Finding]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = [(i, size) for i, size in enumerate(val.shape) if not is_concrete_int(size)]
        if not dims:
            return []
        what = ", ".join(f"dim {i} ({size})" for i, size in dims)
        return [Finding("dynamic-dim", node.name, "placeholder", f"symbolic size: {what} of shape "
                        f"{list(val.shape)}", STATIC_SUGGESTION)]
    if isinstance(val, torch.SymInt) and not is_concrete_int(val):
        return [Finding("dynamic-dim", node.name, "placeholder", f"a symbolic int input ({val})", STATIC_SUGGESTION)]
    return []
