"""What the toolchain checks report: one GeFinding per problem, errors and notes."""
from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "note")
RULES = {
    "ge-dtype": "a GE op input's dtype is not in the op's registered TensorType list",
    "ge-no-converter": "torchair has no converter for the FX node's target",
    "ge-convert-error": "torchair's converter raised while converting the node",
    "meta-mismatch": "the wheel's meta function disagrees with the node's fake value",
    "meta-error": "the wheel's meta function rejected the node's arguments",
    "meta-missing": "the wheel has no meta function for the op",
}


@dataclass(frozen=True)
class GeFinding:
    severity: str     # "error" or "note"
    rule: str         # one of RULES
    node: str         # the FX node's name, or the GE op's name where no FX node is known
    op: str           # the GE op type ('FusedInferAttentionScore') or the FX target ('npu.npu_rms_norm.default')
    message: str      # what is wrong, with the values involved
    suggestion: str   # what to change

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {sorted(RULES)}")

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule} {self.node} ({self.op}): {self.message}; {self.suggestion}"


def errors(findings: list[GeFinding]) -> list[GeFinding]:
    return [f for f in findings if f.severity == "error"]
