"""Autograd plumbing shared by the fused log-prob backends (cpp, cuda, triton).

A backend supplies two kernels over a [n, w] block of raw logits: a whole
logits matrix, or one [tokens, vocab] tile of hidden @ weight.T whose first
column is vocabulary id `vocab_start`.

- `fold(x, labels, ignore_index, vocab_start, inv_t, cap, flags, state)` folds
  every row whose label is not `ignore_index` into `state` ([STATS, n] fp32,
  rows as below) in one streaming pass: an online log-sum-exp, so a row can
  arrive in several vocabulary tiles.
- `grad(x, labels, ignore_index, vocab_start, lse, grad_logps, inv_t, cap, dst)`
  writes d(sum grad_logps * logps) / dx into `dst` (it may alias `x`), zeros on
  ignored rows.

`cap` is the softcap, 0.0 for none. The linear variant projects only the rows
with a real label, a tile at a time (torch.mm) unless the backend brings its own
fused `linear_forward`/`linear_backward` (cpp: per-thread tiles; Triton: a
tl.dot forward). Only `logps` is differentiable; the other outputs are metrics
and WPO weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import chunked
from .types import LogProbs

STATS = 7
"""State rows: running max m, sum e^(z-m), sum e^(z-m)(z-m), sum e^(2(z-m)),
sum z, max z over ids before the label, z at the label."""
INITIAL_STATE = (float("-inf"), 0.0, 0.0, 0.0, 0.0, float("-inf"), 0.0)
ENTROPY, TOP1, MEAN, LSSP = 1, 2, 4, 8
"""Flag bits: which optional statistics a kernel accumulates."""
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailable(RuntimeError):
    """A fused backend cannot run here (no compiler, no GPU, no Triton, ...)."""


@dataclass(frozen=True)
class Kernels:
    """One backend's kernels and tiling defaults (see the module docstring)."""

    name: str
    device_type: str
    fold: Callable[..., None]
    grad: Callable[..., None]
    tile_rows: int
    tile_cols: int
    linear_forward: Optional[Callable[..., Tensor]] = None
    linear_backward: Optional[Callable[..., tuple]] = None

    def check(self, *tensors: Optional[Tensor]) -> None:
        """Raise a clear error for inputs this backend does not take."""
        for t in tensors:
            if t is not None and (t.device.type != self.device_type or t.dtype not in DTYPES):
                raise BackendUnavailable(
                    f"the {self.name} log-prob backend takes {self.device_type} tensors of dtype float32, "
                    f"bfloat16 or float16; got a {t.device.type} {t.dtype} tensor"
                )


@dataclass(frozen=True)
class Config:
    ignore_index: int
    inv_t: float
    cap: float
    flags: int
    tile_rows: int
    tile_cols: int


def new_state(n: int, device: torch.device) -> Tensor:
    """[STATS, n] fp32 statistics before any logits were seen."""
    return torch.tensor(INITIAL_STATE, device=device).unsqueeze(1).repeat(1, n)


def finalize(state: Tensor, vocab: int, flags: int, valid: Optional[Tensor] = None) -> tuple[list, Tensor]:
    """Outputs [logps, entropy, top1, mean_logits, log_sum_sq_probs] and lse from folded statistics.

    Rows where `valid` is False get 0 / False. Top-1 follows argmax: the label's
    logit is the maximum and no earlier id reaches it.
    """
    m, s, x, sq, zs, mbt, zt = state
    log_s = s.log()
    lse = m + log_s
    outs = [
        zt - lse,
        log_s - x / s if flags & ENTROPY else None,
        (zt >= m) & (zt > mbt) if flags & TOP1 else None,
        zs / vocab if flags & MEAN else None,
        sq.log() - 2 * log_s if flags & LSSP else None,
    ]
    if valid is not None:
        outs = [o if o is None else (o & valid if o.dtype == torch.bool else torch.where(valid, o, 0.0)) for o in outs]
    return outs, lse


def _config(kernels: Kernels, vocab: int, ignore_index: int, temperature: float, softcap: Optional[float],
            chunk_size: Optional[int], flags: tuple[bool, bool, bool, bool]) -> Config:
    opt = chunked._options(vocab, torch.float32, temperature, softcap, chunk_size, flags)
    bits = sum(bit for bit, want in zip((ENTROPY, TOP1, MEAN, LSSP), flags) if want)
    return Config(ignore_index, 1.0 / opt.temperature, opt.softcap or 0.0, bits, chunk_size or kernels.tile_rows,
                  kernels.tile_cols)


def _saved(ctx, kernels: Kernels, cfg: Config, tensors: tuple, outs: list) -> tuple:
    """Keep what backward needs on `ctx`; return `outs`, only logps differentiable."""
    ctx.save_for_backward(*tensors)
    ctx.kernels, ctx.cfg = kernels, cfg
    return chunked._finish(ctx, outs)


