"""Compare two dump folders pass by pass: which passes ran and changed the graph in each, the
final op histograms, and the final graph text per phase (e.g. two targets, or before and after
a code change). Timings are not compared."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from .loading import PhaseDump, load_dump
from .render import format_table

NOT_RUN = "(not run)"


def pass_status(record: dict | None) -> str:
    if record is None:
        return NOT_RUN
    if not record["changed"]:
        return "-"
    rules = ", ".join(f"{rule} x{n}" for rule, n in sorted(record.get("matches_by_rule", {}).items()))
    return f"changed: {record['matches']} match(es){f' ({rules})' if rules else ''}, " \
           f"+{record['created']} -{record['erased']}"


@dataclass
class PhaseDiff:
    phase: str
    missing_in: str | None = None                      # "A" or "B" when only one dump has the phase
    passes: list[tuple[str, str, str]] = field(default_factory=list)   # (pass, status A, status B)
    ops: list[tuple[str, int, int]] = field(default_factory=list)      # ops whose counts differ
    final_diff: list[str] = field(default_factory=list)                # unified diff of the final graphs

    @property
    def equal(self) -> bool:
        return (self.missing_in is None and not self.ops and not self.final_diff
                and all(a == b for _, a, b in self.passes))

    def report(self) -> str:
        if self.missing_in:
            return f"== phase {self.phase}: only in {'B' if self.missing_in == 'A' else 'A'} =="
        changed = sum(a != "-" and a != NOT_RUN for _, a, _ in self.passes)
        if self.equal:
            return f"== phase {self.phase}: equal ({len(self.passes)} passes, {changed} changed the graph) =="
        lines = [f"== phase {self.phase}: differs =="]
        rows = [("*" if a != b else "", name, a, b) for name, a, b in self.passes]
        lines.append(format_table(["", "pass", "A", "B"], rows, indent="  "))
        if self.ops:
            lines.append("")
            lines.append(format_table(["op", "A", "B", "delta"], [(op, a, b, f"{b - a:+d}") for op, a, b in self.ops],
                                      indent="  "))
        if self.final_diff:
            body = self.final_diff[2:]   # after the ---/+++ header
            lines.append(f"\n  final graph: {sum(1 for line in body if line[:1] in '+-')} line(s) differ")
            lines += ["  " + line for line in self.final_diff]
        return "\n".join(lines)


@dataclass
class DumpDiff:
    a: Path
    b: Path
    phases: list[PhaseDiff]

    @property
    def equal(self) -> bool:
        return all(p.equal for p in self.phases)

    def report(self) -> str:
        head = [f"A: {self.a}", f"B: {self.b}"]
        verdict = "dumps are equal" if self.equal else \
            f"dumps differ in phase(s): {', '.join(p.phase for p in self.phases if not p.equal)}"
        return "\n".join(head + [p.report() for p in self.phases] + [verdict])


def _align(a: list[dict], b: list[dict]) -> list[tuple[str, str, str]]:
    """Passes of two pipelines side by side, aligned by name (a pass only one ran is 'not run')."""
    names_a, names_b = [r["name"] for r in a], [r["name"] for r in b]
    rows = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=names_a, b=names_b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [(a[i]["name"], pass_status(a[i]), pass_status(b[j])) for i, j in zip(range(i1, i2), range(j1, j2))]
        else:
            rows += [(a[i]["name"], pass_status(a[i]), NOT_RUN) for i in range(i1, i2)]
            rows += [(b[j]["name"], NOT_RUN, pass_status(b[j])) for j in range(j1, j2)]
    return rows


def _phase_diff(name: str, a: PhaseDump, b: PhaseDump) -> PhaseDiff:
    ops_a, ops_b = a.summary.get("final_ops", {}), b.summary.get("final_ops", {})
    ops = [(op, ops_a.get(op, 0), ops_b.get(op, 0)) for op in sorted(set(ops_a) | set(ops_b))
           if ops_a.get(op, 0) != ops_b.get(op, 0)]
    text_a, text_b = a.final_text(), b.final_text()
    final = [] if text_a == text_b else list(difflib.unified_diff(
        (text_a or "(no txt dump)\n").splitlines(), (text_b or "(no txt dump)\n").splitlines(),
        f"A/{name} (final)", f"B/{name} (final)", lineterm="", n=2))
    return PhaseDiff(name, None, _align(a.passes, b.passes), ops, final)


def diff_dumps(path_a: str | Path, path_b: str | Path) -> DumpDiff:
    dump_a, dump_b = load_dump(path_a), load_dump(path_b)
    names = [p.name for p in dump_a.phases] + [p.name for p in dump_b.phases if dump_a.phase(p.name) is None]
    phases = []
    for name in names:
        pa, pb = dump_a.phase(name), dump_b.phase(name)
        if pa is None or pb is None:
            phases.append(PhaseDiff(name, missing_in="A" if pa is None else "B"))
        else:
            phases.append(_phase_diff(name, pa, pb))
    return DumpDiff(Path(path_a), Path(path_b), phases)

