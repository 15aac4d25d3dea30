"""kv_rmsnorm_rope_cache family, scatter_update / scatter_nd_update and
atb reshape_and_cache against formulas and explicit loops written here."""
import pytest
import torch
from conftest import changed_rows

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
npu, atb = torch.ops.npu, torch.ops.atb
B, S, DN, DR = 2, 3, 16, 8


def expected_kv(kv, gamma, cos, sin, eps=1e-5):
    """Textbook RMSNorm and the documented interleave rope (p1/p2 form)."""
    xn, xr = kv[..., :DN], kv[..., DN:]
    c_kv = xn / torch.sqrt((xn ** 2).mean(-1, keepdim=True) + eps) * gamma
    p1 = torch.cat([xr[..., 0::2], xr[..., 1::2]], -1)
    p2 = torch.cat([-xr[..., 1::2], xr[..., 0::2]], -1)
    return p1 * cos + p2 * sin, c_kv


def inputs():
    torch.manual_seed(0)
    kv = torch.randn(B, 1, S, DN + DR)
    gamma = torch.rand(DN) + 0.5
    cos, sin = torch.randn(B, 1, S, DR), torch.randn(B, 1, S, DR)
    return kv, gamma, cos, sin


def test_norm_mode_v1_returns_copies_and_leaves_inputs():
    kv, gamma, cos, sin = inputs()
    index = torch.tensor([[0, 2, -1], [4, -1, 1]])   # position 5, where -1 would land, is never written
    k_cache, ckv_cache = random_caches(B, 1, 6)
    k_before, ckv_before = k_cache.clone(), ckv_cache.clone()
    k_new, ckv_new, k_rope, c_kv = npu.npu_kv_rmsnorm_rope_cache(kv, gamma, cos, sin, index, k_cache, ckv_cache)
    assert torch.equal(k_cache, k_before) and torch.equal(ckv_cache, ckv_before)
    exp_rope, exp_ckv = expected_kv(kv, gamma, cos, sin)
    torch.testing.assert_close(k_rope, exp_rope)
    torch.testing.assert_close(c_kv, exp_ckv)
    for b in range(B):
        for s in range(S):
            pos = int(index[b, s])
            if pos >= 0:
                torch.testing.assert_close(k_new[b, 0, pos], exp_rope[b, 0, s])
                torch.testing.assert_close(ckv_new[b, 0, pos], exp_ckv[b, 0, s])
    written = {(b, int(p)) for b in range(B) for p in index[b] if p >= 0}
    for before, after in ((k_before, k_new), (ckv_before, ckv_new)):
        untouched = [(b, p) for b in range(B) for p in range(6) if (b, p) not in written]
        changed = [(b, p) for b, p in untouched if not torch.equal(after[b, 0, p], before[b, 0, p])]
        assert not changed, f"(batch, position) {changed} were written by no token"


def random_caches(*shape_but_last: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache and ckv_cache pre-filled with random values: a stray write (zeros included) shows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape_but_last, DR, generator=gen), torch.randn(*shape_but_last, DN, generator=gen)


def assert_only_slots_written(before, after, written: dict[int, torch.Tensor]) -> None:
    """Rows (flat slots) in `written` hold the given values; every other row keeps its bytes."""
    expected = before.clone().reshape(before.shape[0] * before.shape[1], -1)
    for slot, row in written.items():
        expected[slot] = row.reshape(-1)
    wrong = changed_rows(expected.view(before.shape), after)
    assert not wrong, f"slots {wrong} differ from the expected contents (slots written: {sorted(written)})"


# Slot -1 writes nothing. None of these lists writes the caches' last slot (11), where a -1 used as
# an index would land; -1 stands first, in the middle and last.
PAGED_SLOTS = [[0, 7, -1, 3, 4, 10], [-1, 2, 9, 1, 5, -1], [-1] * 6]


