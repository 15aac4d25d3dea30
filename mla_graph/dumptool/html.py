"""One self-contained HTML report over a dump folder: no server, no network, opens from disk.

Per phase: the pipeline as a timeline (pass, time, changed, matches per rule, nodes created and
erased), a side-by-side before/after diff of the FX code of every pass that changed the graph
(with its drawing when svg was dumped), the op histogram per stage, the final kernel list with
shapes, and the torchair check when it was recorded (what was checked, the findings with their
severities, the GE op list of torchair's own conversion); across phases, a lookup
from any node to the pass that created it (and the one that erased it).
The diffs are rendered here (difflib); the tables are rendered in the page from embedded JSON.
"""
from __future__ import annotations

import difflib
import html
import json
from importlib import resources
from pathlib import Path

from .files import write_text_atomic
from .folder import stage_stem
from .loading import Dump, PhaseDump, load_dump, split_code

REPORT_NAME = "report.html"


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _inline_svg(svg: str) -> str:
    """Graphviz's file minus its XML prolog and DOCTYPE, so it can sit inside the page."""
    return svg[svg.index("<svg"):] if "<svg" in svg else ""


def _pass_sections(phase: PhaseDump, differ: difflib.HtmlDiff) -> str:
    parts = []
    for record in phase.passes:
        stem = stage_stem(record["index"], record["name"])
        before, after = phase.text(f"{stem}.before"), phase.text(f"{stem}.after")
        if not record["changed"] or before is None or after is None:
            continue
        table = differ.make_table(split_code(before)[0].splitlines(), split_code(after)[0].splitlines(),
                                  "before", "after", context=True, numlines=2)
        created = ", ".join(record.get("created_nodes", [])) or "-"
        erased = ", ".join(record.get("erased_nodes", [])) or "-"
        svg = phase.svg(f"{stem}.after")
        drawing = (f'<details class="drawing"><summary>graph after {html.escape(stem)} (new nodes filled '
                   f'orange; hover a node for the pass that made it)</summary>{_inline_svg(svg)}</details>'
                   if svg else "")
        parts.append(
            f'<details class="pass" id="{html.escape(phase.name)}-{html.escape(stem)}" '
            f'data-pass="{html.escape(record["name"])}"><summary><b>{html.escape(stem)}</b> '
            f'<span class="muted">{record["matches"]} match(es), +{record["created"]} / -{record["erased"]} '
            f'nodes</span></summary>'
            f'<p><b>created:</b> <code>{html.escape(created)}</code><br><b>erased:</b> '
            f'<code>{html.escape(erased)}</code></p>{table}{drawing}</details>')
    if not parts:
        return '<p class="muted">no pass changed the graph (or its txt dumps were not written)</p>'
    return "\n".join(parts)


def _phase_data(phase: PhaseDump) -> dict:
    summary = phase.summary
    return {"name": phase.name, "passes": summary["passes"], "capture_ops": summary.get("capture_ops", {}),
            "final_ops": summary.get("final_ops", {}), "nodes": summary.get("nodes", []),
            "stopped_after": summary.get("stopped_after"), "torchair": phase.torchair}


def build_report(dump: Dump, *, only_changed: bool = False) -> str:
    """The report's HTML text. `only_changed` hides passes that changed nothing (a checkbox
    in the page toggles it)."""
    meta = dump.meta
    title = " / ".join(str(meta[k]) for k in ("model", "target") if meta.get(k)) or dump.root.name
    data = {"meta": meta, "only_changed": only_changed, "phases": [_phase_data(p) for p in dump.phases]}
    differ = difflib.HtmlDiff(wrapcolumn=100)
    sections = []
    for phase in dump.phases:
        name = html.escape(phase.name)
        sections.append(f"""
<section class="phase" id="phase-{name}" data-phase="{name}">
  <h2>phase: {name}</h2>
  <h3>Pipeline</h3><div class="timeline" data-phase="{name}"></div>
  <h3>Passes that changed the graph: before / after</h3>
  {_pass_sections(phase, differ)}
  <h3>Op histogram per stage</h3><div class="histogram" data-phase="{name}"></div>
  <h3>Final kernels</h3><div class="kernels" data-phase="{name}"></div>
  <div class="torchair" data-phase="{name}"></div>
</section>""")
    nav = " ".join(f'<a href="#phase-{html.escape(p.name)}">{html.escape(p.name)}</a>' for p in dump.phases)
    facts = " &middot; ".join(html.escape(f"{k}: {meta[k]}") for k in ("model", "target", "dtype", "block_size",
                                                                      "layers") if k in meta)
    # "</" cannot appear inside a script element; JSON allows escaping the slash.
    payload = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mla-graph dump: {html.escape(title)}</title>
<style>{_asset("report.css")}</style></head>
<body>
<header><h1>mla-graph dump: {html.escape(title)}</h1><p class="muted">{facts}</p>
<nav>phases: {nav} &middot; <a href="#lookup">node lookup</a>
<label><input type="checkbox" id="only-changed"> only passes that changed the graph</label></nav></header>
<main>
<section id="overview"><h2>Overview</h2><div id="overview-table"></div></section>
{"".join(sections)}
<section id="lookup"><h2>Node lookup: which pass made it?</h2>
<input id="node-search" type="search" placeholder="node name or op (e.g. npu_fused_infer_attention_score)" size="60">
<div id="lookup-table"></div></section>
</main>
<script type="application/json" id="mla-data">{payload}</script>
<script>{_asset("report.js")}</script>
</body></html>
"""


def write_report(root: str | Path, *, only_changed: bool = False) -> Path:
    """Build the report of the dump at `root` and write `<root>/report.html`; returns its path."""
    dump = load_dump(root)
    path = Path(root) / REPORT_NAME
    return write_text_atomic(path, build_report(dump, only_changed=only_changed))
