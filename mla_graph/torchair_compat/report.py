"""What check_torchair returns: one Finding per problem node, a table and a JSON form."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from passes.dump import format_table

RULES = ("no-converter", "stub-converter", "partial-converter", "atb-op", "index-put", "unpaired-scope",
         "dynamic-dim")


@dataclass(frozen=True)
class Finding:
    rule: str         # one of RULES
    node: str         # the FX node's name
    op: str           # its target ('aten.index_put_.default'), 'placeholder' for an input
    message: str      # what is wrong
    suggestion: str   # what to emit instead

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")


@dataclass
class TorchairReport:
    converters: str                       # which converter list was used ('torch-npu 2.13.0')
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def rules(self) -> list[str]:
        return sorted({f.rule for f in self.findings})

    def table(self) -> str:
        if self.ok:
            return f"torchair check: clean (GE converters of {self.converters})"
        rows = [(f.rule, f.node, f.op, f.message, f.suggestion) for f in self.findings]
        table = format_table(("rule", "node", "op", "message", "suggestion"), rows)
        summary = f"{len(self.findings)} finding(s) against the GE converters of {self.converters}"
        return f"{table}\n{summary}"

    def to_json(self) -> dict:
        return {"ok": self.ok, "converters": self.converters, "findings": [asdict(f) for f in self.findings]}
