"""torch.compile(model, backend="mla_graph") on whole models.

- torchair targets: a decode step of a 2-layer model is one graph per batch bucket (both layers'
  lowered decode graphs inlined with the code between them), compiled once per bucket, never
  again, and accepted by torchair's own GE converters (torch-npu 2.13.0 wheel).
- Hugging Face models converted by mla_graph.hf: generate() through torch.compile gives the
  unconverted model's tokens.
The oracle is the same model run eagerly (the plain definition), or transformers' own attention.
"""
import logging

import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V2_LITE_TINY, V3_NPU, changed_rows, randomize
from wheels import torch_npu_wheel

from mla_graph import contract
from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, PagedLatentCache, build_metadata, positions_for
from mla_graph.cache import PADDING_BLOCK
from mla_graph.compile_backend import mla_graph_backend
from mla_graph.runtime.whole_step import compiled_steps
from mla_graph.metadata import MetadataError

BS = 16
FIA = "air.npu_fused_infer_attention_score.default"
PROLOG = "npu.npu_mla_prolog_v3_functional.default"


class Decoder(torch.nn.Module):
    """Two MLA layers with residuals and a gated activation between them (code the inner backend
    gets), each layer with its own paged cache, as a decoder stack uses them."""

    def __init__(self, config, dtype):
        super().__init__()
        self.attn = torch.nn.ModuleList(MLAAttention(config, dtype=dtype) for _ in range(2))
        self.gate = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=dtype))

    def forward(self, x, positions, caches, metadata):
        h = x
        for attn, cache in zip(self.attn, caches):
            h = h + attn(h, positions, cache, metadata)
            h = h + torch.nn.functional.silu(h) * self.gate
        return h


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


PROMPTS = [20, 37, 9, 30, 5]


