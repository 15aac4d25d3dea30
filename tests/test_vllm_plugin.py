"""The vLLM plugin against real vLLM (0.30) on CPU.

vLLM's own DeepseekV2MLAAttention is built from a tiny DeepSeek-V3-like config inside a vLLM
config context, once without the plugin (vLLM's CPU_MLA backend) and twice with it (its MLA runs
through mla-graph, on the default target (cpu, on vLLM's CPU platform) and on the npu target). All see the same weights, vLLM's
paged cache layout and vLLM-built metadata. vLLM's attention backend is pinned to CPU_MLA and
chosen as on a CPU with AMX (where vLLM would otherwise pick AMX_MLA, fp32-incapable), so these
tests run the same on every CPU.

vLLM is required: these tests fail (never skip) when it is missing, unless MLA_GRAPH_NO_VLLM=1.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

if os.environ.get("MLA_GRAPH_NO_VLLM") == "1":
    pytest.skip("MLA_GRAPH_NO_VLLM=1: vLLM plugin tests not run", allow_module_level=True)
# vLLM from PyPI is CUDA-built; without this it picks no platform on a CPU host, and its
# plugin-disabled MLA layer (the comparison) needs the CPU platform's CPU_MLA backend.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
try:
    import vllm  # noqa: F401
except ImportError as exc:  # a missing vLLM must be loud: the acceptance needs it
    pytest.fail(f"vLLM is not importable ({exc}); install it as the Makefile's test setup does "
                f"(vllm==0.30.0, CUDA-built torchvision/torchaudio/torchcodec removed), or set "
                f"MLA_GRAPH_NO_VLLM=1 to run without the vLLM plugin tests", pytrace=False)

from conftest import V2_LITE_NPU, V3_TINY, randomize  # noqa: E402
from hf_oracle import hf_attention, hf_prefill  # noqa: E402

from mla_graph import MLAAttention, PagedLatentCache, build_metadata, lower  # noqa: E402
from mla_graph.checking import LAYER_TOLERANCES, PHASE_BATCHES, random_batch  # noqa: E402
from mla_graph.vllm_plugin import register  # noqa: E402
from mla_graph.vllm_plugin.translate import config_from_hf, latent_cache_view  # noqa: E402

BLOCK = 16  # CPU_MLA's only block size
# DeepSeek-V3 structure (q_lora, yarn with mscale); kv_lora_rank + rope = 576, CPU_MLA's only head size
HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "float32",
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
    "kv_lora_rank": 512, "qk_nope_head_dim": 16, "qk_rope_head_dim": 64, "v_head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_hidden_layers": 1, "intermediate_size": 128, "moe_intermediate_size": 32, "vocab_size": 128,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
}
ATTN_ARGS = dict(hidden_size=64, num_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16,
                 q_lora_rank=32, kv_lora_rank=512, max_position_embeddings=256)
L, R = 512, 64
TOL = dict(rtol=1e-5, atol=1e-5)
# outputs of the default (cpu) target's absorbed decode: it sums the attention in another order
# (q through W_UK, values through W_UV after); on outputs of magnitude ~10 that moves fp32 results by
# up to ~3e-5. mla-graph's fp32 layer tolerance (mla_graph.checking.LAYER_TOLERANCES).
LAYER_TOL = dict(zip(("rtol", "atol"), LAYER_TOLERANCES[torch.float32]))


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """A VllmConfig for the tiny model, a one-rank process group, and three attention layers with
    the same random weights: vLLM's own (plugin off), the plugin's on its default target (cpu), and
    the plugin's on the npu target (whose absorption derives W_UK/W_UV from kv_b_proj)."""
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLAAttention
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    root = tmp_path_factory.mktemp("vllm")
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    model_config = ModelConfig(model=str(root), skip_tokenizer_init=True, dtype="float32",
                               max_model_len=256, enforce_eager=True)
    config = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=BLOCK),
                        attention_config=AttentionConfig(backend=AttentionBackendEnum.CPU_MLA))
    layers = {}
    with set_current_vllm_config(config), pytest.MonkeyPatch.context() as patch:
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{root}/dist")
        initialize_model_parallel(1, 1)
        # vLLM's backend choice as on a CPU with AMX: the pin above must hold there too
        patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        layers["vllm"] = DeepseekV2MLAAttention(config, model_config.hf_config, **ATTN_ARGS,
                                                cache_config=config.cache_config, prefix="model.layers.0.self_attn")
        patch.undo()
        patch.setenv("MLA_GRAPH_VLLM", "1")
        try:
            assert register() is True
            for name, prefix, target in (("plugin", "model.layers.1.self_attn", None),
                                         ("npu", "model.layers.2.self_attn", "npu")):
                if target:
                    patch.setenv("MLA_GRAPH_VLLM_TARGET", target)
                layers[name] = DeepseekV2MLAAttention(config, model_config.hf_config, **ATTN_ARGS,
                                                      cache_config=config.cache_config, prefix=prefix)
        finally:
            op_registry_oot.pop("MultiHeadLatentAttentionWrapper", None)
        gen = torch.Generator().manual_seed(0)
        # the projections and norms (named once, at the top: the wrappers hold the same modules)
        weights = {name: torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "layernorm" in name else 0.0)
                   for name, p in layers["vllm"].named_parameters() if not name.startswith("mla_attn.")}
        for layer in layers.values():
            params = dict(layer.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            # vLLM's own post-load step: quant methods, then attention layers (the plugin lowers here)
            process_weights_after_loading(layer, model_config, torch.device("cpu"))
    return config, layers, weights


def _plain_layer(mla_config, weights) -> MLAAttention:
    """mla-graph's MLAAttention over an independent copy of vLLM-named weights."""
    layer = MLAAttention(mla_config)
    state = {k.removeprefix("mla_attn."): v.clone() for k, v in weights.items()}
    state["q_a_proj.weight"], state["kv_a_proj_with_mqa.weight"] = state.pop("fused_qkv_a_proj.weight").split([32, L + R])
    layer.load_state_dict(state)
    return layer.requires_grad_(False)


class Steps:
    """Consecutive vLLM steps of two requests (a prefill of 19 and 7 tokens, then decodes), with
    block tables over shuffled blocks, in vLLM's metadata and in mla-graph's."""

    def __init__(self, mla_config, num_blocks: int = 12, seed: int = 1) -> None:
        self.oracle_cache = PagedLatentCache.allocate(mla_config, num_blocks=num_blocks, block_size=BLOCK,
                                                      shuffle_blocks=True, seed=3)
        self.rows: list[list[int]] = [[], []]
        self.lens = [0, 0]
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, new_tokens: tuple[int, int]):
        requests = [(new, self.lens[b]) for b, new in enumerate(new_tokens)]
        for b, (new, cached) in enumerate(requests):
            self.oracle_cache.allocator.grow(self.rows[b], new + cached, BLOCK)
        self.lens = [n + c for n, c in requests]
        T = sum(n for n, _ in requests)
        hidden = torch.randn(T, 64, generator=self.gen)
        positions = torch.cat([torch.arange(c, c + n) for n, c in requests])
        return (_common_metadata(requests, self.rows), build_metadata(requests, self.rows, BLOCK), hidden,
                positions)


