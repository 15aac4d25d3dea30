"""The torchair target's options other than graph_batch_sizes (test_torchair_target.py) do what
they say: max_blocks_per_req is the block-table width compiled into every bucket graph; mode,
frozen_parameter and tiling_schedule_optimize reach the CompilerConfig handed to torchair on an
Ascend host, read back here from the real torchair of the torch-npu wheel."""
import pytest
import torch
from conftest import TOL, V3_TINY, randomize
from wheels import torch_npu_wheel

import mla_graph.npu
from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, PagedLatentCache, build_metadata, lower, positions_for
from mla_graph.runtime.graph_mode import TorchairOptions, _torchair_backend

BS = 16


def _block_tables_seen(runner) -> list[tuple[int, ...]]:
    """Wraps the runner's compiled step (its BucketRunner's): the shape of the block table of every call."""
    shapes = []
    compiled = runner.runner._compiled
    index = graph_meta(runner.gm).input_names.index("block_table")

    def step(*tensors):
        shapes.append(tuple(tensors[index].shape))
        return compiled(*tensors)

    runner.runner._compiled = step
    return shapes


def test_max_blocks_per_req_is_the_block_table_width_compiled_in():
    layer = randomize(MLAAttention(V3_TINY))
    reference = lower(layer, "reference", ["decode"], block_size=BS)
    requests = [(1, 20), (1, 40)]   # 2 and 3 blocks of 16
    cache = PagedLatentCache.allocate(V3_TINY, 12, BS, shuffle_blocks=True)
    gen = torch.Generator().manual_seed(0)
    for part in (cache.latent, cache.rope):
        part.copy_(torch.randn(part.shape, generator=gen))
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    md = build_metadata(requests, rows, BS)
    x = torch.randn(2, V3_TINY.hidden_size, generator=gen)
    expected = reference(x, positions_for(requests), cache.clone(), md)
    default_width = -(-V3_TINY.max_position_embeddings // BS)
    for options, width in (({}, default_width), ({"max_blocks_per_req": 3}, 3)):
        graph = lower(layer, "torchair", ["decode"], block_size=BS,
                      target_options={"graph_batch_sizes": [2], **options})
        seen = _block_tables_seen(graph.runners["decode"])
        out = graph(x, positions_for(requests), cache.clone(), md)
        assert seen == [(2, width)], f"{options}: the graph got block tables {seen}, expected [(2, {width})]"
        torch.testing.assert_close(out, expected, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])
    # a block table wider than the compiled width is refused before anything runs
    wide = build_metadata(requests, [row + [0] for row in rows], BS)
    before = cache.clone()
    with pytest.raises(ValueError, match="block_table has 4 columns but the decode graph was built for max_blocks_per_req=3"):
        graph(x, positions_for(requests), cache, wide)
    assert torch.equal(cache.latent, before.latent)


@pytest.fixture(scope="module")
def torchair():
    """The real torchair (from the torch-npu wheel, imported without CANN)."""
    from mla_graph import ascend_toolchain as at

    return at.load(torch_npu_wheel()).torchair


@pytest.mark.parametrize("options, expected", [
    ({}, {"mode": "max-autotune", "frozen_parameter": "1", "ge.tiling_schedule_optimize": "1"}),
    ({"frozen_parameter": False}, {"frozen_parameter": "0", "ge.tiling_schedule_optimize": "1"}),
    ({"tiling_schedule_optimize": False}, {"frozen_parameter": "1", "ge.tiling_schedule_optimize": "0"}),
], ids=["defaults", "frozen-parameter-off", "tiling-schedule-off"])
def test_compiler_options_reach_torchairs_compiler_config(torchair, monkeypatch, options, expected):
    """What torchair hands GE (CompilerConfig.as_dict()), for the options as given to lower():
    the runner on an Ascend host builds its backend from them."""
    handed = []

    def get_npu_backend(*, compiler_config):
        handed.append(compiler_config)
        return lambda gm, example_inputs: gm.forward

    monkeypatch.setattr(torchair, "get_npu_backend", get_npu_backend)
    _torchair_backend(TorchairOptions.from_dict(options))
    local_options, _ = handed[-1].as_dict()
    assert {k: local_options[k] for k in expected} == expected
    # through lower(), as on a host where torch_npu is the backend
    monkeypatch.setattr(mla_graph.npu, "npu_backend", lambda: "torch_npu")
    graph = lower(MLAAttention(V3_TINY), "torchair", ["decode"], block_size=BS,
                  target_options={"graph_batch_sizes": [1], **options})
    assert graph.runners["decode"].on_npu and len(handed) == 2
    local_options, _ = handed[-1].as_dict()
    assert {k: local_options[k] for k in expected} == expected
