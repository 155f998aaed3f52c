"""The result type shared by every log-prob backend."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class LogProbs(NamedTuple):
    """Per-token outputs, all shape [N]; 0 (or False) at ignored positions.

    Floats are fp32 (fp64 when the inputs are fp64, so gradcheck works). Only
    `logps` carries gradient: the others are metrics and WPO weights, computed
    without autograd, and are None unless requested.
    """

    logps: Tensor
    """log p(label) under the processed logits."""
    entropy: Optional[Tensor]
    """Entropy of the predicted distribution."""
    top1: Optional[Tensor]
    """bool: label == argmax of the processed logits."""
    mean_logits: Optional[Tensor]
    """Mean over the vocabulary of the processed logits."""
    log_sum_sq_probs: Optional[Tensor]
    """log sum_v p_v^2, the WPO weight term."""
