"""Per-sequence sums of per-token log-probs, with optional LD-DPO weighting."""
from __future__ import annotations

import torch
from torch import Tensor


def sequence_logps(token_logps: Tensor, loss_mask: Tensor, ld_alpha: float | None = None) -> Tensor:
    """Sum token log-probs over the masked positions of each row.

    token_logps, loss_mask: [R, T], aligned (mask[r, t] says whether token t of
    row r counts). Returns [R] in token_logps' dtype.

    With `ld_alpha` (LD-DPO, arXiv 2409.06411, as TRL 1.16 implements it) the
    rows are [chosen B ; rejected B]; for each pair the public length is
    min(chosen_len, rejected_len). The first public-length completion tokens of
    each row count fully, the ones after them are scaled by `ld_alpha`, so the
    longer answer earns no reward from its excess length alone.
    """
    if token_logps.dim() != 2 or token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"sequence_logps: token_logps {tuple(token_logps.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must both be [rows, tokens] of the same shape"
        )
    mask = loss_mask != 0
    if ld_alpha is None:
        return (token_logps * mask).sum(dim=1)
    rows = token_logps.shape[0]
    if rows % 2:
        raise ValueError(f"sequence_logps: ld_alpha needs [chosen; rejected] rows, got an odd count {rows}")
    position = mask.long().cumsum(dim=1)
    chosen_len, rejected_len = position[:, -1].chunk(2)
    public_len = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    weight = torch.full_like(token_logps, ld_alpha).masked_fill(position <= public_len, 1.0)
    return (token_logps * weight * mask).sum(dim=1)