@pytest.mark.parametrize("slots", PAGED_SLOTS, ids=["middle", "first-last", "all"])
@pytest.mark.parametrize("mode", ["PA", "PA_BNSD"])
def test_paged_modes_v2_mutates_in_place(mode, slots):
    kv, gamma, cos, sin = inputs()
    k_cache, ckv_cache = random_caches(3, 4, 1)
    k_before, ckv_before = k_cache.clone(), ckv_cache.clone()
    k_rope, c_kv = npu.npu_kv_rmsnorm_rope_cache_v2(kv, gamma, cos, sin, torch.tensor(slots), k_cache, ckv_cache,
                                                    cache_mode=mode)
    exp_rope, exp_ckv = expected_kv(kv, gamma, cos, sin)
    flat_k, flat_c = k_cache.reshape(-1, DR), ckv_cache.reshape(-1, DN)
    for t, slot in enumerate(slots):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot], exp_rope[t // S, 0, t % S])
            torch.testing.assert_close(flat_c[slot], exp_ckv[t // S, 0, t % S])
    assert_only_slots_written(k_before, k_cache, {s: flat_k[s] for s in slots if s >= 0})
    assert_only_slots_written(ckv_before, ckv_cache, {s: flat_c[s] for s in slots if s >= 0})
    torch.testing.assert_close(k_rope, exp_rope)
    torch.testing.assert_close(c_kv, exp_ckv)


@pytest.mark.parametrize("slots", PAGED_SLOTS, ids=["middle", "first-last", "all"])
def test_v1_pa_mode_returns_updated_copies(slots):
    """The functional form torchair's decode graph uses: the inputs keep their bytes, the returned
    caches differ from them in the written slots only."""
    kv, gamma, cos, sin = inputs()
    k_cache, ckv_cache = random_caches(3, 4, 1)
    k_before, ckv_before = k_cache.clone(), ckv_cache.clone()
    k_new, ckv_new, k_rope, c_kv = npu.npu_kv_rmsnorm_rope_cache(kv, gamma, cos, sin, torch.tensor(slots), k_cache,
                                                                 ckv_cache, cache_mode="PA")
    assert torch.equal(k_cache, k_before) and torch.equal(ckv_cache, ckv_before)
    exp_rope, exp_ckv = expected_kv(kv, gamma, cos, sin)
    torch.testing.assert_close(k_rope, exp_rope)
    live = [(t, s) for t, s in enumerate(slots) if s >= 0]
    for t, slot in live:
        torch.testing.assert_close(k_new.reshape(-1, DR)[slot], exp_rope[t // S, 0, t % S])
    assert_only_slots_written(k_before, k_new, {s: k_new.reshape(-1, DR)[s] for _, s in live})
    assert_only_slots_written(ckv_before, ckv_new, {s: ckv_new.reshape(-1, DN)[s] for _, s in live})


def test_pa_blk_bnsd_block_start_slots_and_functional_form():
    kv, gamma, cos, sin = inputs()
    # block_size 2, S=3 -> 2 blocks per batch; batch 1's second block is skipped (-1)
    starts = torch.tensor([0, 4, 2, -1])
    k_cache, ckv_cache = random_caches(4, 2, 1)
    k_before = k_cache.clone()
    k_rope, c_kv, k_new, ckv_new = npu.npu_kv_rmsnorm_rope_cache_v2_functional(
        kv, gamma, cos, sin, starts, k_cache, ckv_cache, cache_mode="PA_BLK_BNSD")
    assert torch.equal(k_cache, k_before)
    exp_rope, _ = expected_kv(kv, gamma, cos, sin)
    flat = k_new.reshape(-1, DR)
    expected_slot = {(0, 0): 0, (0, 1): 1, (0, 2): 4, (1, 0): 2, (1, 1): 3}
    for (b, s), slot in expected_slot.items():
        torch.testing.assert_close(flat[slot], exp_rope[b, 0, s])
    # slots 5-7 (the last block, where a -1 start would land) are written by no token
    assert_only_slots_written(k_before, k_new, {slot: flat[slot] for slot in expected_slot.values()})


def test_scatter_update_offsets_along_axis():
    data = torch.zeros(2, 3, 5, 2)
    updates = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    indices = torch.tensor([1, 3])
    out = npu.scatter_update(data, indices, updates, -2)
    expected = data.clone()
    expected[0, :, 1:3] = updates[0]
    expected[1, :, 3:5] = updates[1]
    torch.testing.assert_close(out, expected)
    assert data.abs().sum() == 0
    pairs = torch.tensor([[1, 0], [0, 2]])
    returned = npu.scatter_update_(data, pairs, updates, 2)
    assert returned.data_ptr() == data.data_ptr()
    torch.testing.assert_close(data[1, :, 0:2], updates[0])
    torch.testing.assert_close(data[0, :, 2:4], updates[1])


def test_scatter_nd_update():
    data = torch.zeros(4, 3)
    indices = torch.tensor([[2], [0]])
    updates = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    out = npu.npu_scatter_nd_update(data, indices, updates)
    torch.testing.assert_close(out, torch.tensor([[4.0, 5, 6], [0, 0, 0], [1, 2, 3], [0, 0, 0]]))
    assert data.abs().sum() == 0
    npu.npu_scatter_nd_update_(data, torch.tensor([[[1, 2]]]), torch.tensor([[7.0]]))
    assert data[1, 2] == 7 and data.abs().sum() == 7


def test_atb_reshape_and_cache():
    torch.manual_seed(1)
    key, value = torch.randn(3, 2, 4), torch.randn(3, 2, 6)
    key_cache, value_cache = torch.randn(2, 4, 2, 4), torch.randn(2, 4, 2, 6)
    before = key_cache.clone(), value_cache.clone()
    slots = torch.tensor([5, -1, 0], dtype=torch.int32)   # slot 7, where -1 would land, is not written
    assert atb._npu_reshape_and_cache(key, value, key_cache, value_cache, slots) is None
    assert_only_slots_written(before[0], key_cache, {5: key[0], 0: key[2]})
    assert_only_slots_written(before[1], value_cache, {5: value[0], 0: value[2]})
