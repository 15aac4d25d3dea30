"""kv_rmsnorm_rope_cache family, scatter_update / scatter_nd_update and
atb reshape_and_cache against formulas and explicit loops written here."""
import pytest
import torch

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
    index = torch.tensor([[0, 2, -1], [5, -1, 1]])
    k_cache, ckv_cache = torch.zeros(B, 1, 6, DR), torch.zeros(B, 1, 6, DN)
    k_new, ckv_new, k_rope, c_kv = npu.npu_kv_rmsnorm_rope_cache(kv, gamma, cos, sin, index, k_cache, ckv_cache)
    assert k_cache.abs().sum() == 0 and ckv_cache.abs().sum() == 0
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
    untouched = [(b, p) for b in range(B) for p in range(6) if (b, p) not in written]
    assert all(k_new[b, 0, p].abs().sum() == 0 for b, p in untouched)


@pytest.mark.parametrize("mode", ["PA", "PA_BNSD"])
def test_paged_modes_v2_mutates_in_place(mode):
    kv, gamma, cos, sin = inputs()
    slots = torch.tensor([0, 7, -1, 3, 4, 11])  # B*S flat slot ids
    k_cache, ckv_cache = torch.zeros(3, 4, 1, DR), torch.zeros(3, 4, 1, DN)
    k_rope, c_kv = npu.npu_kv_rmsnorm_rope_cache_v2(kv, gamma, cos, sin, slots, k_cache, ckv_cache, cache_mode=mode)
    exp_rope, exp_ckv = expected_kv(kv, gamma, cos, sin)
    flat_k, flat_c = k_cache.reshape(-1, DR), ckv_cache.reshape(-1, DN)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot], exp_rope[t // S, 0, t % S])
            torch.testing.assert_close(flat_c[slot], exp_ckv[t // S, 0, t % S])
    assert flat_k[[1, 2, 5, 6, 8, 9, 10]].abs().sum() == 0
    torch.testing.assert_close(k_rope, exp_rope)


def test_pa_blk_bnsd_block_start_slots_and_functional_form():
    kv, gamma, cos, sin = inputs()
    # block_size 2, S=3 -> 2 blocks per batch; batch 1's second block is skipped (-1)
    starts = torch.tensor([0, 6, 2, -1])
    k_cache, ckv_cache = torch.zeros(4, 2, 1, DR), torch.zeros(4, 2, 1, DN)
    k_rope, c_kv, k_new, ckv_new = npu.npu_kv_rmsnorm_rope_cache_v2_functional(
        kv, gamma, cos, sin, starts, k_cache, ckv_cache, cache_mode="PA_BLK_BNSD")
    assert k_cache.abs().sum() == 0
    exp_rope, _ = expected_kv(kv, gamma, cos, sin)
    flat = k_new.reshape(-1, DR)
    expected_slot = {(0, 0): 0, (0, 1): 1, (0, 2): 6, (1, 0): 2, (1, 1): 3}
    for (b, s), slot in expected_slot.items():
        torch.testing.assert_close(flat[slot], exp_rope[b, 0, s])
    assert flat[[4, 5, 7]].abs().sum() == 0


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
    key_cache, value_cache = torch.zeros(2, 4, 2, 4), torch.zeros(2, 4, 2, 6)
    slots = torch.tensor([5, -1, 0], dtype=torch.int32)
    assert atb._npu_reshape_and_cache(key, value, key_cache, value_cache, slots) is None
    torch.testing.assert_close(key_cache[1, 1], key[0])
    torch.testing.assert_close(key_cache[0, 0], key[2])
    torch.testing.assert_close(value_cache[1, 1], value[0])
    assert key_cache.abs().sum() == key[0].abs().sum() + key[2].abs().sum()
