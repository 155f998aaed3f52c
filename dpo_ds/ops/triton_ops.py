"""Triton backend: fused LM-head and logits kernels (`triton_kernels`), used on CUDA tensors.

With TRITON_INTERPRET=1 set before the first import, the kernels run in
Triton's interpreter on CPU tensors instead (small sizes only: it is slow).
"""
from __future__ import annotations

import functools

from . import fused
from .types import LogProbs


@functools.lru_cache(maxsize=None)
def _load() -> fused.Kernels | fused.BackendUnavailable:
    try:
        from . import triton_kernels as tk
    except ImportError as err:
        return fused.BackendUnavailable(f"the triton log-prob backend needs the triton package: {err}")
    if not tk.INTERPRET:
        import torch

        if not torch.cuda.is_available():
            return fused.BackendUnavailable("the triton log-prob backend needs a CUDA GPU (or TRITON_INTERPRET=1)")
    device = "cpu" if tk.INTERPRET else "cuda"
    kernels = fused.Kernels("triton", device, tk.fold, tk.grad, tk.TILE_ROWS, tk.TILE_COLS, tk.linear_forward)
    return kernels if tk.INTERPRET else fused.checked(kernels, "cuda")


def kernels() -> fused.Kernels:
    """The Triton kernels; raises BackendUnavailable saying why they cannot run here."""
    return fused.unwrap(_load())


def logits_logprobs(logits, labels, **kwargs) -> LogProbs:
    """`dpo_ds.ops.logits_logprobs` with Triton kernels."""
    return fused.logits_logprobs(kernels(), logits, labels, **kwargs)


def linear_logprobs(hidden, weight, labels, bias=None, **kwargs) -> LogProbs:
    """`dpo_ds.ops.linear_logprobs` with the fused Triton LM-head kernels."""
    return fused.linear_logprobs(kernels(), hidden, weight, labels, bias, **kwargs)
