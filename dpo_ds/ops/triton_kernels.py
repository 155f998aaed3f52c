"""Triton kernels for the fused log-prob backend (imported only when Triton is).

`fold`/`grad` follow the kernel contract in `fused` (one program per row, a
vocabulary block at a time). `linear_forward` fuses the LM head: each program
owns BLOCK_M token rows, walks the vocabulary in BLOCK_N columns, builds each
logits tile with `tl.dot` over BLOCK_K slices of H and folds it straight into
the online log-sum-exp, so no logits reach memory. The linear backward is the
shared tiled one (`fused`): cuBLAS recomputes a [rows, cols] tile, `grad` turns
it into dlogits in place, and cuBLAS accumulates the two gradient products;
fusing those products into Triton would need an atomic add per hidden element
per vocabulary block.

Under TRITON_INTERPRET=1 (set before import) the same kernels run on CPU
tensors with small blocks, which is how CI tests them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fused

INTERPRET = triton.knobs.runtime.interpret
ROW_BLOCK = 64 if INTERPRET else 4096
LINEAR_BLOCKS = (16, 32, 16) if INTERPRET else (64, 128, 64)
"""BLOCK_M, BLOCK_N, BLOCK_K of the fused LM-head forward kernel."""
TILE_ROWS, TILE_COLS = (8, 48) if INTERPRET else (4096, 8192)
"""Token rows and vocabulary columns of one recomputed logits tile in backward."""
NUM_WARPS = 8
UPCAST_DOT = INTERPRET
"""The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, not supported
upstream): under it, dot operands are converted to fp32 after their usual rounding."""


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _transform(x, inv_t, cap, HAS_CAP: tl.constexpr):
    # z = cap * tanh(x / cap) / T, with tanh(y) = 2 sigmoid(2y) - 1; also returns tanh for the chain rule
    if HAS_CAP:
        th = 2 * tl.sigmoid(2 * x / cap) - 1
        z = cap * th * inv_t
    else:
        th = x
        z = x * inv_t
    return z, th


@triton.jit
def _fold_block(z, valid, t, cols, m, s, x, sq, zs, mbt, zt,
                HAS_ENTROPY: tl.constexpr, HAS_TOP1: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_LSSP: tl.constexpr):
    # Fold a [R, C] block of processed logits (cols: block-local column ids, t: label column per row)
    zm = tl.where(valid, z, -float("inf"))
    zt += tl.sum(tl.where(valid & (cols[None, :] == t[:, None]), z, 0.0), axis=1)
    if HAS_MEAN:
        zs += tl.sum(tl.where(valid, z, 0.0), axis=1)
    if HAS_TOP1:
        mbt = tl.maximum(mbt, tl.max(tl.where(cols[None, :] < t[:, None], zm, -float("inf")), axis=1))
    new_m = tl.maximum(m, tl.max(zm, axis=1))
    a = tl.exp(m - new_m)
    e = tl.where(valid, tl.exp(zm - new_m[:, None]), 0.0)
    if HAS_ENTROPY:
        # Re-centre the old sum on the new max; an empty sum stays 0 (m = -inf there)
        shift = tl.where(s > 0, m - new_m, 0.0)
        x = a * (x + shift * s) + tl.sum(e * tl.where(valid, z - new_m[:, None], 0.0), axis=1)
    if HAS_LSSP:
        sq = sq * a * a + tl.sum(e * e, axis=1)
    s = s * a + tl.sum(e, axis=1)
    return new_m, s, x, sq, zs, mbt, zt


@triton.jit
def _load_state(ptr, stride, rows, ok):
    m = tl.load(ptr + rows, mask=ok, other=0.0)
    s = tl.load(ptr + stride + rows, mask=ok, other=0.0)
    x = tl.load(ptr + 2 * stride + rows, mask=ok, other=0.0)
    sq = tl.load(ptr + 3 * stride + rows, mask=ok, other=0.0)
    zs = tl.load(ptr + 4 * stride + rows, mask=ok, other=0.0)
    mbt = tl.load(ptr + 5 * stride + rows, mask=ok, other=0.0)
    zt = tl.load(ptr + 6 * stride + rows, mask=ok, other=0.0)
    return m, s, x, sq, zs, mbt, zt


@triton.jit
def _store_state(ptr, stride, rows, ok, m, s, x, sq, zs, mbt, zt):
    tl.store(ptr + rows, m, mask=ok)
    tl.store(ptr + stride + rows, s, mask=ok)
    tl.store(ptr + 2 * stride + rows, x, mask=ok)
    tl.store(ptr + 3 * stride + rows, sq, mask=ok)
    tl.store(ptr + 4 * stride + rows, zs, mask=ok)
    tl.store(ptr + 5 * stride + rows, mbt, mask=ok)
    tl.store(ptr + 6 * stride + rows, zt, mask=ok)


@triton.jit
def _fold_kernel(x_ptr, x_stride, labels_ptr, state_ptr, state_stride, ignore_index, vocab_start, n_cols,
                 inv_t, cap, HAS_CAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_TOP1: tl.constexpr,
                 HAS_MEAN: tl.constexpr, HAS_LSSP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    rows = row + tl.arange(0, 1)
    ok = tl.full((1,), 1, tl.int1) & (label != ignore_index)
    m, s, x, sq, zs, mbt, zt = _load_state(state_ptr, state_stride, rows, ok)
    t = tl.full((1,), 0, tl.int64) + label - vocab_start
    # Ignored rows: no iterations, no stores
    n_iter = tl.where(label != ignore_index, n_cols, 0)
    row_ptr = x_ptr + row.to(tl.int64) * x_stride
    for start in range(0, n_iter, BLOCK):
        cols = tl.arange(0, BLOCK)
        valid = (start + cols < n_cols)[None, :] & ok[:, None]
        raw = tl.load(row_ptr + start + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        z, _th = _transform(raw, inv_t, cap, HAS_CAP)
        m, s, x, sq, zs, mbt, zt = _fold_block(z, valid, t - start, cols, m, s, x, sq, zs, mbt, zt,
                                               HAS_ENTROPY, HAS_TOP1, HAS_MEAN, HAS_LSSP)
    _store_state(state_ptr, state_stride, rows, ok, m, s, x, sq, zs, mbt, zt)


@triton.jit
def _dlogits(raw, is_label, lse, g, inv_t, cap, HAS_CAP: tl.constexpr):
    # d logp / d raw = g * (1[label] - p) * dz/draw
    z, th = _transform(raw, inv_t, cap, HAS_CAP)
    d = g * (is_label.to(tl.float32) - tl.exp(z - lse)) * inv_t
    if HAS_CAP:
        d = d * (1 - th * th)
    return d


@triton.jit
def _grad_kernel(x_ptr, x_stride, labels_ptr, lse_ptr, g_ptr, dst_ptr, dst_stride, ignore_index, vocab_start,
                 n_cols, inv_t, cap, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    label = tl.load(labels_ptr + row)
    ok = (cols * 0 + label) != ignore_index
    raw = tl.load(x_ptr + row * x_stride + cols, mask=in_row & ok, other=0.0).to(tl.float32)
    g = tl.where(ok, tl.load(g_ptr + row), 0.0)
    lse = tl.where(ok, tl.load(lse_ptr + row), 0.0)
    d = _dlogits(raw, cols == label - vocab_start, lse, g, inv_t, cap, HAS_CAP)
    d = tl.where(ok, d, 0.0)
    tl.store(dst_ptr + row * dst_stride + cols, d.to(dst_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, h_stride, w_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # [BLOCK_M, BLOCK_N] fp32 logits hidden[rows] @ weight[cols].T (+ bias)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * h_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * w_stride + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_fold_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, state_ptr, n, V, H, h_stride, w_stride, inv_t, cap,
                        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                        HAS_TOP1: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_LSSP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    t = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m, s, x, sq, zs, mbt, zt = _load_state(state_ptr, n, rows, row_ok)
    local = tl.arange(0, BLOCK_N)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + local
        col_ok = cols < V
        acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, h_stride, w_stride,
                           HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        z, _th = _transform(acc, inv_t, cap, HAS_CAP)
        m, s, x, sq, zs, mbt, zt = _fold_block(z, row_ok[:, None] & col_ok[None, :], t - v0, local,
                                               m, s, x, sq, zs, mbt, zt, HAS_ENTROPY, HAS_TOP1, HAS_MEAN, HAS_LSSP)
    _store_state(state_ptr, n, rows, row_ok, m, s, x, sq, zs, mbt, zt)


def _flag_kwargs(flags: int) -> dict:
    return dict(HAS_ENTROPY=bool(flags & fused.ENTROPY), HAS_TOP1=bool(flags & fused.TOP1),
                HAS_MEAN=bool(flags & fused.MEAN), HAS_LSSP=bool(flags & fused.LSSP))


def fold(x: Tensor, labels: Tensor, ignore_index: int, vocab_start: int, inv_t: float, cap: float, flags: int,
         state: Tensor) -> None:
    """`fused` fold contract: one program per row."""
    if x.shape[0] == 0:
        return
    _fold_kernel[(x.shape[0],)](x, x.stride(0), labels, state, state.stride(0), ignore_index, vocab_start,
                                x.shape[1], inv_t, cap or 1.0, HAS_CAP=cap > 0, BLOCK=ROW_BLOCK,
                                num_warps=NUM_WARPS, **_flag_kwargs(flags))


def grad(x: Tensor, labels: Tensor, ignore_index: int, vocab_start: int, lse: Tensor, grad_logps: Tensor,
         inv_t: float, cap: float, dst: Tensor) -> None:
    """`fused` grad contract: a program per (row, vocabulary block)."""
    if x.numel() == 0:
        return
    grid = (x.shape[0], triton.cdiv(x.shape[1], ROW_BLOCK))
    _grad_kernel[grid](x, x.stride(0), labels, lse, grad_logps, dst, dst.stride(0), ignore_index, vocab_start,
                       x.shape[1], inv_t, cap or 1.0, HAS_CAP=cap > 0, BLOCK=ROW_BLOCK, num_warps=NUM_WARPS)


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get true fp32 products (not TF32), as a plain fp32 matmul would by default
    return "ieee" if dtype == torch.float32 else None


def _operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Same-dtype operands with unit last stride, as tl.dot needs."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


def linear_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, cfg: fused.Config) -> Tensor:
    """Folded statistics of hidden @ weight.T (+ bias) without materializing any logits."""
    h, w = _operands(hidden, weight)
    n, (V, H) = h.shape[0], w.shape
    state = fused.new_state(n, h.device)
    if n == 0:
        return state
    bm, bn, bk = LINEAR_BLOCKS
    _linear_fold_kernel[(triton.cdiv(n, bm),)](
        h, w, bias if bias is not None else h, labels, state, n, V, H, h.stride(0), w.stride(0), cfg.inv_t,
        cfg.cap or 1.0, HAS_BIAS=bias is not None, HAS_CAP=cfg.cap > 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_precision(h.dtype), UPCAST=UPCAST_DOT, num_warps=NUM_WARPS, **_flag_kwargs(cfg.flags))
    return state
