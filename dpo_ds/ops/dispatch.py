"""Pick the log-prob backend. Only the torch reference exists so far.

`DPO_DS_LOGPROB_BACKEND` forces a backend (`torch`, or unset, for the reference);
fused backends are added here when they land.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

from . import reference
from .types import LogProbs

BACKEND_ENV = "DPO_DS_LOGPROB_BACKEND"


def _backend() -> ModuleType:
    name = os.environ.get(BACKEND_ENV, "") or "torch"
    if name == "torch":
        return reference
    raise RuntimeError(f"{BACKEND_ENV}={name!r}: that log-prob backend is not available yet; use 'torch' or unset it")


@functools.wraps(reference.logits_logprobs)
def logits_logprobs(*args, **kwargs) -> LogProbs:
    return _backend().logits_logprobs(*args, **kwargs)


@functools.wraps(reference.linear_logprobs)
def linear_logprobs(*args, **kwargs) -> LogProbs:
    return _backend().linear_logprobs(*args, **kwargs)