STEPS = [(19, 7), (1, 1), (1, 1), (1, 1)]


def test_plugin_replaces_vllm_mla_and_shares_its_weights(vllm_setup):
    from mla_graph.vllm_plugin.layer import MLAGraphAttention
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    _, layers, _ = vllm_setup
    ours, theirs = layers["plugin"].mla_attn, layers["vllm"].mla_attn
    assert type(ours) is MLAGraphAttention and type(theirs) is MultiHeadLatentAttentionWrapper
    assert set(ours._lowered) == {"prefill", "mixed", "decode"}
    assert {m.target.name for m in ours._lowered.values()} == {"cpu"}     # vLLM's CPU platform: the default
    # the lowered graphs read vLLM's tensors: same storage, fused_qkv_a_proj split by row views
    graph_weights = {n: t for g in ours._lowered["decode"].graphs.values() for n, t in g.state_dict().items()}
    fused = ours.fused_qkv_a_proj.weight
    assert graph_weights["q_a_proj.weight"].data_ptr() == fused.data_ptr()
    assert graph_weights["kv_a_proj_with_mqa.weight"].data_ptr() == fused[32:].data_ptr()
    for name in ("q_b_proj", "kv_b_proj", "o_proj", "kv_a_layernorm", "q_a_layernorm"):
        assert graph_weights[f"{name}.weight"].data_ptr() == getattr(ours, name).weight.data_ptr(), name
    # vLLM's CPU linear method, and vllm-ascend's NZ cast, leave the tensors the graphs read alone
    from mla_graph.vllm_plugin.ascend import KEEP_ND
    from mla_graph.vllm_plugin.versions import vllm_support
    for name in ("fused_qkv_a_proj", "q_b_proj", "kv_b_proj", "o_proj"):
        linear = getattr(ours, name)
        assert getattr(linear, vllm_support().skip_relayout_attr) is True and getattr(linear, KEEP_ND) is True, name
    # no vLLM attention impl and no W_UK/W_UV copies on the plugin's side
    assert not hasattr(ours.mla_attn, "W_UV") and hasattr(theirs.mla_attn, "W_UV")
    # vLLM's own layer runs the pinned CPU_MLA although its backend was chosen as on a CPU with AMX
    assert theirs.mla_attn.attn_backend.get_name() == "CPU_MLA"


