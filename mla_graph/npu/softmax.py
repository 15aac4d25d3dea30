"""The masked softmax-attention step shared by the FIA and ATB references."""
from __future__ import annotations

import torch


def attend(scores: torch.Tensor, keep: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, Sq, Skv] (already scaled, fp32), keep broadcastable bool, value [N, Skv, Dv].

    Returns (out [N, Sq, Dv], lse [N, Sq]) in float32. A fully masked row gets
    out = 0 and lse = -inf (log of an empty sum), so merging by LSE ignores it.
    """
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return probs @ value.float(), lse
