"""A run's outputs: JSON, a PNG plot, Markdown tables, and the tables spliced into a docs section."""
from __future__ import annotations

import json
import os

DOCS_BEGIN, DOCS_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_outputs(data: dict, out_dir: str, docs: str | None = None) -> list[str]:
    """results.json, bench.png and results.md in `out_dir`; with `docs`, the tables also replace the
    part of that Markdown file between DOCS_BEGIN and DOCS_END."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("results.json", "bench.png", "results.md")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    plot(data, paths[1])
    tables = markdown(data)
    with open(paths[2], "w", encoding="utf-8") as fh:
        fh.write(tables)
    if docs is not None:
        with open(docs, encoding="utf-8") as fh:
            text = fh.read()
        if DOCS_BEGIN not in text or DOCS_END not in text:
            raise ValueError(f"{docs} has no {DOCS_BEGIN} ... {DOCS_END} section to replace")
        head, rest = text.split(DOCS_BEGIN, 1)
        with open(docs, "w", encoding="utf-8") as fh:
            fh.write(head + DOCS_BEGIN + "\n" + tables + DOCS_END + rest.split(DOCS_END, 1)[1])
        paths.append(docs)
    return paths


def _ms(stat: dict | None) -> str:
    if stat is None:
        return "not timed"
    return f"{stat['median'] * 1e3:.1f} ({stat['q1'] * 1e3:.1f}-{stat['q3'] * 1e3:.1f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown(data: dict) -> str:
    m, low = data["machine"], data["lowering_cost"]
    parts = [f"Produced by `{data['command']}` ({data['mode']} mode) in {data['total_seconds']:.0f} s on "
             f"{m.get('cpu') or m['machine']}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m.get('transformers')}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_start', ()))}. "
             "Times: median (interquartile range) of repeated runs in one process, in ms.\n"]
    counts = sorted({int(n) for t in low["targets"].values() for n in t["reused"]})
    sep = sorted({int(n) for t in low["targets"].values() for n in t["separate"]})
    parts.append(f"\n### 1. Lowering cost: {low['preset']}, tp {low['tp_size']} ({low['heads_per_rank']} heads "
                 f"per rank), {low['dtype']}, decode phase, verifier on\n\n")
    rows = []
    for target, t in low["targets"].items():
        rows.append([target] + [_ms(t["reused"][str(n)]) for n in counts]
                    + [_ms(t["separate"].get(str(n))) for n in sep] + ["yes" if t["rebound"] else "no"])
    parts.append(_table(["target"] + [f"{n} layer(s)" for n in counts] + [f"{n} one by one" for n in sep]
                        + ["re-bound"], rows))
    reasons = [f"{t}: {v['not_rebound_because']}" for t, v in low["targets"].items() if not v["rebound"]]
    if reasons:
        parts.append("\nNot re-bound, so more layers were not timed: " + "; ".join(reasons) + "\n")
    tc = low["torch_compile"]
    if "skipped" in tc:
        parts.append(f"\ntorch.compile: skipped ({tc['skipped']}).\n")
    else:
        parts.append(f"\ntorch.compile(backend=\"inductor\", dynamic=True), cold cache, decode call "
                     f"(eager call {tc['eager_call_seconds'] * 1e3:.0f} ms subtracted) vs our decode-phase "
                     "lowering of the same layers. Each row starts from an empty inductor cache; the first "
                     "row also pays inductor's one-time start-up in the process (toolchain probe, headers), "
                     "and later layers of a row reuse what the first compiled, as in a real model:\n\n")
        targets = list(low["targets"])
        parts.append(_table(["layers", "torch.compile s"] + [f"ours {t} s (ratio)" for t in targets],
                            [[n, f"{v['compile_seconds']:.2f}"] + [
                                f"{v['ours_decode_seconds'][t]:.2f} (x{v['ratio_compile_over_ours'][t]:.1f})"
                                if t in v["ours_decode_seconds"] else "not timed"
                                for t in targets] for n, v in tc["layers"].items()]))
    k = data["kernels_per_decode"]
    parts.append(f"\n### 2. Device kernels per decode layer ({k['preset']}, views excluded)\n\n")
    rows = [[t, str(v["total"]), ", ".join(f"{op} x{n}" for op, n in v["by_op"].items())]
            for t, v in k["targets"].items()]
    rows.append(["vllm-ascend eager decode (#2459)", str(k["vllm_ascend_eager_decode"]["total"]),
                 ", ".join(k["vllm_ascend_eager_decode"]["kernels"])])
    parts.append(_table(["path", "kernels", "which"], rows))
    d = data["decode_step"]
    impls = list(d["cases"][0]["impls"])
    parts.append(f"\n### 3. CPU decode step, {d['config']['name']} dimensions ({d['config']['num_heads']} heads), "
                 f"{d['dtype']}\n\nTime in ms, median (IQR); ratio = ours / Hugging Face; peak = working "
                 "memory of the step in MiB.\n\n")
    header = ["batch", "context"]
    for name in impls:
        header += [f"{name} ms", f"{name} peak"] + ([f"{name} ratio"] if name != "hf" else [])
    rows = []
    for case in d["cases"]:
        row = [str(case["batch"]), str(case["context"])]
        for name in impls:
            v = case["impls"][name]
            row += [_ms(v["seconds"]), f"{v['peak_bytes'] / 2**20:.0f}"]
            if name != "hf":
                row.append(f"{v['time_ratio_vs_hf']:.2f}")
        rows.append(row)
    parts.append(_table(header, rows))
    kv = data["kv_cache_bytes"]
    parts.append(f"\n### 4. KV cache bytes per token per layer ({kv['dtype']}, all heads)\n\n")
    parts.append(_table(["preset", "latent (ours)", "decompressed K/V", "ratio"],
                        [[n, str(v["latent"]), str(v["decompressed_kv"]), f"{v['ratio']:.1f}"]
                         for n, v in kv["presets"].items()]))
    return "".join(parts)


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    low = data["lowering_cost"]
    for target, t in low["targets"].items():
        ns = sorted(int(n) for n, v in t["reused"].items() if v is not None)
        ax.plot(ns, [t["reused"][str(n)]["median"] for n in ns], marker="o", label=f"{target}, shapes reused")
        ns = sorted(int(n) for n in t["separate"])
        if ns:
            ax.plot(ns, [t["separate"][str(n)]["median"] for n in ns], marker="x", linestyle="none",
                    label=f"{target}, one by one")
    for n, v in low["torch_compile"].get("layers", {}).items():
        ax.plot([int(n)], [v["compile_seconds"]], marker="s", color="black", linestyle="none",
                label="torch.compile inductor (decode)" if n == "1" else None)
    ax.set(title=f"Lowering {low['preset']} (tp {low['tp_size']})", xlabel="layers", ylabel="seconds")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    k = data["kernels_per_decode"]
    names = list(k["targets"]) + ["vllm-ascend eager"]
    ax.bar(names, [v["total"] for v in k["targets"].values()] + [k["vllm_ascend_eager_decode"]["total"]])
    ax.set(title="Device kernels per decode layer", ylabel="kernels")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax = axes[1][0]
    d = data["decode_step"]
    for batch in sorted({c["batch"] for c in d["cases"]}):
        cases = [c for c in d["cases"] if c["batch"] == batch]
        for name in cases[0]["impls"]:
            ax.plot([c["context"] for c in cases], [c["impls"][name]["seconds"]["median"] for c in cases],
                    marker="o", label=f"{name}, batch {batch}")
    ax.set(title=f"CPU decode step, {d['config']['name']}", xlabel="context tokens", ylabel="seconds",
           xscale="log", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    kv = data["kv_cache_bytes"]["presets"]
    xs = range(len(kv))
    ax.bar([x - 0.2 for x in xs], [v["latent"] for v in kv.values()], width=0.4, label="latent (ours)")
    ax.bar([x + 0.2 for x in xs], [v["decompressed_kv"] for v in kv.values()], width=0.4, label="decompressed K/V")
    ax.set_xticks(list(xs), list(kv), fontsize=8)
    ax.set(title="KV cache bytes per token per layer", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