def test_supported_vllm_versions_and_their_cpu_linear_flag():
    from mla_graph.vllm_plugin.versions import UnsupportedVllmVersion, vllm_support

    assert vllm_support("0.30.0").skip_relayout_attr == "skip_weight_relayout"
    assert vllm_support("0.30.1+cpu").series == "0.30"
    assert vllm_support("0.32.0").skip_relayout_attr == "_cpu_skip_gemm_dispatch"
    for unknown in ("0.23.0", "0.29.3", "0.31.0", "0.33.0", "dev"):   # 0.23.0: vllm-ascend 0.23.0.post1's
        with pytest.raises(UnsupportedVllmVersion, match=f"knows the MLA layer of vLLM 0.30.x, 0.32.x, but the "
                                                         f"installed vLLM is '{unknown}'"):
            vllm_support(unknown)


def test_unknown_vllm_version_fails_at_plugin_start_up(monkeypatch):
    from vllm.model_executor.custom_op import op_registry_oot

    from mla_graph.vllm_plugin.versions import UnsupportedVllmVersion

    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    monkeypatch.setenv("MLA_GRAPH_VLLM", "1")
    before = dict(op_registry_oot)
    with pytest.raises(UnsupportedVllmVersion, match="installed vLLM is '0.31.0'"):
        register()
    assert op_registry_oot == before


def _common_metadata(requests, rows, decode_tokens=1):
    """vLLM's CommonAttentionMetadata for requests (new, cached) with block table rows."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    ours = build_metadata(requests, rows, BLOCK, decode_tokens=decode_tokens)
    seq_lens = ours.seq_lens
    return CommonAttentionMetadata(
        query_start_loc=ours.query_start_loc, query_start_loc_cpu=ours.query_start_loc.clone(),
        seq_lens=seq_lens, num_reqs=len(requests), num_actual_tokens=ours.num_tokens,
        max_query_len=max(n for n, _ in requests), max_seq_len=int(seq_lens.max()),
        block_table_tensor=ours.block_table, slot_mapping=ours.slot_mapping,
        seq_lens_cpu_upper_bound=seq_lens.clone())


def test_metadata_of_speculative_verification_steps():
    """Under speculative decoding vLLM orders requests of at most 1 + k new tokens first (its
    spec-as-decode reorder threshold): they become multi-token decodes."""
    from mla_graph.vllm_plugin.translate import metadata_from_common

    requests, rows = [(4, 20), (1, 9), (2, 30), (12, 0)], [[1, 2], [3], [4, 5], [6]]
    md = metadata_from_common(_common_metadata(requests, rows, decode_tokens=4), decode_threshold=4)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.phase) == (3, 7, 1, "multi_mixed")
    md.validate()
    decodes = metadata_from_common(_common_metadata(requests[:3], rows[:3], decode_tokens=4), decode_threshold=4)
    assert (decodes.num_decode_tokens, decodes.phase) == (7, "multi_decode")
    with pytest.raises(ValueError, match="not ordered decodes first .* reorder_batch_threshold must be 1"):
        metadata_from_common(_common_metadata(requests, rows, decode_tokens=4))


def _run(config, layer, common, hidden, positions, cache, call=None):
    """One step of a vLLM attention layer: bind the cache, build its backend's metadata, call it
    (or `call`, the layer compiled)."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    attn = layer.mla_attn.mla_attn
    attn.bind_kv_cache(cache)
    with set_current_vllm_config(config):
        builder = attn.get_attn_backend().get_builder_cls()(attn.get_kv_cache_spec(config), [attn.layer_name],
                                                          config, torch.device("cpu"))
        metadata = builder.build(0, common)
        with set_forward_context({attn.layer_name: metadata}, config,
                                 slot_mapping={attn.layer_name: common.slot_mapping}):
            return (layer if call is None else call)(positions, hidden.clone(), None)


def _vllm_can_decode() -> bool:
    # CPU_MLA decodes with a kernel of vLLM's CPU build (vllm._C); the PyPI wheel is CUDA-built
    return hasattr(torch.ops._C, "mla_decode_kvcache")


def _hf_oracle(mla_config, weights):
    """Hugging Face's DeepseekV3Attention with the same weights: an outside implementation."""
    hf, rotary = hf_attention(mla_config, torch.float32)
    hf.load_state_dict(_plain_layer(mla_config, weights).state_dict())
    return hf.requires_grad_(False), rotary