class _LogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, kernels: Kernels, cfg: Config):
        ctx.set_materialize_grads(False)
        state = new_state(logits.shape[0], logits.device)
        kernels.fold(logits, labels, cfg.ignore_index, 0, cfg.inv_t, cfg.cap, cfg.flags, state)
        outs, lse = finalize(state, logits.shape[1], cfg.flags, labels != cfg.ignore_index)
        return _saved(ctx, kernels, cfg, (logits, labels, lse), outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Optional[Tensor], *_metric_grads):
        if grad_logps is None:
            return None, None, None, None
        logits, labels, lse = ctx.saved_tensors
        cfg = ctx.cfg
        dst = torch.empty_like(logits, memory_format=torch.contiguous_format)
        ctx.kernels.grad(logits, labels, cfg.ignore_index, 0, lse, grad_logps.float().contiguous(), cfg.inv_t,
                         cfg.cap, dst)
        return dst, None, None, None


def _tiles(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], cfg: Config):
    """Yield (row slice, col slice, hidden rows, weight rows, logits tile) over [n, V].

    On CPU the tile is fp32 (upcast operands: exact and no slower there); on a
    GPU it keeps the input dtype, as a plain `hidden @ weight.T` would.
    """
    tile_dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = cfg.tile_rows, min(cfg.tile_cols, vocab)
    buf = torch.empty(min(rows, n) * cols, dtype=tile_dtype, device=hidden.device)
    for r0 in range(0, n, rows):
        r = slice(r0, min(r0 + rows, n))
        h = hidden[r].to(tile_dtype)
        for c0 in range(0, vocab, cols):
            c = slice(c0, min(c0 + cols, vocab))
            w = weight[c].to(tile_dtype)
            tile = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
            if bias is None:
                torch.mm(h, w.t(), out=tile)
            else:
                torch.addmm(bias[c].to(tile_dtype), h, w.t(), out=tile)
            yield r, c, h, w, tile


def _tiled_forward(kernels: Kernels, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   cfg: Config) -> Tensor:
    state = new_state(hidden.shape[0], hidden.device)
    for r, c, _h, _w, tile in _tiles(hidden, weight, bias, cfg):
        kernels.fold(tile, labels[r], cfg.ignore_index, c.start, cfg.inv_t, cfg.cap, cfg.flags, state[:, r])
    return state


def _tiled_backward(kernels: Kernels, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    lse: Tensor, grad_logps: Tensor, cfg: Config, needs: tuple[bool, bool, bool]) -> tuple:
    """fp32 gradients for (hidden rows, weight, bias): recompute each tile, turn it into dlogits in place."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    gh = torch.zeros(hidden.shape, **f32) if needs[0] else None
    gw = torch.zeros(weight.shape, **f32) if needs[1] else None
    gb = torch.zeros(weight.shape[0], **f32) if needs[2] else None
    for r, c, h, w, tile in _tiles(hidden, weight, bias, cfg):
        kernels.grad(tile, labels[r], cfg.ignore_index, c.start, lse[r], grad_logps[r], cfg.inv_t, cfg.cap, tile)
        if gh is not None:
            _addmm_f32(gh[r], tile, w)
        if gw is not None:
            _addmm_f32(gw[c], tile.t(), h)
        if gb is not None:
            gb[c] += tile.sum(dim=0, dtype=torch.float32)
    return gh, gw, gb


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in fp32 without rounding a half-precision product first."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif torch.__version__ >= (2, 8):  # addmm(out_dtype=) exists from torch 2.8 (CUDA)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _rows(t: Tensor, rows: Tensor) -> Tensor:
    """t[rows], without a copy when every row is kept."""
    return t if rows.numel() == t.shape[0] else t.index_select(0, rows)


def _scatter(values: Optional[Tensor], rows: Tensor, n: int) -> Optional[Tensor]:
    """[n, ...] tensor holding `values` at `rows` and zeros elsewhere (no copy when every row is kept)."""
    if values is None or rows.numel() == n:
        return values
    return torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device).index_copy_(0, rows, values)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, labels: Tensor,
                kernels: Kernels, cfg: Config):
        ctx.set_materialize_grads(False)
        h = _rows(hidden, rows)
        fwd = kernels.linear_forward or (lambda *a: _tiled_forward(kernels, *a))
        state = fwd(h, weight, bias, labels, cfg)
        outs, lse = finalize(state, weight.shape[0], cfg.flags)
        full = [_scatter(o, rows, hidden.shape[0]) for o in outs]
        return _saved(ctx, kernels, cfg, (hidden, weight, bias, rows, labels, lse), full)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Optional[Tensor], *_metric_grads):
        if grad_logps is None:
            return (None,) * 7
        hidden, weight, bias, rows, labels, lse = ctx.saved_tensors
        kernels = ctx.kernels
        bwd = kernels.linear_backward or (lambda *a: _tiled_backward(kernels, *a))
        g = _rows(grad_logps, rows).float().contiguous()
        gh, gw, gb = bwd(_rows(hidden, rows), weight, bias, labels, lse, g, ctx.cfg, tuple(ctx.needs_input_grad[:3]))
        if gh is not None:
            gh = _scatter(gh.to(hidden.dtype), rows, hidden.shape[0])
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
                None, None, None, None)


def logits_logprobs(kernels: Kernels, logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                    softcap: float | None = None, ignore_index: int = -100, with_entropy: bool = False,
                    with_top1: bool = False, with_mean_logits: bool = False, with_log_sum_sq_probs: bool = False,
                    chunk_size: int | None = None) -> LogProbs:
    """`chunked.logits_logprobs` on `kernels`: one streaming pass per row, no chunking needed.

    `chunk_size` is validated and otherwise unused: the kernels never hold more
    than one row block of a row.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    chunked._check_labels_shape(labels, logits.shape[0], "rows of logits")
    kernels.check(logits)
    cfg = _config(kernels, logits.shape[1], ignore_index, temperature, softcap, chunk_size,
                  (with_entropy, with_top1, with_mean_logits, with_log_sum_sq_probs))
    chunked._select_rows(labels, logits.shape[1], ignore_index)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return LogProbs(*_LogitsFn.apply(logits, labels.long().contiguous(), kernels, cfg))


