"""Cache-writing scatters: scatter_update(_), npu_scatter_nd_update(_) and
atb::_npu_reshape_and_cache. The `_` forms write in place and return self."""
from __future__ import annotations

import torch

from mla_graph.npu._checks import require


def _scatter_update_into(out: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    """out[b, ..., off_b : off_b + U, ...] = updates[k] along `axis`, where indices is
    [K] (batch k, offset indices[k]) or [K, 2] (rows of (batch, offset))."""
    op = "scatter_update"
    require(2 <= out.dim() <= 8, op, "self", tuple(out.shape), "rank 2..8")
    require(updates.dim() == out.dim(), op, "updates", tuple(updates.shape), f"rank {out.dim()} like self")
    dim = axis + out.dim() if axis < 0 else axis
    require(0 < dim < out.dim(), op, "axis", axis, f"a non-batch dim of self (rank {out.dim()})")
    if indices.dim() == 1:
        rows = torch.stack((torch.arange(indices.size(0)), indices.long()), dim=1)
    else:
        require(indices.dim() == 2 and indices.size(1) == 2, op, "indices", tuple(indices.shape),
                "[K] offsets or [K, 2] (batch, offset) rows")
        rows = indices.long()
    require(rows.size(0) == updates.size(0), op, "updates", tuple(updates.shape),
            f"one update per index row ({rows.size(0)})")
    span = updates.size(dim)
    expected = [d for i, d in enumerate(out.shape) if i not in (0, dim)]
    got = [d for i, d in enumerate(updates.shape) if i not in (0, dim)]
    require(got == expected, op, "updates", tuple(updates.shape), f"dims other than 0 and axis equal to {expected}")
    for k, (batch, offset) in enumerate(rows.tolist()):
        require(0 <= offset and offset + span <= out.size(dim), op, "indices", offset,
                f"an offset with offset + {span} <= {out.size(dim)}")
        out[batch].narrow(dim - 1, offset, span).copy_(updates[k])


def scatter_update(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> torch.Tensor:
    out = self.clone()
    _scatter_update_into(out, indices, updates, axis)
    return out


def scatter_update_(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> torch.Tensor:
    _scatter_update_into(self, indices, updates, axis)
    return self


def _scatter_nd_into(out: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> None:
    """out[tuple(indices[i])] = updates[i] with indices [..., a]; no bounds check on NPU,
    here torch indexing raises for out-of-range rows."""
    op = "npu_scatter_nd_update"
    require(indices.dim() >= 2, op, "indices", tuple(indices.shape), "at least 2-D [..., a]")
    depth = indices.size(-1)
    require(depth <= out.dim(), op, "indices", tuple(indices.shape), f"a last dim <= rank of self ({out.dim()})")
    expected = tuple(indices.shape[:-1]) + tuple(out.shape[depth:])
    require(tuple(updates.shape) == expected, op, "updates", tuple(updates.shape),
            f"indices.shape[:-1] + self.shape[a:] = {expected}")
    flat = indices.reshape(-1, depth).long()
    out[tuple(flat.t())] = updates.reshape(-1, *out.shape[depth:]).to(out.dtype)


def npu_scatter_nd_update(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    out = self.clone()
    _scatter_nd_into(out, indices, updates)
    return out


def npu_scatter_nd_update_(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    _scatter_nd_into(self, indices, updates)
    return self


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_indices: torch.Tensor) -> None:
    """cache.view(-1, N, D)[slot[t]] = key[t] (and value); slot -1 writes nothing."""
    op = "_npu_reshape_and_cache"
    slots = slot_indices.reshape(-1).long()
    live = slots >= 0
    for arg, src, cache in (("key", key, key_cache), ("value", value, value_cache)):
        require(src.dim() == 3 and src.size(0) == slots.numel(), op, arg, tuple(src.shape),
                f"[T={slots.numel()}, N, D] matching slot_indices")
        require(cache.dim() == 4 and cache.shape[2:] == src.shape[1:] and cache.is_contiguous(), op,
                f"{arg}_cache", tuple(cache.shape), f"a contiguous ND [blocks, block_size, {src.size(1)}, "
                f"{src.size(2)}] cache")
        flat = cache.view(-1, src.size(1), src.size(2))
        require(bool((slots[live] < flat.size(0)).all()), op, "slot_indices", slots.tolist(),
                f"slots below {flat.size(0)} or -1")
        flat[slots[live]] = src[live].to(cache.dtype)


def reshape_and_cache_fake(key, value, key_cache, value_cache, slot_indices) -> None:
    return None


def _same(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, *axis: int) -> torch.Tensor:
    return torch.empty_like(self)


def _alias(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, *axis: int) -> torch.Tensor:
    return self


KERNELS = {
    "npu::scatter_update": (scatter_update, _same),
    "npu::scatter_update_": (scatter_update_, _alias),
    "npu::npu_scatter_nd_update": (npu_scatter_nd_update, _same),
    "npu::npu_scatter_nd_update_": (npu_scatter_nd_update_, _alias),
    "atb::_npu_reshape_and_cache": (reshape_and_cache, reshape_and_cache_fake),
}