def test_plugin_matches_hugging_face_reference_target_and_vllm_over_prefill_and_decode(vllm_setup):
    """Every step, prefill and decode, against Hugging Face's attention over each request's whole
    history (an independent implementation, whatever vLLM build is installed), against plugin-off
    vLLM where vLLM can decode on this build, and against our reference target (the plugin runs
    its default, the cpu target, over vLLM's tensors and cache)."""
    config, layers, weights = vllm_setup
    if not _vllm_can_decode():   # said out loud: the comparison with plugin-off vLLM is prefill only
        warnings.warn("vLLM's CPU decode kernel (torch.ops._C.mla_decode_kvcache, CPU builds only) is "
                      "absent: decode steps are compared with Hugging Face and our reference target, "
                      "not with plugin-off vLLM", stacklevel=1)
    mla_config = config_from_hf(config.model_config.hf_config)
    assert mla_config.softmax_scale == pytest.approx(layers["vllm"].mla_attn.mla_attn.scale, rel=1e-7)
    hf, rotary = _hf_oracle(mla_config, weights)

    # our reference target over an independent copy of the weights, in our own cache layout
    reference = lower(_plain_layer(mla_config, weights), "reference", block_size=BLOCK)
    steps = Steps(mla_config)
    ref_cache = steps.oracle_cache
    history = [torch.zeros(0, 64) for _ in STEPS[0]]   # each request's hidden states so far
    # vLLM's layout: [num_blocks, 1, block_size, kv_lora_rank + rope] per layer
    caches = {name: torch.zeros(12, 1, BLOCK, L + R) for name in ("vllm", "plugin")}
    for step, shape in enumerate(STEPS):
        common, metadata, hidden, positions = steps.next(shape)
        out = _run(config, layers["plugin"], common, hidden, positions, caches["plugin"])
        starts = metadata.query_start_loc.tolist()
        for b in range(len(history)):
            history[b] = torch.cat([history[b], hidden[starts[b]:starts[b + 1]]])
            with torch.no_grad():
                hf_rows = hf_prefill(hf, rotary, history[b])[-(starts[b + 1] - starts[b]):]
            torch.testing.assert_close(out[starts[b]:starts[b + 1]], hf_rows, **LAYER_TOL,
                                       msg=lambda m: f"step {step}, request {b} vs Hugging Face: {m}")
        expected = reference(hidden, positions, ref_cache, metadata)
        torch.testing.assert_close(out, expected, **LAYER_TOL, msg=lambda m: f"step {step}: {m}")
        # the plugin wrote into vLLM's cache, in place: same contents as our reference cache
        torch.testing.assert_close(caches["plugin"][:, 0, :, :L], ref_cache.latent[:, :, 0], **TOL)
        torch.testing.assert_close(caches["plugin"][:, 0, :, L:], ref_cache.rope[:, :, 0], **TOL)

        if step == 0 or _vllm_can_decode():
            out_vllm = _run(config, layers["vllm"], common, hidden, positions, caches["vllm"])
            torch.testing.assert_close(out, out_vllm, **LAYER_TOL, msg=lambda m: f"step {step} vs vLLM: {m}")
            theirs = caches["vllm"][:, 0]
            torch.testing.assert_close(caches["plugin"][:, 0, :, :L], theirs[..., :L], **TOL)
            # vLLM keeps k_pe's rotated pairs interleaved; mla-graph de-interleaved (the NPU layout)
            deinterleaved = torch.cat([theirs[..., L::2], theirs[..., L + 1::2]], dim=-1)
            torch.testing.assert_close(caches["plugin"][:, 0, :, L:], deinterleaved, **TOL)


