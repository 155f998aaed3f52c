"""Plain PyTorch per-token log-probs: the reference every fused backend is tested against.

Rows whose label is ignored are dropped before any work; the rest are processed
a chunk of rows at a time, so at most [chunk, V] fp32 logits exist at once.
Math runs in fp32 (fp64 for fp64 inputs) whatever the input dtype. The autograd
functions save only their inputs and recompute each chunk's logits in backward.
Only `logps` is differentiable; entropy, top-1, mean logits and log sum p^2 are
metrics and WPO weights, computed in the same pass without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .types import LogProbs

CHUNK_BYTES = 64 * 2**20
"""Default budget for one chunk of fp32 logits."""


@dataclass(frozen=True)
class _Options:
    temperature: float
    softcap: Optional[float]
    with_entropy: bool
    with_top1: bool
    with_mean_logits: bool
    with_log_sum_sq_probs: bool
    chunk_rows: int


def _process(raw: Tensor, opt: _Options) -> Tensor:
    """raw logits -> softcap * tanh(raw / softcap) -> divide by temperature."""
    z = raw
    if opt.softcap is not None:
        z = opt.softcap * torch.tanh(raw / opt.softcap)
    if opt.temperature != 1.0:
        z = z / opt.temperature
    return z


def _chunk_outputs(raw: Tensor, labels: Tensor, opt: _Options) -> list[Optional[Tensor]]:
    """[C, V] raw logits -> [logps, entropy, top1, mean, log_sum_sq_probs] of C rows each."""
    z = _process(raw, opt)
    lse = torch.logsumexp(z, dim=-1)
    logps = z.gather(1, labels.unsqueeze(1)).squeeze(1) - lse
    entropy = top1 = mean = lssp = None
    if opt.with_entropy or opt.with_log_sum_sq_probs:
        log_p = z - lse.unsqueeze(1)
        if opt.with_entropy:
            p = log_p.exp()
            entropy = -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)
        if opt.with_log_sum_sq_probs:
            lssp = torch.logsumexp(2 * log_p, dim=-1)
    if opt.with_top1:
        top1 = z.argmax(dim=-1) == labels
    if opt.with_mean_logits:
        mean = z.mean(dim=-1)
    return [logps, entropy, top1, mean, lssp]


def _grad_raw(raw: Tensor, labels: Tensor, grad_logps: Tensor, opt: _Options) -> Tensor:
    """d(sum grad_logps * logps) / d raw for one [C, V] chunk: (onehot - softmax) chained through z."""
    grad = torch.softmax(_process(raw, opt), dim=-1).neg_()
    grad.scatter_add_(1, labels.unsqueeze(1), torch.ones_like(labels, dtype=grad.dtype).unsqueeze(1))
    grad.mul_(grad_logps.unsqueeze(1))
    if opt.temperature != 1.0:
        grad.div_(opt.temperature)
    if opt.softcap is not None:
        grad.mul_(1 - torch.tanh(raw / opt.softcap).square())
    return grad


def _chunks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _forward(raw_rows, n: int, rows: Tensor, labels: Tensor, acc: torch.dtype, opt: _Options) -> list:
    """Run `_chunk_outputs` over chunks of the selected rows; scatter into [n] tensors (0 elsewhere)."""
    flags = [True, opt.with_entropy, opt.with_top1, opt.with_mean_logits, opt.with_log_sum_sq_probs]
    outs = [
        torch.zeros(n, dtype=torch.bool if i == 2 else acc, device=rows.device) if want else None
        for i, want in enumerate(flags)
    ]
    for start, end in _chunks(rows.numel(), opt.chunk_rows):
        part = _chunk_outputs(raw_rows(rows[start:end]), labels[start:end], opt)
        for out, value in zip(outs, part):
            if out is not None:
                out[rows[start:end]] = value
    return outs


def _finish(ctx, outs: list) -> tuple:
    ctx.mark_non_differentiable(*[o for o in outs[1:] if o is not None])
    return tuple(outs)


class _LogitsLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, labels: Tensor, opt: _Options):
        acc = torch.promote_types(logits.dtype, torch.float32)
        ctx.save_for_backward(logits, rows, labels)
        ctx.opt = opt
        outs = _forward(lambda r: logits[r].to(acc), logits.shape[0], rows, labels, acc, opt)
        return _finish(ctx, outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor, *_metric_grads):
        logits, rows, labels = ctx.saved_tensors
        acc = torch.promote_types(logits.dtype, torch.float32)
        grad_logits = torch.zeros_like(logits)
        for start, end in _chunks(rows.numel(), ctx.opt.chunk_rows):
            r = rows[start:end]
            g = _grad_raw(logits[r].to(acc), labels[start:end], grad_logps[r].to(acc), ctx.opt)
            grad_logits[r] = g.to(logits.dtype)
        return grad_logits, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, labels: Tensor,
                opt: _Options):
        acc = _acc_dtype(hidden, weight, bias)
        w, b = weight.to(acc), None if bias is None else bias.to(acc)
        ctx.save_for_backward(hidden, weight, bias, rows, labels)
        ctx.opt = opt
        outs = _forward(lambda r: F.linear(hidden[r].to(acc), w, b), hidden.shape[0], rows, labels, acc, opt)
        return _finish(ctx, outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor, *_metric_grads):
        hidden, weight, bias, rows, labels = ctx.saved_tensors
        acc = _acc_dtype(hidden, weight, bias)
        w, b = weight.to(acc), None if bias is None else bias.to(acc)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(w) if want_w else None
        grad_b = torch.zeros_like(b) if want_b else None
        for start, end in _chunks(rows.numel(), ctx.opt.chunk_rows):
            r = rows[start:end]
            h = hidden[r].to(acc)
            g = _grad_raw(F.linear(h, w, b), labels[start:end], grad_logps[r].to(acc), ctx.opt)
            if want_h:
                grad_h[r] = (g @ w).to(hidden.dtype)
            if want_w:
                grad_w.addmm_(g.T, h)
            if want_b:
                grad_b += g.sum(dim=0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def _acc_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    acc = torch.float32
    for t in tensors:
        if t is not None:
            acc = torch.promote_types(acc, t.dtype)
    return acc


def _select_rows(labels: Tensor, vocab: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Indices of the non-ignored rows and their labels; out-of-vocabulary labels are an error."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    rows = (labels != ignore_index).nonzero().squeeze(1)
    kept = labels[rows]
    bad = ((kept < 0) | (kept >= vocab)).nonzero()
    if bad.numel():
        i = rows[bad[0, 0]].item()
        raise ValueError(
            f"labels[{i}] = {labels[i].item()} is outside the vocabulary [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    return rows, kept.long()


def _options(vocab: int, acc: torch.dtype, temperature: float, softcap: Optional[float], chunk_size: Optional[int],
             flags: tuple[bool, bool, bool, bool]) -> _Options:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (max(vocab, 1) * acc.itemsize))
    return _Options(float(temperature), None if softcap is None else float(softcap), *flags, chunk_rows=chunk_size)


def _check_labels_shape(labels: Tensor, n: int, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be [N] with N = {n} ({what}), got {tuple(labels.shape)}")


def _check_linear_shapes(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H] with the same H, got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_labels_shape(labels, hidden.shape[0], "rows of hidden")


def logits_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    with_entropy: bool = False,
    with_top1: bool = False,
    with_mean_logits: bool = False,
    with_log_sum_sq_probs: bool = False,
    chunk_size: int | None = None,
) -> LogProbs:
    """Per-token log p(label) from logits [N, V] and labels [N]; see LogProbs.

    `chunk_size` rows are processed at once (default: ~64 MiB of fp32 logits).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    _check_labels_shape(labels, logits.shape[0], "rows of logits")
    acc = _acc_dtype(logits)
    opt = _options(logits.shape[1], acc, temperature, softcap, chunk_size,
                   (with_entropy, with_top1, with_mean_logits, with_log_sum_sq_probs))
    rows, kept = _select_rows(labels, logits.shape[1], ignore_index)
    return LogProbs(*_LogitsLogProbs.apply(logits, rows, kept, opt))


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    with_entropy: bool = False,
    with_top1: bool = False,
    with_mean_logits: bool = False,
    with_log_sum_sq_probs: bool = False,
    chunk_size: int | None = None,
) -> LogProbs:
    """Per-token log p(label) through the LM head: logits = hidden [N, H] @ weight [V, H]^T + bias [V].

    Only the hidden rows of non-ignored labels are projected. The weight is cast
    once to fp32 when it is half precision, and its gradient is accumulated in
    fp32 before the cast back to the weight's dtype.
    """
    _check_linear_shapes(hidden, weight, labels, bias)
    acc = _acc_dtype(hidden, weight, bias)
    opt = _options(weight.shape[0], acc, temperature, softcap, chunk_size,
                   (with_entropy, with_top1, with_mean_logits, with_log_sum_sq_probs))
    rows, kept = _select_rows(labels, weight.shape[0], ignore_index)
    return LogProbs(*_LinearLogProbs.apply(hidden, weight, bias, rows, kept, opt))
