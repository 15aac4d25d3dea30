"""What check_torchair returns: the findings (errors and notes), what was checked, a table and a JSON form.

A report never says more than its `checked` list: "no errors" is always followed by what was
checked, and without the wheel the table opens with "converter-list check only".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mla_graph.dumptool.render import format_table

SEVERITIES = ("error", "note")
RULES: dict[str, str] = {
    # the vendored converter list (always)
    "no-converter": "no GE converter registered in torchair for the node's target",
    "stub-converter": "the node's GE converter only raises",
    "partial-converter": "the node's GE converter raises NotImplementedError for some arguments",
    "atb-op": "an atb:: op (no GE converter; aclgraph mode only)",
    "index-put": "index_put (a stub converter)",
    "unpaired-scope": "air.scope_enter / scope_exit not paired and nested",
    "dynamic-dim": "a symbolic input size (GE mode compiles static graphs per bucket)",
    # the torch-npu 2.13.0 wheel's own checks (mla_graph.ascend_toolchain.RULES)
    "ge-dtype": "a GE op input's dtype is not in the op's registered TensorType list",
    "ge-no-converter": "torchair has no converter for the FX node's target",
    "ge-convert-error": "torchair's converter raised while converting the node",
    "ge-not-run": "the GE conversion could not run on this graph (symbolic sizes or no fake values)",
    "meta-mismatch": "the wheel's meta function disagrees with the node's fake value",
    "meta-error": "the wheel's meta function rejected the node's arguments",
    "meta-missing": "the wheel has no meta function for the op",
    "kernel-limit": "a call outside a documented kernel limit (a note where production use contradicts the limit)",
}
# What no check here can show; only an Ascend host with CANN can (docs/debugging.md).
HARDWARE_ONLY = ("GE compiling and running the graph, CANN's op-level tiling and shape checks beyond the "
                 "documented limits, performance, NZ layouts in memory")


@dataclass(frozen=True)
class Finding:
    rule: str         # one of RULES
    node: str         # the FX node's name (the GE op's name where no FX node made it)
    op: str           # its target ('aten.index_put_.default'), a GE op type, 'placeholder' for an input
    message: str      # what is wrong
    suggestion: str   # what to emit instead
    severity: str = "error"   # "error" (GE or the kernel would reject it) or "note" (reported, not rejected)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")


@dataclass(frozen=True)
class GeOpRow:
    """One op of the GE graph torchair's converters built."""
    name: str
    type: str                  # 'FusedInferAttentionScore'
    fx_node: str | None        # the FX node whose conversion emitted it
    inputs: tuple[str, ...]    # 'actual_seq_lengths_kv: DT_INT64', one per data input
    stand_in: bool = False     # a placeholder for a node torchair could not convert (see its finding)


@dataclass
class TorchairReport:
    converters: str                          # which converter list was used ('torch-npu 2.13.0')
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)       # plain statements of what was checked
    not_checked: list[str] = field(default_factory=list)   # what could have been checked here but was not, and why
    toolchain: str = ""                      # the wheel's status (ascend_toolchain.status()) or why it was not used
    toolchain_used: bool = False
    ge_ops: list[GeOpRow] = field(default_factory=list)    # the GE graph, when converted
    ge_unchecked: list[str] = field(default_factory=list)  # GE inputs whose allowed dtypes are unknown
    pbtxt: str | None = None                 # the GE graph as torchair's graph dump writes it, when converted

    @property
    def ok(self) -> bool:
        """No error findings (notes are reported, never rejected). Says nothing beyond `checked`."""
        return not self.errors()

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "note"]

    def rules(self) -> list[str]:
        return sorted({f.rule for f in self.findings})

    def ge_op_types(self) -> list[str]:
        return [op.type for op in self.ge_ops]

    def scope(self) -> str:
        """One line: what this report covers."""
        if not self.toolchain_used:
            return f"converter-list check only ({self.toolchain})"
        return f"checked with the {self.converters} wheel's toolchain"

    def table(self) -> str:
        lines = [f"torchair check: {self.scope()}"]
        lines += [f"  checked: {what}" for what in self.checked]
        lines += [f"  not checked: {what}" for what in self.not_checked]
        lines.append(f"  only real hardware shows: {HARDWARE_ONLY}")
        if self.ge_ops:
            lines.append(f"GE ops: {', '.join(_kernel_types(self.ge_ops))}")
        if self.findings:
            rows = [(f.severity, f.rule, f.node, f.op, f.message, f.suggestion) for f in self.findings]
            lines.append(format_table(("severity", "rule", "node", "op", "message", "suggestion"), rows))
        errors, notes = len(self.errors()), len(self.notes())
        verdict = f"{errors} error(s)" if errors else "no errors"
        lines.append(f"{verdict}, {notes} note(s) in what was checked above")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "scope": self.scope(), "converters": self.converters, "checked": self.checked,
                "not_checked": self.not_checked, "hardware_only": HARDWARE_ONLY, "toolchain": self.toolchain,
                "toolchain_used": self.toolchain_used, "errors": len(self.errors()), "notes": len(self.notes()),
                "findings": [asdict(f) for f in self.findings], "ge_ops": [asdict(op) for op in self.ge_ops],
                "ge_unchecked": self.ge_unchecked}


# Graph plumbing, left out of the one-line GE op summary (the full list is in ge_ops).
_PLUMBING = frozenset({"Data", "RefData", "NetOutput", "Const", "Constant"})


def _kernel_types(ops: list[GeOpRow]) -> list[str]:
    counts: dict[str, int] = {}
    for op in ops:
        if op.type not in _PLUMBING:
            name = f"{op.type} (stand-in: not converted)" if op.stand_in else op.type
            counts[name] = counts.get(name, 0) + 1
    return [t if n == 1 else f"{t} x{n}" for t, n in counts.items()]
