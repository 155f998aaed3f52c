"""The fused log-prob backends, `Backend(name)`, each loaded once per process.

- cpp: `csrc/logprobs_cpu.cpp`, compiled with the host compiler on first use.
- cuda: `csrc/logprobs_cuda.{cu,cpp}`, compiled with nvcc when torch has CUDA.
  The logits variant is one kernel launch each way; the linear variant runs
  cuBLAS on [rows, cols] tiles and folds each tile with the same kernels.
- triton: `triton_kernels`, on CUDA tensors; with TRITON_INTERPRET=1 set before
  the first import, in Triton's interpreter on CPU tensors (small sizes only).

The extensions build in `$DPO_DS_CACHE/torch_extensions/` (torch's extension
root otherwise) under a name that hashes the sources, flags, torch and the
device, so a stale or foreign build is never loaded. A file lock
(`fcntl.flock`, released by the kernel if a builder dies) serializes ranks that
build at once; the others then load the finished library. A backend that cannot
load remembers why, so dispatch warns once and uses the chunked torch ops.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import fused
from .types import LogProbs

CPU_SOURCES = ("logprobs_cpu.cpp",)
CPU_CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]  # no FP traps: GCC if-converts, vectorizes
CPU_LDFLAGS = ["-fopenmp"]
CPU_TILE_ROWS = 128
CPU_TILE_COLS = 512
"""One thread's [tokens, vocab] fp32 tile in the fused LM head: 256 KiB, it stays in L2."""
ACCUMULATOR_BYTES = 256 << 20
"""Budget for the cpp per-thread hidden-gradient accumulators; longer inputs run in token chunks."""
CUDA_SOURCES = ("logprobs_cuda.cpp", "logprobs_cuda.cu")
CUDA_FLAGS = ["-O3"]
CUDA_TILE_ROWS = 4096
CUDA_TILE_COLS = 8192


@dataclass(frozen=True)
class Backend:
    """A fused backend by name, with the calls of `chunked`: `logits_logprobs`, `linear_logprobs`."""

    name: str

    def kernels(self) -> fused.Kernels:
        """The backend's kernels; raises BackendUnavailable saying why they cannot be built or run here."""
        loaded = _load(self.name)
        if isinstance(loaded, fused.BackendUnavailable):
            raise fused.BackendUnavailable(str(loaded))  # the remembered failure, as a fresh exception
        return loaded

    def logits_logprobs(self, logits, labels, **kwargs) -> LogProbs:
        """`dpo_ds.ops.logits_logprobs` on this backend."""
        return fused.logits_logprobs(self.kernels(), logits, labels, **kwargs)

    def linear_logprobs(self, hidden, weight, labels, bias=None, **kwargs) -> LogProbs:
        """`dpo_ds.ops.linear_logprobs` on this backend: the LM head fused with the log-prob pass."""
        return fused.linear_logprobs(self.kernels(), hidden, weight, labels, bias, **kwargs)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> fused.Kernels | fused.BackendUnavailable:
    """Load once per process; a failure is remembered too, so it is neither retried nor re-reported."""
    try:
        return LOADERS[name]()
    except fused.BackendUnavailable as err:
        return err


def _compile(backend: str, name: str, sources: tuple[str, ...], signature: Callable[[], str], **load_kwargs):
    """`build_extension` on csrc/ files; any failure (compiler error, no toolchain, read-only cache) is
    BackendUnavailable."""
    src = csrc_dir()
    try:
        return build_extension(name, [src / s for s in sources], signature(), **load_kwargs)
    except Exception as err:
        raise fused.BackendUnavailable(f"the {backend} log-prob extension could not be built: {err}") from err


def _load_cpp() -> fused.Kernels:
    mod = _compile("cpp", "dpo_ds_logprobs_cpu", CPU_SOURCES, _cpu_signature, extra_cflags=CPU_CFLAGS,
                   extra_ldflags=CPU_LDFLAGS)

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

    return fused.Kernels("cpp", "cpu", mod.fold, mod.grad, CPU_TILE_ROWS, CPU_TILE_COLS, linear_forward,
                         linear_backward)


def _f32(*tensors):
    """Contiguous fp32 operands: on a CPU without bf16 matmul units, fp32 matmuls are exact and no slower."""
    return tuple(None if t is None else t.detach().float().contiguous() for t in tensors)


def _load_cuda() -> fused.Kernels | fused.BackendUnavailable:
    if not torch.cuda.is_available():
        raise fused.BackendUnavailable("the cuda log-prob backend needs a CUDA GPU and a CUDA build of torch")

    def signature() -> str:
        arch = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        return f"{arch} {torch.version.cuda} {os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"

    mod = _compile("cuda", "dpo_ds_logprobs_cuda", CUDA_SOURCES, signature, extra_cflags=["-O3"],
                   extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(csrc_dir())])

    def fold(x, labels, ignore_index, vocab_start, inv_t, cap, flags, state):
        mod.fold(x, labels, ignore_index, vocab_start, inv_t, cap, flags, state, _stream(x))

    def grad(x, labels, ignore_index, vocab_start, lse, grad_logps, inv_t, cap, dst):
        mod.grad(x, labels, ignore_index, vocab_start, lse, grad_logps, inv_t, cap, dst, _stream(x))

    return fused.checked(fused.Kernels("cuda", "cuda", fold, grad, CUDA_TILE_ROWS, CUDA_TILE_COLS), "cuda")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _load_triton() -> fused.Kernels | fused.BackendUnavailable:
    try:
        from . import triton_kernels as tk
    except ImportError as err:
        raise fused.BackendUnavailable(f"the triton log-prob backend needs the triton package: {err}") from err
    if not tk.INTERPRET and not torch.cuda.is_available():
        raise fused.BackendUnavailable("the triton log-prob backend needs a CUDA GPU (or TRITON_INTERPRET=1)")
    device = "cpu" if tk.INTERPRET else "cuda"
    kernels = fused.Kernels("triton", device, tk.fold, tk.grad, tk.TILE_ROWS, tk.TILE_COLS, tk.linear_forward)
    return kernels if tk.INTERPRET else fused.checked(kernels, "cuda")


LOADERS: dict[str, Callable[[], fused.Kernels | fused.BackendUnavailable]] = {
    "cpp": _load_cpp, "cuda": _load_cuda, "triton": _load_triton}
"""Backend name -> its loader: the kernels, or why they cannot run here (raised or returned)."""


def csrc_dir() -> Path:
    """The kernel sources: inside the package when installed, else the repository's csrc/."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise fused.BackendUnavailable(
        f"kernel sources not found: no {CPU_SOURCES[0]} in {package}/csrc or {package.parent}/csrc")


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