def test_vllm_compiles_around_the_layer_and_runs_it_every_step(vllm_setup):
    """vLLM's default mode: Dynamo traces the model once, in a warm-up step with no attention
    metadata, with every guard dropped (vLLM's compile wrapper), and vLLM splits the graph at its
    splitting ops. The layer must trace to one opaque op that vLLM splits at, so later steps
    compute (traced Python baked the warm-up's zeros into every step)."""
    from vllm.compilation.backends import split_graph
    from vllm.config import CompilationConfig, CompilationMode, set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from mla_graph.vllm_plugin.op import QUALNAME

    config, layers, weights = vllm_setup
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    compiled = torch.compile(layers["plugin"], fullgraph=True, dynamic=False, backend=backend,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    hidden, positions = torch.randn(8, 64), torch.arange(8)
    torch._dynamo.mark_dynamic(hidden, 0)   # vLLM marks the token dim dynamic
    torch._dynamo.mark_dynamic(positions, 0)
    with set_current_vllm_config(config), set_forward_context(None, config):
        warm_up = compiled(positions, hidden, None)
    assert warm_up.shape == (8, 64) and not warm_up.any()
    (gm,) = traced
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and QUALNAME.replace("::", ".") in str(n.target)]
    assert len(ops) == 1, gm.code

    # vLLM's default splitting ops (its own config resolution) include the op, so it runs eagerly
    resolved = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    resolved.set_splitting_ops_for_v1(all2all_backend="naive")
    assert QUALNAME in resolved.splitting_ops and "vllm::unified_mla_attention_with_output" in resolved.splitting_ops
    _, pieces = split_graph(gm, resolved.splitting_ops)
    split = [p for p in pieces if p.is_splitting_graph]
    assert len(split) == 1 and any(QUALNAME.replace("::", ".") in str(n.target) for n in split[0].graph.graph.nodes)

    mla_config = config_from_hf(config.model_config.hf_config)
    reference = lower(_plain_layer(mla_config, weights), "reference", block_size=BLOCK)
    steps = Steps(mla_config, seed=2)
    cache = torch.zeros(12, 1, BLOCK, L + R)
    for step, shape in enumerate(STEPS):
        common, metadata, hidden, positions = steps.next(shape)
        out = _run(config, layers["plugin"], common, hidden, positions, cache, call=compiled)
        expected = reference(hidden, positions, steps.oracle_cache, metadata)
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"compiled, step {step}: {m}")
    assert len(traced) == 1   # traced once, as vLLM does


def _count_recuts(layer) -> list[int]:
    """Count every recut of a derived weight of the plugin layer's lowered modules from now on."""
    calls = [0]
    modules = {id(m): m for m in layer._lowered.values()}.values()
    for derived in [d for m in modules for d in m._derived]:
        def counted(source, derive=derived.derive):
            calls[0] += 1
            return derive(source)
        derived.derive = counted
    return calls


def test_derived_weights_follow_every_way_vllm_writes_weights(vllm_setup):
    """The npu target derives W_UK/W_UV from kv_b_proj. vLLM writes weights through `.data`
    (its loaders; RL frameworks push weights with model.load_weights or collective_rpc the same
    way), which autograd's version counter does not see. Each write must reach the next step's
    output, numerically against the plain layer with the same weights, and a step after no write
    must recut nothing."""
    config, layers, weights = vllm_setup
    layer = layers["npu"].mla_attn
    assert {m.target.name for m in layer._lowered.values()} == {"npu"}
    derived = [d for m in {id(m): m for m in layer._lowered.values()}.values() for d in m._derived]
    assert {d.buffer.rsplit("_", 1)[-1] for d in derived} >= {"uk", "uv"}, [d.buffer for d in derived]
    mla_config = config_from_hf(config.model_config.hf_config)
    current = dict(weights)
    steps = Steps(mla_config, num_blocks=24, seed=4)
    cache = torch.zeros(24, 1, BLOCK, L + R)
    rtol, atol = LAYER_TOLERANCES[torch.float32]
    gen = torch.Generator().manual_seed(5)

    def step(what: str, recuts: int) -> None:
        calls = _count_recuts(layer)
        common, metadata, hidden, positions = steps.next((1, 1) if steps.lens[0] else (19, 7))
        out = _run(config, layers["npu"], common, hidden, positions, cache)
        expected = _plain_layer(mla_config, current)(hidden, positions, steps.oracle_cache, metadata)
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, msg=lambda m: f"after {what}: {m}")
        assert calls[0] == recuts, f"after {what}: {calls[0]} derived weights recut, expected {recuts}"

    def new_value(name: str) -> torch.Tensor:
        current[name] = torch.randn(weights[name].shape, generator=gen) * 0.2 + (1.0 if "layernorm" in name else 0)
        return current[name]

    step("loading", 0)
    step("a step without writes", 0)
    # vLLM's loaders (ColumnParallelLinear's, default_weight_loader): `.data.copy_`, no version bump
    for name in ("kv_b_proj.weight", "q_b_proj.weight", "kv_a_layernorm.weight"):
        param = layer.get_parameter(name)
        version = param._version
        param.weight_loader(param, new_value(name))
        assert param._version == version   # invisible to a version check
    lowered = dict(layer._lowered)
    step("vLLM's weight loaders", len(derived))   # recut once, before the step
    assert layer._lowered == lowered              # recut in place, not lowered again
    step("the step after", 0)
    # by hand through .data, then said so
    layer.kv_b_proj.weight.data.copy_(new_value("kv_b_proj.weight"))
    layer.mark_weights_written()
    step("a .data write marked written", len(derived))
    # in place, as a tensor op: the version check
    with torch.no_grad():
        layer.kv_b_proj.weight.copy_(new_value("kv_b_proj.weight"))
    step("an in-place write", sum(d.source.data_ptr() == layer.kv_b_proj.weight.data_ptr() for d in derived))
    # vLLM's reload (layerwise: loaders into copies, `.data.copy_` back, then the post-load hook)
    layer.kv_b_proj.weight.data.copy_(new_value("kv_b_proj.weight"))
    calls = _count_recuts(layer)
    layer.mla_attn.process_weights_after_loading(torch.float32)
    assert calls[0] == len(derived)
    step("a reload", 0)
    # a weight given new storage: the graphs alias the old one, so the layer is lowered again
    layer.kv_b_proj.weight.data = new_value("kv_b_proj.weight").clone()
    layer.mla_attn.process_weights_after_loading(torch.float32)
    assert layer._lowered["decode"] is not lowered["decode"]
    step("new storage", 0)


