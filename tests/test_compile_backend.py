"""torch.compile(model, backend="mla_graph"): MLA layers run lowered, the rest through a normal backend."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import V3_TINY, randomize

from mla_graph import LoweredMLA, MLAAttention, PagedLatentCache, build_metadata, positions_for
from mla_graph.compile_backend import BackendOptions, mla_graph_backend
from mla_graph.targets import TARGETS

BLOCK = 16
# prefill two requests, decode them twice, then a mixed batch that admits a third request:
# the last step changes num_decodes / num_prefills and the token count (a recompile)
SCHEDULE = [[(5, 0), (9, 0)], [(1, 5), (1, 9)], [(1, 6), (1, 10)], [(1, 7), (1, 11), (4, 0)]]


class Stack(torch.nn.Module):
    """Linear -> MLA -> GELU/Linear -> MLA -> Linear, each MLA with its own paged cache."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.inp, self.mid, self.out = (torch.nn.Linear(h, h) for _ in range(3))
        self.attn1, self.attn2 = MLAAttention(config), MLAAttention(config)

    def forward(self, x, positions, caches, metadata):
        h = self.inp(x)
        h = h + self.attn1(h, positions, caches[0], metadata)
        h = self.mid(torch.nn.functional.gelu(h))
        h = h + self.attn2(h, positions, caches[1], metadata)
        return self.out(h)


@pytest.fixture(scope="module")
def stack():
    """One model for the tests that only read it: its lowerings are cached per layer, so tests
    after the first reuse them (as a served model would) instead of lowering again."""
    return randomize(Stack(V3_TINY))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()   # compiled code of earlier tests must not count toward recompile limits
    yield
    torch._dynamo.reset()


def run_schedule(model, schedule=SCHEDULE, seed=0):
    """Runs the steps on fresh caches (same shuffled block order every time); returns outputs, caches."""
    caches = [PagedLatentCache.allocate(V3_TINY, 12, BLOCK, shuffle_blocks=True, seed=1) for _ in range(2)]
    rows: list[list[int]] = []
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for requests in schedule:
        rows += [[] for _ in range(len(requests) - len(rows))]
        for row, (new, cached) in zip(rows, requests):
            caches[0].allocator.grow(row, new + cached, BLOCK)
        metadata = build_metadata(requests, rows, BLOCK)
        x = torch.randn(metadata.num_tokens, V3_TINY.hidden_size, generator=gen)
        outs.append(model(x, positions_for(requests), caches, metadata))
    return outs, caches


@pytest.fixture
def lowered_calls(monkeypatch):
    """Counts LoweredMLA calls (the compiled model must run its MLA layers lowered, not eagerly)."""
    calls = []
    forward = LoweredMLA.forward

    def counting(self, *args, **kwargs):
        calls.append(self.target.name)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LoweredMLA, "forward", counting)
    return calls


@pytest.mark.parametrize("target", ["reference", "npu"])
def test_compiled_stack_equals_eager(stack, target, lowered_calls):
    model = stack
    want, want_caches = run_schedule(model)
    compiled = torch.compile(model, backend=mla_graph_backend,
                             options={"target": target, "inner_backend": "aot_eager"})
    got, got_caches = run_schedule(compiled)
    assert lowered_calls == [target] * 2 * len(SCHEDULE)
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m: f"step {step}: {m}")
    for g, w in zip(got_caches, want_caches):
        torch.testing.assert_close(g.latent, w.latent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.rope, w.rope, rtol=1e-5, atol=1e-5)


def test_each_instance_runs_its_own_layers(stack, lowered_calls):
    """Compiled code is shared by every Stack (one forward); the graph names layers by key and
    Dynamo guards on the layer's identity, so a second model never runs the first one's layers."""
    first, second = stack, randomize(Stack(V3_TINY), seed=2)
    prefill = SCHEDULE[:1]
    for model in (first, second, first):
        compiled = torch.compile(model, backend=mla_graph_backend,
                                 options={"target": "reference", "inner_backend": "eager"})
        got, _ = run_schedule(compiled, prefill)
        want, _ = run_schedule(model, prefill)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert len(lowered_calls) == 6


