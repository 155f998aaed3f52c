"""Pick the log-prob backend for the inputs at hand.

By default: CPU tensors use the compiled C++ extension (`cpp`), CUDA tensors
the Triton kernels, else the CUDA extension; anything the fused backends do not
take (float64, other devices) and any backend that cannot be built here falls
back to the chunked torch ops (`chunked`), with one warning per unavailable
backend.
`DPO_DS_LOGPROB_BACKEND=torch|cpp|cuda|triton` forces one backend and fails
with the reason when it cannot run.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

from torch import Tensor

from . import chunked
from .backends import LOADERS, Backend
from .fused import DTYPES, BackendUnavailable
from .types import LogProbs

BACKEND_ENV = "DPO_DS_LOGPROB_BACKEND"
BACKENDS = {"torch": chunked, **{name: Backend(name) for name in LOADERS}}
"""Backend name -> what runs it: the chunked torch module or a fused `Backend`."""
PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}
"""Fused backends to try, fastest first, per device type."""

_warned: set[str] = set()


def _ready(name: str) -> Optional[str]:
    """None if backend `name` can run here, else why not."""
    if name == "torch":
        return None
    try:
        BACKENDS[name].kernels()
    except BackendUnavailable as err:
        return str(err)
    return None


def backend_for(*tensors: Optional[Tensor]) -> str:
    """The backend name that `logits_logprobs`/`linear_logprobs` use for these inputs."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not a log-prob backend; choose one of {sorted(BACKENDS)}")
        reason = _ready(forced)
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}={forced!r}, but that backend is not available: {reason}")
        return forced
    present = [t for t in tensors if t is not None]
    device = present[0].device.type
    if any(t.dtype not in DTYPES for t in present):
        return "torch"
    for name in PREFERENCE.get(device, ()):
        reason = _ready(name)
        if reason is None:
            return name
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"dpo_ds: the {name} log-prob backend is unavailable ({reason}); falling back to the next "
                          "backend (the torch reference last)",
                          RuntimeWarning, stacklevel=3)
    return "torch"


@functools.wraps(chunked.logits_logprobs)
def logits_logprobs(logits: Tensor, labels: Tensor, **kwargs) -> LogProbs:
    return BACKENDS[backend_for(logits)].logits_logprobs(logits, labels, **kwargs)


@functools.wraps(chunked.linear_logprobs)
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                    **kwargs) -> LogProbs:
    return BACKENDS[backend_for(hidden, weight, bias)].linear_logprobs(hidden, weight, labels, bias, **kwargs)