@pytest.mark.parametrize("config, dtype", [(V2_LITE_NPU, torch.bfloat16), (V3_TINY, torch.float32)],
                         ids=["kernels-bf16", "fallbacks-fp32"])
@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_npu_target_on_vllms_single_cache_tensor(config, dtype, phase):
    """vLLM allocates one [blocks, block_size, 1, latent + rope] tensor; the plugin hands the npu
    target two row-strided views of it. bf16 at the kernels' dims runs npu_kv_rmsnorm_rope_cache
    and FIA; fp32 tiny dims run the scatter and aten attention fallbacks. Equal to the reference
    target on a contiguous copy, written into the one tensor, every other byte untouched."""
    layer = randomize(MLAAttention(config, dtype=dtype), std=0.02)
    batch = random_batch(layer, PHASE_BATCHES[phase], block_size=16, seed=6)
    Lc, Rc = config.kv_lora_rank, config.qk_rope_head_dim
    one = torch.cat([batch.cache.latent, batch.cache.rope], -1)           # [blocks, 16, 1, L + R]
    before = one.clone()
    views = latent_cache_view(one, Lc, Rc)
    assert views.latent.data_ptr() == one.data_ptr() and views.rope.data_ptr() == one[..., Lc:].data_ptr()
    npu = lower(layer, "npu", [phase], block_size=16)
    code = npu.graphs[phase].code
    assert "npu_kv_rmsnorm_rope_cache" in code   # writes the cache, in every phase
    assert ("npu_fused_infer_attention_score" in code) == (dtype == torch.bfloat16), code
    expected_cache = batch.cache.clone()
    expected = lower(layer, "reference", [phase], block_size=16)(batch.hidden_states, batch.positions,
                                                                  expected_cache, batch.metadata)
    out = npu(batch.hidden_states, batch.positions, views, batch.metadata)
    rtol, atol = LAYER_TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    written = torch.zeros(one.shape[0] * one.shape[1], dtype=torch.bool)
    written[batch.metadata.slot_mapping] = True
    written = written.view(one.shape[0], one.shape[1])
    torch.testing.assert_close(one[written], torch.cat([expected_cache.latent, expected_cache.rope], -1)[written],
                               rtol=rtol, atol=atol)
    assert not torch.equal(one[written], before[written])
    assert torch.equal(one[~written], before[~written])   # bit for bit


def test_register_does_nothing_when_disabled(monkeypatch):
    from vllm.model_executor.custom_op import op_registry_oot

    monkeypatch.delenv("MLA_GRAPH_VLLM", raising=False)
    before = dict(op_registry_oot)
    assert register() is False
    assert op_registry_oot == before
    monkeypatch.setenv("MLA_GRAPH_VLLM", "maybe")
    with pytest.raises(ValueError, match="MLA_GRAPH_VLLM='maybe'"):
        register()


