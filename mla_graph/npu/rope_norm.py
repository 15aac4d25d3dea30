"""RMSNorm and the interleaved RoPE shared by the emulated kernels, plus the
npu_rms_norm and npu_interleave_rope ops themselves."""
from __future__ import annotations

import torch


def rms_norm_fp32(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (the kernels accumulate in fp32)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()


def interleave_rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0,x1),(x2,x3)...: de-interleave into halves,
    then rotate-half. This is the form of npu_interleave_rope and of the rope in
    npu_kv_rmsnorm_rope_cache: p1 = cat(x[0::2], x[1::2]), p2 = cat(-x[1::2], x[0::2])."""
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    p1 = torch.cat((even, odd), dim=-1)
    p2 = torch.cat((-odd, even), dim=-1)
    return p1 * cos.float() + p2 * sin.float()


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_rms_norm_fake(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    lead = self.dim() - gamma.dim()
    rstd_shape = [self.size(i) if i < lead else 1 for i in range(self.dim())]
    return torch.empty_like(self), self.new_empty(rstd_shape, dtype=torch.float32)


def npu_interleave_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return interleave_rope_fp32(x, cos, sin).to(x.dtype)


def npu_interleave_rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


KERNELS = {
    "npu::npu_rms_norm": (npu_rms_norm, npu_rms_norm_fake),
    "npu::npu_interleave_rope": (npu_interleave_rope, npu_interleave_rope_fake),
}