def run_steps(model, config, dtype, plan, seed=0):
    """A prefill of five requests, then decode steps of the first `live` requests; both layers'
    caches start from the same random bytes. Returns outputs, caches and each step's slots."""
    caches = [PagedLatentCache.allocate(config, 48, BS, dtype=dtype, shuffle_blocks=True, seed=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    for cache in caches:
        for part in (cache.latent, cache.rope):
            part.copy_(torch.randn(part.shape, generator=gen).to(dtype))
    rows = [[] for _ in PROMPTS]
    gen = torch.Generator().manual_seed(seed)
    outputs, slots = [], []
    for step, live in enumerate(plan):
        requests = [(p, 0) for p in PROMPTS] if step == 0 else [(1, PROMPTS[i] + step - 1) for i in range(live)]
        for row, (n, c) in zip(rows, requests):
            caches[0].allocator.grow(row, n + c, BS)
        md = build_metadata(requests, rows[: len(requests)], BS)
        x = torch.randn(md.num_tokens, config.hidden_size, generator=gen).to(dtype)
        with torch.no_grad():
            outputs.append(model(x, positions_for(requests), caches, md))
        slots += md.slot_mapping.tolist()
    return outputs, caches, slots


def model_for(config, dtype):
    return randomize(Decoder(config, dtype), std=0.02 if config in (V3_NPU, V2_LITE_NPU) else 0.2)


@pytest.fixture(scope="module")
def toolchain():
    from mla_graph import ascend_toolchain as at
    return at.load(torch_npu_wheel())


@pytest.mark.parametrize("config, target", [(V3_NPU, "torchair"), (V2_LITE_NPU, "torchair-multistream")],
                         ids=["v3-torchair", "v2lite-multistream"])
def test_decode_step_is_one_graph_per_bucket(config, target, toolchain, caplog):
    from mla_graph import ascend_toolchain as at

    dtype = torch.bfloat16
    model = model_for(config, dtype)
    plan = [5, 5, 5, 3, 3, 2, 4]          # prefill, then decodes of 5, 3, 2 and 4 requests
    want, want_caches, slots = run_steps(model, config, dtype, plan)
    backend_calls = []

    def backend(gm, example_inputs, **kwargs):
        backend_calls.append(len(gm.graph.nodes))
        return mla_graph_backend(gm, example_inputs, **kwargs)

    before = {s.serial for s in compiled_steps()}
    compiled = torch.compile(model, backend=backend, dynamic=True, options={
        "target": target, "inner_backend": "eager", "target_options": {"graph_batch_sizes": [2, 4, 8]}})
    with caplog.at_level(logging.INFO, logger="mla_graph.compile"):
        got, got_caches, _ = run_steps(compiled, config, dtype, plan)

    rtol, atol = TOL[dtype]
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")
    owned = [b for b in range(want_caches[0].num_blocks) if b != PADDING_BLOCK]
    for g, w in zip(got_caches, want_caches):
        for part in ("latent", "rope"):
            torch.testing.assert_close(getattr(g, part)[owned], getattr(w, part)[owned], rtol=rtol, atol=atol)
            # padded rows wrote only into the padding block; real tokens only their own slots
            stray = set(changed_rows(getattr(w, part), getattr(g, part))) - {
                PADDING_BLOCK * BS + i for i in range(BS)}
            assert stray <= set(slots), sorted(stray - set(slots))

    # one graph from Dynamo for every step (no recompile), one runner for it
    assert len(backend_calls) == 1, backend_calls
    (step,) = [s for s in compiled_steps() if s.serial not in before]
    assert (step.split_steps, step.whole_steps) == (1, 6)   # the prefill split at the layers
    assert step.buckets_run == [8, 8, 4, 4, 2, 4]
    assert len(step.graphs) == 3, "one compiled graph per bucket, none compiled twice"
    assert all(m.runners["decode"].buckets_run == [] for m in step.lowered), "no layer ran its own graph"
    names = [fn for fn, _ in step.step_inputs]
    per_layer = [i for i in graph_meta(step.lowered[0].graphs["decode"]).inputs if i not in contract.INPUTS]
    assert len(names) == len(per_layer) > 0, "per-step inputs are computed once for both layers"
    assert "decode steps: 2 MLA layer(s) inlined" in caplog.text

    for gm in step.graphs:
        ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert ops.count(FIA) == 2, "both layers' attention in the one graph"
        assert ops.count(PROLOG) == (2 if config is V3_NPU else 0)
        assert not any(op.startswith("mla.") for op in ops)
        for node in gm.graph.nodes:     # static shapes
            if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
                assert all(isinstance(s, int) for s in node.meta["val"].shape), node
        conversion = at.convert_to_ge(gm, toolchain=toolchain)
        errors = [f for f in conversion.findings if f.severity == "error"]
        assert conversion.complete and not errors, errors


def test_static_batch_runs_at_its_own_size_then_buckets():
    """Without dynamic=True Dynamo first specialises the token count: that graph runs at its own
    size. The first other batch size recompiles once with it symbolic; from then on, buckets."""
    config, dtype = V2_LITE_TINY, torch.float32
    model = model_for(config, dtype)
    plan = [5, 3, 3, 5, 2, 4, 3]
    want, _, _ = run_steps(model, config, dtype, plan)
    before = {s.serial for s in compiled_steps()}
    compiled = torch.compile(model, backend="mla_graph", options={
        "target": "torchair", "inner_backend": "eager", "target_options": {"graph_batch_sizes": [2, 4, 8]}})
    # the prefill eagerly, so that Dynamo's first graph is a decode step of 3
    callers = iter([model] + [compiled] * (len(plan) - 1))
    got, _, _ = run_steps(lambda *args: next(callers)(*args), config, dtype, plan)
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m: f"step {step}: {m}")
    steps = [s for s in compiled_steps() if s.serial not in before]
    runs = [(s.plan.padded, s.buckets_run, len(s.graphs)) for s in steps]
    # decodes of 3 at their own size (one graph), then symbolic: 5 -> 8, 2, 4, 3 -> 4 (three graphs)
    assert runs == [(False, [3, 3], 1), (True, [8, 2, 4, 4], 3)], runs


def test_checked_mode_rejects_a_bad_step_before_writing(monkeypatch):
    """Checked mode checks the step's metadata once, before the whole-step graph writes any cache."""
    monkeypatch.setenv("MLA_GRAPH_CHECKED", "1")
    config, dtype = V2_LITE_TINY, torch.float32
    model = model_for(config, dtype)
    compiled = torch.compile(model, backend="mla_graph", dynamic=True, options={
        "target": "torchair", "inner_backend": "eager", "target_options": {"graph_batch_sizes": [4]}})
    caches = [PagedLatentCache.allocate(config, 8, BS) for _ in range(2)]
    rows = [caches[0].allocator.grow([], 6, BS), caches[0].allocator.grow([], 9, BS), caches[0].allocator.grow([], 3, BS)]
    requests = [(1, 5), (1, 8), (1, 2)]
    md = build_metadata(requests, rows, BS)
    x = torch.randn(3, config.hidden_size)
    compiled(x, positions_for(requests), caches, md)     # a good step first: the graph exists
    md.slot_mapping[1] = md.slot_mapping[0]              # two requests write one slot
    before = [c.clone() for c in caches]
    with pytest.raises(MetadataError, match="slot"):
        compiled(x, positions_for(requests), caches, md)
    for b, c in zip(before, caches):
        assert torch.equal(b.latent, c.latent) and torch.equal(b.rope, c.rope)


def test_converted_hf_model_generates_through_torch_compile():
    """A converted Hugging Face model under torch.compile(backend="mla_graph"): every layer's
    attention is an mla::layer node the backend lowers; tokens equal the unconverted model's."""
    import copy

    from test_hf import generate, padded_batch, tiny_hf
    from mla_graph.hf import convert

    model = tiny_hf("dense")
    ids, mask = padded_batch([11, 5, 8])
    want = generate(model, ids, mask, do_sample=False).sequences
    converted = convert(copy.deepcopy(model), target="cpu", block_size=BS)
    lowered = []
    from mla_graph.compile_backend import backend as backend_module
    original = backend_module.lowered_for

    def recording(layer, *args, **kwargs):
        module = original(layer, *args, **kwargs)
        lowered.append(module)
        return module
    backend_module.lowered_for = recording
    try:
        converted.forward = torch.compile(converted.forward, backend="mla_graph",
                                          options={"target": "cpu", "inner_backend": "eager"})
        got = generate(converted, ids, mask, do_sample=False).sequences
    finally:
        backend_module.lowered_for = original
    assert torch.equal(got, want), (got, want)
    ran = {id(m) for m in lowered}
    # the backend ran the modules convert() lowered (no second lowering), for both layers
    assert ran == {id(layer.self_attn.lowered) for layer in converted.model.layers}


@pytest.fixture
def counted_derivations():
    """Names of the npu inputs (rope rows, host lengths) each time one is derived from a call."""
    from mla_graph.inputs import derivation
    from mla_graph.passes.npu_lower import ROPE_COS, ROPE_SIN, SEQ_LENS_LIST
    calls, derivations = [], [derivation(inp) for inp in (ROPE_COS, ROPE_SIN, SEQ_LENS_LIST)]
    originals = [d.fn for d in derivations]
    for d, fn in zip(derivations, originals):   # Derivations are frozen: set around it, restored below
        object.__setattr__(d, "fn", lambda fn=fn, name=d.input.name, **kw: calls.append(name) or fn(**kw))
    yield calls
    for d, fn in zip(derivations, originals):
        object.__setattr__(d, "fn", fn)


def test_step_inputs_are_computed_once_per_step(counted_derivations):
    """Layers run one by one (the npu target): the rope rows and host lengths every layer's graph
    reads are computed by the first layer of a step and reused by the second, then computed anew
    for the next step (new positions), or after the positions are written in place."""
    calls = counted_derivations
    config, dtype = V2_LITE_TINY, torch.float32
    model = model_for(config, dtype)
    compiled = torch.compile(model, backend="mla_graph", options={"target": "npu", "inner_backend": "eager"})
    plan = [5, 5, 5]
    want, _, _ = run_steps(model, config, dtype, plan)
    calls.clear()
    got, _, _ = run_steps(compiled, config, dtype, plan)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)
    per_step = len(calls) / len(plan)
    assert calls.count("rope_cos") == calls.count("rope_sin") == len(plan), calls   # not 2 per step
    assert per_step == int(per_step) and calls[: int(per_step)] == calls[int(per_step): 2 * int(per_step)]

    # the same positions tensor written in place: recomputed, not reused stale
    layer = model.attn[0]
    from mla_graph import lower
    lowered = lower(layer, "npu", ["decode"], block_size=BS)
    caches = [PagedLatentCache.allocate(config, 8, BS)]
    rows = [caches[0].allocator.grow([], 6, BS)]
    md = build_metadata([(1, 5)], rows, BS)
    positions, x = positions_for([(1, 5)]), torch.randn(1, config.hidden_size)
    calls.clear()
    lowered(x, positions, caches[0], md)
    lowered(x, positions, caches[0], md)
    assert calls.count("rope_cos") == 1
    positions.copy_(positions)           # a write: the version moves
    lowered(x, positions, caches[0], md)
    assert calls.count("rope_cos") == 2