def test_plugin_wins_over_another_mla_replacement_in_either_order(monkeypatch, caplog):
    """vllm-ascend replaces the same pluggable layer (older releases through CustomOp.register_oot,
    newer through PluggableLayer.register_oot; one registry). vLLM's registry keeps the first and
    asserts on the second, so the winner would follow plugin load order. With MLA_GRAPH_VLLM=1
    ours wins either way, the other registration does not crash, and the log says so."""
    from vllm.model_executor.custom_op import CustomOp, PluggableLayer, op_registry_oot
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    from mla_graph.vllm_plugin.layer import MLAGraphAttention

    name = "MultiHeadLatentAttentionWrapper"

    class AscendMultiHeadLatentAttention(MultiHeadLatentAttentionWrapper):
        pass

    monkeypatch.setenv("MLA_GRAPH_VLLM", "1")
    caplog.set_level(logging.INFO, logger="mla_graph.vllm")
    try:
        # the other first: replaced
        CustomOp.register_oot(_decorated_op_cls=AscendMultiHeadLatentAttention, name=name)
        assert register() is True
        assert op_registry_oot[name] is MLAGraphAttention
        assert (f"{__name__}.test_plugin_wins_over_another_mla_replacement_in_either_order.<locals>."
                f"AscendMultiHeadLatentAttention was registered as the out-of-tree {name}; MLA_GRAPH_VLLM=1 "
                f"replaces it with mla-graph's") in caplog.text
        # the other after: let through, ours stays
        caplog.clear()
        assert PluggableLayer.register_oot(_decorated_layer_cls=AscendMultiHeadLatentAttention,
                                           name=name) is AscendMultiHeadLatentAttention
        assert CustomOp.register_oot(name=name)(AscendMultiHeadLatentAttention) is AscendMultiHeadLatentAttention
        assert MultiHeadLatentAttentionWrapper.register_oot(AscendMultiHeadLatentAttention)
        assert op_registry_oot[name] is MLAGraphAttention
        assert caplog.text.count(f"AscendMultiHeadLatentAttention registers as the out-of-tree {name} too; "
                                 f"mla-graph's MLAGraphAttention stays (MLA_GRAPH_VLLM=1)") == 3
        # other names register as before, duplicates still refused
        PluggableLayer.register_oot(_decorated_layer_cls=AscendMultiHeadLatentAttention, name="SomeOtherLayer")
        assert op_registry_oot["SomeOtherLayer"] is AscendMultiHeadLatentAttention
        with pytest.raises(AssertionError, match="Duplicate layer name: SomeOtherLayer"):
            PluggableLayer.register_oot(_decorated_layer_cls=AscendMultiHeadLatentAttention, name="SomeOtherLayer")
    finally:
        op_registry_oot.pop(name, None)
        op_registry_oot.pop("SomeOtherLayer", None)
    # without ours registered, the registry behaves as vLLM's
    CustomOp.register_oot(_decorated_op_cls=AscendMultiHeadLatentAttention, name=name)
    assert op_registry_oot.pop(name) is AscendMultiHeadLatentAttention


