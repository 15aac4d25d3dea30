"use strict";
// Renders the report's tables from the JSON embedded in the page (see mla_graph/dumptool/html.py).
(function () {
  const data = JSON.parse(document.getElementById("mla-data").textContent);
  const VENDOR = /^(npu|atb|mla)\./;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v; else if (v !== "") node.setAttribute(k, v);
    }
    for (const child of children || []) node.append(child);
    return node;
  }
  function table(headers, rows, numeric) {
    const head = el("tr", {}, headers.map((h, i) => el("th", {text: h, class: numeric && numeric[i] ? "num" : ""})));
    const body = rows.map(r => r.tr || el("tr", r.attrs || {}, r.cells.map((c, i) =>
      c instanceof Node ? el("td", {}, [c]) : el("td", {text: String(c), class: numeric && numeric[i] ? "num" : ""}))));
    return el("table", {}, [el("thead", {}, [head]), el("tbody", {}, body)]);
  }
  function nodeLink(name) {
    const a = el("a", {class: "node", text: name, title: "show in the node lookup"});
    a.addEventListener("click", () => { search.value = name; renderLookup(); location.hash = "lookup"; });
    return a;
  }
  function stem(p) { return String(p.index).padStart(2, "0") + "-" + p.name; }

  // Per phase: node name -> {created_by, erased_by, row}
  function provenance(phase) {
    const info = new Map();
    const get = n => { if (!info.has(n)) info.set(n, {created_by: "capture", erased_by: null, row: null}); return info.get(n); };
    for (const p of phase.passes) {
      for (const n of p.created_nodes || []) get(n).created_by = p.name;
      for (const n of p.erased_nodes || []) get(n).erased_by = p.name;
    }
    for (const row of phase.nodes) { const i = get(row.name); i.row = row; i.created_by = row.made_by; }
    return info;
  }
  const prov = new Map(data.phases.map(ph => [ph.name, provenance(ph)]));

  function renderOverview() {
    const rows = data.phases.map(ph => {
      const kernels = ph.nodes.filter(n => n.kernel);
      return {cells: [ph.name, ph.passes.length, ph.passes.filter(p => p.changed).length,
        (ph.passes.reduce((s, p) => s + p.seconds, 0) * 1e3).toFixed(1),
        ph.nodes.length, kernels.length, kernels.filter(n => VENDOR.test(n.target)).length,
        ph.stopped_after ? "stopped after " + ph.stopped_after : "complete",
        ph.torchair ? torchairVerdict(ph.torchair) : "-"]};
    });
    document.getElementById("overview-table").replaceChildren(table(
      ["phase", "passes run", "changed", "time ms", "nodes", "kernels", "vendor kernels", "pipeline", "torchair"],
      rows, [0, 1, 1, 1, 1, 1, 1, 0, 0]));
  }

  function renderTimeline(ph, box, onlyChanged) {
    const max = Math.max(1e-9, ...ph.passes.map(p => p.seconds));
    const rows = ph.passes.filter(p => p.changed || !onlyChanged).map(p => {
      const name = p.changed ? el("a", {href: "#" + ph.name + "-" + stem(p), text: p.name}) : el("span", {text: p.name});
      const rules = Object.entries(p.matches_by_rule).map(([r, n]) => r + " \u00d7" + n).join(", ") || "-";
      const bar = el("span", {}, [el("span", {class: "bar", style: "width:" + Math.max(1, 160 * p.seconds / max) + "px"}),
        el("span", {text: " " + (p.seconds * 1e3).toFixed(1) + " ms"})]);
      return {attrs: {class: p.changed ? "changed" : "unchanged"}, cells: [String(p.index).padStart(2, "0"), name, bar,
        p.changed ? "yes" : "-", p.matches, rules, "+" + p.created, "-" + p.erased]};
    });
    const note = ph.stopped_after ? [el("p", {class: "muted", text: "stopped after " + ph.stopped_after + " (--stop-after): later passes did not run"})] : [];
    box.replaceChildren(table(["#", "pass", "time", "changed", "matches", "matches per rule", "created", "erased"], rows,
      [0, 0, 0, 0, 1, 0, 1, 1]), ...note);
  }

  function renderHistogram(ph, box) {
    const stages = [{label: "capture", ops: ph.capture_ops}].concat(
      ph.passes.filter(p => p.changed).map(p => ({label: stem(p), ops: p.ops_after})));
    const ops = [...new Set(stages.flatMap(s => Object.keys(s.ops)))].sort();
    const rows = ops.map(op => {
      const tr = el("tr", {}, [el("td", {class: "mono", text: op})]);
      stages.forEach((s, i) => {
        const n = s.ops[op] || 0, prev = i ? (stages[i - 1].ops[op] || 0) : n;
        tr.append(el("td", {class: "num" + (n > prev ? " up" : n < prev ? " down" : ""), text: n ? String(n) : "\u00b7"}));
      });
      return {tr};
    });
    box.replaceChildren(el("div", {class: "scroll"}, [table(["op"].concat(stages.map(s => s.label)), rows,
      [0].concat(stages.map(() => 1)))]));
  }

  function renderKernels(ph, box) {
    const byName = new Map(ph.nodes.map(n => [n.name, n]));
    const rows = ph.nodes.filter(n => n.kernel).map((n, i) => {
      const target = el("span", {class: "mono", text: n.target}, VENDOR.test(n.target) ? [el("span", {class: "badge", text: n.target.split(".")[0]})] : []);
      const inputs = n.inputs.map(x => byName.has(x) ? byName.get(x).shape : "?").join(", ");
      return {cells: [i + 1, nodeLink(n.name), target, inputs, n.shape, n.dtype, n.made_by]};
    });
    box.replaceChildren(table(["#", "node", "op", "input shapes", "output shape", "dtype", "made by"], rows, [1]));
  }

  // The torchair check: what was checked, the findings with their severities, the GE op list.
  // Never "compatible": only "no errors in what was checked", next to what was checked.
  function torchairVerdict(t) {
    const errors = t.errors !== undefined ? t.errors : t.findings.filter(f => (f.severity || "error") === "error").length;
    const notes = t.findings.length - errors;
    return (errors ? errors + " error(s)" : "no errors") + ", " + notes + " note(s)" +
      (t.toolchain_used ? "" : " (converter list only)");
  }
  // A node of the dumped graph links to the lookup; the bucket graph's own nodes (torchair decode) are text.
  function nodeCell(name, info) { return !name ? "-" : info.has(name) ? nodeLink(name) : name; }
  function renderTorchair(ph, box) {
    const t = ph.torchair;
    if (!t) return;
    const info = prov.get(ph.name);
    const rows = t.findings.map(f => {
      const severity = f.severity || "error";
      return {attrs: {class: "finding " + severity}, cells: [severity, f.rule, nodeCell(f.node, info),
        f.op || "-", f.node && info.has(f.node) ? info.get(f.node).created_by : "-", f.message, f.suggestion || ""]};
    });
    const errors = rows.filter(r => r.cells[0] === "error").length;
    const verdict = el("p", {class: errors ? "bad" : "ok", text: "torchair: " + torchairVerdict(t) + " in what was checked"});
    const scope = el("p", {class: "scope", text: t.scope || ("converter-list check only (GE converters of " + t.converters + ")")});
    const facts = [["graph", t.graph || t.note], ["only real hardware shows", t.hardware_only]].filter(([, v]) => v)
      .map(([k, v]) => el("li", {}, [el("b", {text: k + ": "}), el("span", {text: v})]));
    const checked = el("ul", {class: "checked"}, (t.checked || []).map(c => el("li", {text: "checked: " + c}))
      .concat((t.not_checked || []).map(c => el("li", {class: "not-checked", text: "not checked: " + c})), facts));
    const parts = [el("h3", {text: "torchair check"}), verdict, scope, checked];
    if (rows.length) parts.push(table(["severity", "rule", "node", "op", "made by pass", "message", "suggestion"], rows));
    const ops = t.ge_ops || [];
    if (ops.length) {
      const link = t.ge_graph ? [el("span", {text: " \u00b7 "}), el("a", {href: ph.name + "/" + t.ge_graph, text: t.ge_graph})] : [];
      const opRows = ops.map((op, i) => ({attrs: {class: "ge-op"}, cells: [i + 1, op.name, op.type,
        nodeCell(op.fx_node, info), op.inputs.join(", ")]}));
      parts.push(el("h3", {}, [el("span", {text: "GE graph: " + ops.length + " ops (torchair's own converters)"}), ...link]),
        el("div", {class: "scroll ge-ops"}, [table(["#", "GE op", "type", "from FX node", "inputs: dtype"], opRows, [1])]));
    }
    box.replaceChildren(...parts);
  }

  const search = document.getElementById("node-search");
  function renderLookup() {
    const q = search.value.trim().toLowerCase();
    const rows = [];
    for (const ph of data.phases) {
      for (const [name, i] of prov.get(ph.name)) {
        const target = i.row ? i.row.target : "";
        if (q && !name.toLowerCase().includes(q) && !target.toLowerCase().includes(q)) continue;
        rows.push({attrs: {"data-phase": ph.name, "data-node": name}, cells: [ph.name, name, target || "(erased)", i.row ? i.row.shape : "-",
          i.created_by, i.erased_by || (i.row ? "in final graph" : "-")]});
      }
    }
    document.getElementById("lookup-table").replaceChildren(el("div", {class: "scroll"}, [table(
      ["phase", "node", "op", "shape", "created by", "erased by"], rows.slice(0, 500))]),
      el("p", {class: "muted", text: rows.length + " node(s)" + (rows.length > 500 ? ", first 500 shown" : "")}));
  }

  const onlyChanged = document.getElementById("only-changed");
  onlyChanged.checked = Boolean(data.only_changed);
  function renderTimelines() {
    for (const ph of data.phases) {
      renderTimeline(ph, document.querySelector('.timeline[data-phase="' + ph.name + '"]'), onlyChanged.checked);
    }
  }
  onlyChanged.addEventListener("change", renderTimelines);
  search.addEventListener("input", renderLookup);

  renderOverview();
  renderTimelines();
  for (const ph of data.phases) {
    renderHistogram(ph, document.querySelector('.histogram[data-phase="' + ph.name + '"]'));
    renderKernels(ph, document.querySelector('.kernels[data-phase="' + ph.name + '"]'));
    renderTorchair(ph, document.querySelector('.torchair[data-phase="' + ph.name + '"]'));
  }
  renderLookup();
  // report.html#<phase>-NN-<pass> opens that pass's diff (the timeline links there too)
  function openFromHash() {
    const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (target && target.tagName === "DETAILS") { target.open = true; target.scrollIntoView(); }
  }
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
  document.body.dataset.ready = "1";   // read by the browser test: the script ran to the end
})();