def linear_logprobs(kernels: Kernels, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                    *, temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                    with_entropy: bool = False, with_top1: bool = False, with_mean_logits: bool = False,
                    with_log_sum_sq_probs: bool = False, chunk_size: int | None = None) -> LogProbs:
    """`chunked.linear_logprobs` on `kernels`: the LM head fused with the log-prob pass.

    Only rows with a real label are projected; `chunk_size` caps the token rows
    of one tile (the backend's default otherwise). Weight and bias gradients are
    accumulated in fp32, then cast to the parameters' dtypes.
    """
    chunked._check_linear_shapes(hidden, weight, labels, bias)
    kernels.check(hidden, weight, bias)
    cfg = _config(kernels, weight.shape[0], ignore_index, temperature, softcap, chunk_size,
                  (with_entropy, with_top1, with_mean_logits, with_log_sum_sq_probs))
    rows, kept = chunked._select_rows(labels, weight.shape[0], ignore_index)
    return LogProbs(*_LinearFn.apply(hidden, weight, bias, rows, kept.contiguous(), kernels, cfg))


def checked(kernels: Kernels, device: str) -> Kernels | BackendUnavailable:
    """`kernels` if they pass `self_check` on `device`, else the reason, for `backends._load` to remember."""
    try:
        self_check(kernels, device)
    except BackendUnavailable as err:
        return err
    return kernels


def self_check(kernels: Kernels, device: str) -> None:
    """Run `kernels` once on small inputs against the chunked torch ops; BackendUnavailable if they disagree.

    GPU kernels are compiled for the GPU at hand on first use: one that fails to
    build or computes wrong numbers there must fall back, not train on garbage.
    """
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 32, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(300, 32, generator=gen) / 2).to(device).requires_grad_()
    labels = torch.tensor([0, 5, -100, 299, 17, 3], device=device)
    logits = (hidden @ weight.T).detach().requires_grad_()
    upstream = torch.randn(6, generator=gen).to(device)
    kw = dict(temperature=0.9, softcap=5.0, with_entropy=True, with_top1=True, with_mean_logits=True,
              with_log_sum_sq_probs=True)
    cases = (
        (functools.partial(logits_logprobs, kernels), chunked.logits_logprobs, (logits, labels), (logits,)),
        (functools.partial(linear_logprobs, kernels), chunked.linear_logprobs, (hidden, weight, labels),
         (hidden, weight)),
    )
    try:
        for ours_fn, want_fn, args, leaves in cases:
            ours, want = ours_fn(*args, **kw), want_fn(*args, **kw)
            got_grads = torch.autograd.grad((ours.logps * upstream).sum(), leaves)
            want_grads = torch.autograd.grad((want.logps * upstream).sum(), leaves)
            for a, b in zip((*ours, *got_grads), (*want, *want_grads)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    except Exception as err:  # a Triton/nvcc compile error, a launch failure or a mismatch
        raise BackendUnavailable(f"the {kernels.name} log-prob kernels failed their self-check on {device}: "
                                 f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