def test_readme_torch_compile_example_runs():
    """The README's torch.compile example, as written (inductor for the code between the layers);
    its tokens equal the same random model's, unconverted and uncompiled."""
    import pathlib
    import re

    from transformers import DeepseekV3ForCausalLM

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## torch.compile\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md (torch.compile)", "exec"), scope)
    torch.manual_seed(0)
    plain = DeepseekV3ForCausalLM(scope["config"]).eval()
    want = plain.generate(scope["ids"], attention_mask=scope["mask"], max_new_tokens=8, do_sample=False)
    assert torch.equal(scope["out"], want), (scope["out"], want)


@pytest.mark.parametrize("blocks", [4, 2])
def test_more_buckets_than_dynamos_recompile_limit_without_changing_it(blocks):
    """Ten buckets compile ten graphs (Dynamo's default limit is 8 recompiles per function); the
    limits are raised for the runner's own calls only, never process-wide. With rows of 2 blocks,
    the first batch (2 requests) has a block table as wide as its token count: Dynamo's duck sizing
    gives both one symbol, so that graph runs at its own size, and the next batch size recompiles.
    (Rows of 3 blocks would meet the query_start_loc's 2 + 1 the same way.)"""
    config, dtype = V2_LITE_TINY, torch.float32
    model = model_for(config, dtype)
    limits = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)
    sizes = list(range(2, 12))
    compiled = torch.compile(model, backend="mla_graph", dynamic=True, options={
        "target": "torchair", "inner_backend": "eager", "target_options": {"graph_batch_sizes": sizes}})
    before = {s.serial for s in compiled_steps()}
    caches = [PagedLatentCache.allocate(config, 48, BS) for _ in range(2)]
    rows = [caches[0].allocator.grow([], blocks * BS, BS) for _ in range(max(sizes))]
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        requests = [(1, blocks * BS - 1)] * n
        md = build_metadata(requests, rows[:n], BS)
        x = torch.randn(n, config.hidden_size, generator=gen)
        with torch.no_grad():
            got = compiled(x, positions_for(requests), caches, md)
        torch.testing.assert_close(got, model(x, positions_for(requests), [c.clone() for c in caches], md),
                                   rtol=1e-5, atol=2e-5)
    runs = [(s.plan.padded, s.buckets_run, len(s.graphs)) for s in compiled_steps() if s.serial not in before]
    if blocks == 4:
        assert runs == [(True, sizes, len(sizes))]
    else:
        assert runs == [(False, [2], 1), (True, sizes[1:], len(sizes) - 1)]
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit) == limits
