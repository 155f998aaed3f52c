"""CPU backend: `csrc/logprobs_cpu.cpp`, compiled with the host compiler on first use.

The build lands in `$DPO_DS_CACHE/torch_extensions/` (torch's extension root
otherwise) under a name that hashes the sources, flags, torch and CPU, so a
stale or foreign build is never loaded. A file lock (`fcntl.flock`, released by
the kernel if a builder dies) serializes ranks that build at once; the others
then load the finished library. If it cannot be built, the first caller gets
one warning and dispatch uses the torch reference.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
from pathlib import Path

import torch

from . import fused
from .types import LogProbs

CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]  # no FP traps: lets GCC if-convert and vectorize
LDFLAGS = ["-fopenmp"]
SOURCES = ("logprobs_cpu.cpp",)
TILE_ROWS = 128
TILE_COLS = 512
"""One thread's [tokens, vocab] fp32 tile in the fused LM head: 256 KiB, it stays in L2."""
ACCUMULATOR_BYTES = 256 << 20
"""Budget for the per-thread hidden-gradient accumulators; longer inputs run in token chunks."""


def csrc_dir() -> Path:
    """The kernel sources: inside the package when installed, else the repository's csrc/."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise fused.BackendUnavailable(
        f"kernel sources not found: no {SOURCES[0]} in {package}/csrc or {package.parent}/csrc")


def build_root() -> Path:
    cache = os.environ.get("DPO_DS_CACHE")
    if cache:
        return Path(cache) / "torch_extensions"
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _cpu_signature() -> str:
    """CPU model and feature flags: `-march=native` code must not load on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("flags", "model name", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep))


def extension_name(name: str, sources: list[Path], signature: str, **load_kwargs) -> str:
    """`name` plus a hash of everything that shapes the build: sources, flags, torch, Python, `signature`."""
    digest = hashlib.sha256()
    for part in (*[s.read_bytes() for s in sources], signature.encode(), repr(sorted(load_kwargs.items())).encode(),
                 torch.__version__.encode(), platform.python_version().encode()):
        digest.update(part)
    return f"{name}_{digest.hexdigest()[:16]}"


def build_extension(name: str, sources: list[Path], signature: str, **load_kwargs):
    """Compile (or reuse) a torch extension in `build_root() / extension_name(...)`, one builder at a time."""
    from torch.utils.cpp_extension import load

    full_name = extension_name(name, sources, signature, **load_kwargs)
    directory = build_root() / full_name
    directory.mkdir(parents=True, exist_ok=True)
    with open(build_root() / f"{full_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Holding our lock, a leftover torch build baton can only be from a builder that died.
            (directory / "lock").unlink(missing_ok=True)
            return load(name=full_name, sources=[str(s) for s in sources], build_directory=str(directory),
                        verbose=False, **load_kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def _load() -> fused.Kernels | fused.BackendUnavailable:
    """Build once per process; a failure is remembered too, so it is neither retried nor re-reported."""
    try:
        src = csrc_dir()
        mod = build_extension("dpo_ds_logprobs_cpu", [src / s for s in SOURCES], _cpu_signature(),
                              extra_cflags=CFLAGS, extra_ldflags=LDFLAGS)
    except fused.BackendUnavailable as err:
        return err
    except Exception as err:  # a compiler error, a missing toolchain, a read-only cache, ...
        return fused.BackendUnavailable(f"the cpp log-prob extension could not be built: {err}")

    def linear_forward(hidden, weight, bias, labels, cfg: fused.Config):
        h, w, b = _f32(hidden, weight, bias)
        state = fused.new_state(h.shape[0], h.device)
        mod.linear_fold(h, w, b, labels, cfg.inv_t, cfg.cap, cfg.flags, state, cfg.tile_rows, cfg.tile_cols)
        return state

    def linear_backward(hidden, weight, bias, labels, lse, grad_logps, cfg: fused.Config, needs):
        h, w, b = _f32(hidden, weight, bias)
        grads = mod.linear_grad(h, w, b, labels, lse, grad_logps, cfg.inv_t, cfg.cap, *needs, cfg.tile_rows,
                                cfg.tile_cols, ACCUMULATOR_BYTES)
        return tuple(g if want else None for g, want in zip(grads, needs))

    return fused.Kernels("cpp", "cpu", mod.fold, mod.grad, TILE_ROWS, TILE_COLS, linear_forward, linear_backward)


def _f32(*tensors):
    """Contiguous fp32 operands: on a CPU without bf16 matmul units, fp32 matmuls are exact and no slower."""
    return tuple(None if t is None else t.detach().float().contiguous() for t in tensors)


def kernels() -> fused.Kernels:
    """The compiled CPU kernels; raises BackendUnavailable (with the compiler's reason) if they cannot be built."""
    return fused.unwrap(_load())


def logits_logprobs(logits, labels, **kwargs) -> LogProbs:
    """`dpo_ds.ops.logits_logprobs` on the CPU extension."""
    return fused.logits_logprobs(kernels(), logits, labels, **kwargs)


def linear_logprobs(hidden, weight, labels, bias=None, **kwargs) -> LogProbs:
    """`dpo_ds.ops.linear_logprobs` on the CPU extension (ATen matmul per tile)."""
    return fused.linear_logprobs(kernels(), hidden, weight, labels, bias, **kwargs)
