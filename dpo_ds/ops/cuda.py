"""CUDA backend: `csrc/logprobs_cuda.{cu,cpp}`, compiled with nvcc on first use when torch has CUDA.

The logits variant is one kernel launch each way; the linear variant runs
cuBLAS on [rows, cols] tiles and folds each tile with the same kernels. The
build shares the cache and lock of the CPU extension (see `cpp`).
"""
from __future__ import annotations

import functools
import os

import torch

from . import cpp, fused
from .types import LogProbs

SOURCES = ("logprobs_cuda.cpp", "logprobs_cuda.cu")
CUDA_FLAGS = ["-O3"]
TILE_ROWS = 4096
TILE_COLS = 8192


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


@functools.lru_cache(maxsize=None)
def _load() -> fused.Kernels | fused.BackendUnavailable:
    if not torch.cuda.is_available():
        return fused.BackendUnavailable("the cuda log-prob backend needs a CUDA GPU and a CUDA build of torch")
    try:
        src = cpp.csrc_dir()
        arch = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        signature = f"{arch} {torch.version.cuda} {os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"
        mod = cpp.build_extension("dpo_ds_logprobs_cuda", [src / s for s in SOURCES], signature,
                                  extra_cflags=["-O3"], extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(src)])
    except fused.BackendUnavailable as err:
        return err
    except Exception as err:  # no nvcc, a compiler error, a read-only cache, ...
        return fused.BackendUnavailable(f"the cuda log-prob extension could not be built: {err}")

    def fold(x, labels, ignore_index, vocab_start, inv_t, cap, flags, state):
        mod.fold(x, labels, ignore_index, vocab_start, inv_t, cap, flags, state, _stream(x))

    def grad(x, labels, ignore_index, vocab_start, lse, grad_logps, inv_t, cap, dst):
        mod.grad(x, labels, ignore_index, vocab_start, lse, grad_logps, inv_t, cap, dst, _stream(x))

    return fused.checked(fused.Kernels("cuda", "cuda", fold, grad, TILE_ROWS, TILE_COLS), "cuda")


def kernels() -> fused.Kernels:
    """The compiled CUDA kernels; raises BackendUnavailable saying why they cannot be built or run."""
    return fused.unwrap(_load())


def logits_logprobs(logits, labels, **kwargs) -> LogProbs:
    """`dpo_ds.ops.logits_logprobs` with the CUDA kernels."""
    return fused.logits_logprobs(kernels(), logits, labels, **kwargs)


def linear_logprobs(hidden, weight, labels, bias=None, **kwargs) -> LogProbs:
    """`dpo_ds.ops.linear_logprobs`: cuBLAS tiles folded by the CUDA kernels."""
    return fused.linear_logprobs(kernels(), hidden, weight, labels, bias, **kwargs)