def test_a_copied_model_runs_its_own_layers(stack):
    """A layer made by copy.deepcopy (no __init__) is registered too, under its own key: the copy,
    its weights changed, compiles and runs its layers, not the original's."""
    import copy

    twin = copy.deepcopy(stack)
    with torch.no_grad():
        twin.attn1.o_proj.weight.mul_(-1)
    prefill = SCHEDULE[:1]
    for model in (stack, twin):
        compiled = torch.compile(model, backend=mla_graph_backend,
                                 options={"target": "reference", "inner_backend": "eager"})
        got, _ = run_schedule(compiled, prefill)
        want, _ = run_schedule(model, prefill)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_dump_dir_gets_one_folder_per_layer(stack, tmp_path):
    compiled = torch.compile(stack, backend=mla_graph_backend,
                             options={"target": "reference", "dump_dir": str(tmp_path), "inner_backend": "eager"})
    run_schedule(compiled, SCHEDULE[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn1", "attn2"]
    for layer in ("attn1", "attn2"):
        assert sorted(p.name for p in (tmp_path / layer).iterdir()) == ["prefill"]
        prefill = tmp_path / layer / "prefill"
        assert (prefill / "00-capture.txt").read_text().startswith("# phase: prefill")
        assert "remove_noop_views" in (prefill / "summary.json").read_text()


@pytest.mark.parametrize("options, message", [
    ({"targets": "npu"}, "unknown mla_graph option(s) ['targets']; valid options: target, dump_dir, inner_backend, target_options"),
    ({"target": "gpu"}, "unknown mla_graph target 'gpu'; valid targets: " + ", ".join(TARGETS)),
    ({"inner_backend": "no-such-backend"}, "inner_backend='no-such-backend' is not a torch.compile backend; valid: "),
    ({"target": "npu", "target_options": {"graph_batch_sizes": [2]}},
     "unknown target option(s) ['graph_batch_sizes'] for target 'npu'; valid: none"),
    ({"target": "torchair", "target_options": {"graph_batch_sizes": []}},
     "graph_batch_sizes must be a non-empty list of positive ints"),
    ({"target": "torchair", "target_options": [("graph_batch_sizes", [2])]},
     "option target_options must be a dict of option name -> value, got [('graph_batch_sizes', [2])]"),
])
def test_bad_options_name_the_valid_ones(stack, options, message):
    for call in (lambda: BackendOptions.parse(options), lambda: mla_graph_backend(None, [], options=options)):
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value)
    if "inner_backend" in options:
        assert "aot_eager" in str(error.value) and "inductor" in str(error.value)
    # through torch.compile the error surfaces at the first call, when Dynamo calls the backend
    compiled = torch.compile(stack, backend=mla_graph_backend, options=options)
    with pytest.raises(Exception, match=re.escape(message)):
        run_schedule(compiled, SCHEDULE[:1])


def test_other_backends_run_the_layer_eagerly(stack):
    """Under any other backend mla::layer is an ordinary op whose kernel is the eager layer."""
    model = stack
    want, want_caches = run_schedule(model, SCHEDULE[:2])
    got, got_caches = run_schedule(torch.compile(model, backend="aot_eager"), SCHEDULE[:2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_caches[1].latent, want_caches[1].latent, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_the_rest(stack):
    """The default inner backend; one prefill step only (each CPU inductor piece runs a C++ compiler)."""
    model = stack
    (want,), _ = run_schedule(model, SCHEDULE[:1])
    compiled = torch.compile(model, backend=mla_graph_backend, options={"target": "npu"})
    (got,), _ = run_schedule(compiled, SCHEDULE[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


FRESH = textwrap.dedent("""
    import sys
    import torch
    import torch._dynamo

    assert "mla_graph" not in sys.modules
    backend = torch._dynamo.lookup_backend("mla_graph")    # through the entry point only
    assert "mla_graph" in sys.modules and backend.__module__.startswith("mla_graph.compile_backend")
    from mla_graph import MLAAttention, MLAConfig, PagedLatentCache, build_metadata, positions_for
    from mla_graph.compile_backend import mla_graph_backend
    assert backend is mla_graph_backend

    config = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=1024)
    layer = MLAAttention(config).requires_grad_(False)
    cache = PagedLatentCache.allocate(config, 4, 16)
    requests = [(7, 0)]
    metadata = build_metadata(requests, [cache.allocator.grow([], 7, 16)], 16)
    x = torch.randn(7, 64)
    compiled = torch.compile(layer, backend="mla_graph", options={"target": "npu", "inner_backend": "eager"})
    got = compiled(x, positions_for(requests), cache, metadata)
    want = layer(x, positions_for(requests), PagedLatentCache.allocate(config, 4, 16), metadata)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    print("ok", torch._dynamo.utils.counters["stats"]["unique_graphs"])
""")


def test_backend_resolves_by_name_in_a_fresh_interpreter():
    """Needs the installed entry point (pyproject: [project.entry-points.torch_dynamo_backends]);
    the child process must not import mla_graph before torch resolves the name."""
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLA_GRAPH_DUMP": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "1"]


def test_log_says_what_was_lowered(stack, capfd, monkeypatch):
    """MLA_GRAPH_LOG=1: the backend says on stderr how many MLA layers it found and where the rest went."""
    import logging

    from mla_graph.compile_backend import backend as backend_module
    monkeypatch.setenv(backend_module.LOG_ENV, "1")
    monkeypatch.setattr(backend_module.log, "handlers", [])
    monkeypatch.setattr(backend_module.log, "level", logging.NOTSET)
    compiled = torch.compile(stack, backend=mla_graph_backend, options={"target": "reference", "inner_backend": "eager"})
    run_schedule(compiled, SCHEDULE[:1])
    err = capfd.readouterr().err
    assert "[mla_graph] mla_graph backend: 2 MLA layer(s) lowered lazily for target reference" in err, err