def test_plugin_found_through_entry_point_in_fresh_interpreter():
    script = textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from importlib.metadata import entry_points
        names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
        print("ENTRY", names.get("mla_graph"))
        from vllm.model_executor.custom_op import op_registry_oot
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        cls = op_registry_oot.get("MultiHeadLatentAttentionWrapper")
        print("REPLACED", cls and f"{cls.__module__}.{cls.__qualname__}")
    """)
    env = dict(os.environ, MLA_GRAPH_VLLM="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ENTRY mla_graph.vllm_plugin:register" in run.stdout
    assert "REPLACED mla_graph.vllm_plugin.layer.MLAGraphAttention" in run.stdout
    assert "mla_graph.vllm mla-graph: replaced vLLM's pluggable layer 'multi_head_latent_attention'" in run.stderr


def _target_env(monkeypatch, env, decode_env):
    """MLA_GRAPH_VLLM_TARGET / MLA_GRAPH_VLLM_DECODE_TARGET set to the values given, or unset for None."""
    from mla_graph.vllm_plugin.targets import DECODE_TARGET_ENV, TARGET_ENV

    for name, value in ((TARGET_ENV, env), (DECODE_TARGET_ENV, decode_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("env, decode_env, extra, device, expected", [
    (None, None, None, "cpu", ("cpu", "cpu")),                     # vLLM's CPU platform: the fastest target
    (None, None, None, "npu", ("npu", "npu")),                     # vllm-ascend: eager kernels
    (None, None, None, "cuda", ("reference", "reference")),        # no target of its own
    (None, None, {"mla_graph": {"target": "npu"}}, "cpu", ("npu", "npu")),
    ("reference", None, {"mla_graph": {"target": "npu"}}, "npu", ("reference", "reference")),   # the env var wins
    (None, "torchair", None, "npu", ("npu", "torchair")),          # beside vllm-ascend 0.30: env vars only
    (None, "torchair", {"mla_graph": {"decode_target": "reference"}}, "npu", ("npu", "torchair")),
    ("npu", None, {"mla_graph": {"decode_target": "reference"}}, "cpu", ("npu", "reference")),
    ("torchair", None, None, "cpu", ("torchair", "torchair")),
], ids=["cpu-default", "npu-default", "other-platform-default", "config-target", "env-over-config", "decode-env",
        "decode-env-over-config", "decode-target", "env-target-every-phase"])
def test_target_choice_from_env_and_additional_config(monkeypatch, env, decode_env, extra, device, expected):
    from mla_graph.vllm_plugin.targets import choose_targets

    _target_env(monkeypatch, env, decode_env)
    base, decode = expected
    assert choose_targets(extra, device) == {"prefill": base, "mixed": base, "decode": decode}


@pytest.mark.parametrize("env, decode_env, extra, device, why", [
    (None, None, None, "cpu", "the CPU platform's default: the fastest target there (per-request GEMM attention) "
                              "(vLLM platform 'cpu')"),
    (None, None, None, "cuda", "the default on a platform with no target of its own (vLLM platform 'cuda')"),
    ("npu", None, None, "cpu", "MLA_GRAPH_VLLM_TARGET=npu"),
    (None, "torchair", {"mla_graph": {"target": "npu"}}, "cpu",
     "additional_config['mla_graph']['target']; decode: MLA_GRAPH_VLLM_DECODE_TARGET=torchair"),
], ids=["cpu-default", "other-default", "env", "config-and-decode-env"])
def test_the_log_says_where_the_targets_came_from(monkeypatch, env, decode_env, extra, device, why):
    from mla_graph.vllm_plugin.targets import why_targets

    _target_env(monkeypatch, env, decode_env)
    assert why_targets(extra, device) == why


def test_target_choice_rejects_unknown_targets_and_the_removed_torchair_graph_mode(monkeypatch):
    from mla_graph.vllm_plugin.targets import DECODE_TARGET_ENV, TARGET_ENV, choose_targets

    monkeypatch.delenv(DECODE_TARGET_ENV, raising=False)
    monkeypatch.setenv(TARGET_ENV, "gpu")
    with pytest.raises(ValueError, match="mla-graph target 'gpu' \\(from MLA_GRAPH_VLLM_TARGET or "
                                         "additional_config\\['mla_graph'\\]\\) is not a target; known: reference, npu, "
                                         "torchair"):
        choose_targets(None, "cpu")
    monkeypatch.delenv(TARGET_ENV)
    with pytest.raises(ValueError, match="mla-graph decode target 'fast' .* is not a target"):
        choose_targets({"mla_graph": {"decode_target": "fast"}}, "npu")
    # vllm-ascend's torchair graph mode is gone (v0.12.0rc1): the key says what to set instead
    with pytest.raises(ValueError, match="torchair_graph_config.*removed in vllm-ascend v0.12.0rc1.*"
                                         "MLA_GRAPH_VLLM_DECODE_TARGET=torchair"):
        choose_targets({"torchair_graph_config": {"enabled": True}}, "npu")


def test_tensor_parallel_all_reduce_only_with_more_than_one_rank(vllm_setup, monkeypatch):
    """With tp_size 1 (vLLM's one-rank path) the layer's output is returned as computed: no
    all-reduce. With tp_size > 1 each rank holds a share of the heads and a partial o_proj sum:
    forward all-reduces it once per call and returns the reduced tensor. reduce_results=False
    (vLLM's o_proj leaving the reduction to its caller) skips it."""
    import mla_graph.vllm_plugin.layer as layer_module

    config, layers, _ = vllm_setup
    ours = layers["plugin"].mla_attn
    reduced = []

    def all_reduce(partial):
        reduced.append(partial.clone())
        return partial * 2   # as two ranks with equal partial sums would give

    monkeypatch.setattr(layer_module, "tensor_model_parallel_all_reduce", all_reduce)
    steps = Steps(config_from_hf(config.model_config.hf_config), seed=8)
    common, _, hidden, positions = steps.next((19, 7))
    cache = torch.zeros(12, 1, BLOCK, L + R)
    single = _run(config, layers["plugin"], common, hidden, positions, cache.clone())
    assert ours.tp_size == 1 and ours.reduce_results
    assert not reduced, f"tp_size 1: the output was all-reduced {len(reduced)} time(s)"
    monkeypatch.setattr(ours, "tp_size", 2)
    out = _run(config, layers["plugin"], common, hidden, positions, cache.clone())
    assert len(reduced) == 1, f"tp_size 2: the output was all-reduced {len(reduced)} time(s), expected once"
    assert torch.equal(reduced[0], single), "the all-reduce must receive this rank's output"
    assert torch.equal(out, 2 * single), "forward must return the all-reduced output"
    monkeypatch.setattr(ours, "reduce_results", False)
    assert torch.equal(_run(config, layers["plugin"], common, hidden, positions, cache.clone()), single)
    assert len(reduced) == 1, "reduce_results=False: the output was all-reduced anyway"
