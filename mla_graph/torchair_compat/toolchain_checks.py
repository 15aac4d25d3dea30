"""The checks check_torchair adds when the running torch's torch-npu wheel's toolchain is available.

After the converter list (rules.py), on the same report:

- GE conversion with torchair's own converters (ascend_toolchain.convert_to_ge), only for a
  graph whose placeholders all have static fake values (a bucket graph): the GE op list, the
  pbtxt, and ge-no-converter / ge-convert-error / ge-dtype findings;
- the wheel's meta functions against our fake kernels (ascend_toolchain.compare_with_wheel_meta);
- the documented kernel limits (kernel_limits.py): where production use contradicts a limit,
  a note with the reason.

A node the converter list already rejects gets nothing more from the toolchain (its
ge-no-converter or stub error would say the same thing twice).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .kernel_limits import kernel_limit_findings
from .report import Finding, GeOpRow, TorchairReport

BUCKET_SUGGESTION = ("check the static graph the compiler is handed for one batch bucket (`mla-graph check` and "
                     "`mla-graph dump` do this for torchair targets: BucketedDecode.warmup returns it)")


def run_toolchain_checks(gm: GraphModule, report: TorchairReport, toolchain: bool | None) -> None:
    """Add the wheel's checks to `report` (see the module docstring); records in report.toolchain
    why they did not run."""
    from .. import ascend_toolchain as at

    if toolchain is False:
        report.toolchain = "the wheel's checks were turned off: --no-toolchain / toolchain=False"
        return
    if toolchain is None and not at.available():
        report.toolchain = f"no wheel: {at.status()}"
        return
    try:
        loaded = at.load()
    except at.ToolchainUnavailable as error:
        if toolchain is None:   # a wheel is there but torchair would not import from it
            report.toolchain = f"no usable wheel: {error}"
            return
        raise at.ToolchainUnavailable(f"check_torchair(toolchain=True) needs the {report.converters} wheel's "
                                      f"toolchain, which is unavailable: {error}") from error
    report.toolchain, report.toolchain_used = at.status(), True
    wheel = f"{report.converters} wheel"
    rejected = {f.node for f in report.findings if f.severity == "error"}
    composites = _composites(gm)

    def add(found) -> None:
        for f in found:
            if f.node in composites and f.rule in ("ge-no-converter", "ge-convert-error"):
                report.not_checked.append(f"torchair's converters on {f.node} ({f.op}): CompositeImplicitAutograd, "
                                          f"which torchair's AOT step decomposes before any converter runs (the "
                                          f"converter list judged its decomposition)")
            elif f.node not in rejected:
                report.findings.append(Finding(f.rule, f.node, f.op, f.message, f.suggestion, f.severity))

    unconvertible = _why_not_convertible(gm)
    if unconvertible is None:
        conversion = at.convert_to_ge(gm, toolchain=loaded)
        add(conversion.findings)
        report.ge_ops = [GeOpRow(op.name, op.type, op.fx_node, tuple(f"{i.name}: {i.dtype}" for i in op.inputs),
                                 op.stand_in)
                         for op in conversion.ops]
        report.ge_unchecked = list(conversion.unchecked)
        report.pbtxt = conversion.pbtxt()
        report.checked.append(f"GE conversion with torchair's own converters ({wheel}): {len(conversion.ops)} GE ops")
        unknown = f"; {len(conversion.unchecked)} input(s) with no dtype list or no recorded dtype left unchecked" \
            if conversion.unchecked else ""
        report.checked.append(f"GE input dtypes against the IR's TensorType lists{unknown}")
        if not conversion.complete:
            report.not_checked.append("the GE conversion and dtypes of the nodes after the one where conversion "
                                      "stopped (see its ge-convert-error)")
    else:
        node, needs, why, suggestion = unconvertible
        report.findings.append(Finding("ge-not-run", node, "placeholder", f"the GE conversion needs {needs} and "
                                       f"was not run: {why}", suggestion, severity="note"))
        report.not_checked.append(f"GE conversion and GE input dtypes (not run: {why})")
    vendor = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
              and n.target.namespace in ("npu", "atb", "air") and "val" in n.meta]
    add(at.compare_with_wheel_meta(gm, loaded))
    report.checked.append(f"npu:: fake kernels against the wheel's meta functions ({len(vendor)} npu::/atb::/air:: "
                          f"node(s) with fake values)")
    limit_findings, attention_nodes = kernel_limit_findings(gm)
    add(limit_findings)
    report.checked.append(f"documented kernel limits of FIA in MLA mode ({attention_nodes} node(s)); the emulated "
                          f"kernels enforce the other documented limits when a graph is traced")


def _composites(gm: GraphModule) -> set[str]:
    """Nodes of CompositeImplicitAutograd ops without a GE converter of their own (aten.linear): in
    torchair they never reach a converter, its AOT trace decomposes them (rules._decomposition)."""
    from .converters import load_converters

    table = load_converters()
    return {n.name for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and table.kind(str(n.target)) != "real"
            and torch._C._dispatch_has_kernel_for_dispatch_key(n.target.name(), "CompositeImplicitAutograd")}


STATIC = "static shapes (a bucket graph)"


def _why_not_convertible(gm: GraphModule) -> tuple[str, str, str, str] | None:
    """(placeholder, what conversion needs, why not, suggestion) for the first placeholder without
    a static fake value, else None."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if value is None:
            return (node.name, "fake values on the placeholders (a traced graph)",
                    f"placeholder {node.name} has no node.meta['val']",
                    "trace the graph (make_fx, capture) so that every node carries its fake value")
        if isinstance(value, torch.Tensor):
            sizes = [*value.shape, *value.stride()]
            if not all(is_concrete_int(s) for s in sizes):
                return node.name, STATIC, f"placeholder {node.name} has symbolic sizes {list(value.shape)}", \
                    BUCKET_SUGGESTION
        elif isinstance(value, torch.SymInt) and not is_concrete_int(value):
            return node.name, STATIC, f"placeholder {node.name} is a symbolic int ({value})", BUCKET_SUGGESTION
    return None
