"""The fused log-prob backends on their own device against float64 formulas: cuda and triton on a GPU (marked
`gpu`), the C++ backend on the CPU standing in for them (what `scripts/gpu_check.sh --dry-run` runs).

Unlike test_ops_kernels (CPU tensors, Triton in its interpreter at toy sizes), the inputs live on the
device and the vocabularies are not multiples of any block or tile size (a prime above one CUDA tile
of 8192 columns). The float64 reference runs on the CPU.
"""
import dataclasses

import pytest
import torch

from dpo_ds.ops import fused
from dpo_ds.ops.backends import Backend
from test_ops_kernels import ALL, FIELDS, FP32, IGNORE, expected, grad_tol, make_labels, processed

gpu = pytest.mark.gpu
TARGETS = [pytest.param("cpu", "cpp", id="cpu-cpp"), pytest.param("cuda", "cuda", marks=gpu, id="cuda-cuda"),
           pytest.param("cuda", "triton", marks=gpu, id="cuda-triton")]
MODULES = {name: Backend(name) for name in ("cpp", "cuda", "triton")}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close_outputs(out, want, device):
    for name in FIELDS:
        got = getattr(out, name)
        assert got.device.type == device and got.shape == want[name].shape, name
        if name == "top1":
            assert torch.equal(got.cpu(), want[name]), name
        else:
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got.double().cpu(), want[name], **FP32, msg=lambda m: f"{name}: {m}")


LOGITS = {
    # name: (rows, vocab, ignored rows, temperature, softcap)
    "prime-vocab": (37, 10007, [0, 5, 6], 0.7, None),
    "softcap": (9, 1531, [3], 1.3, 3.0),
    "all-ignored": (4, 997, [0, 1, 2, 3], 1.0, 5.0),
}


@pytest.mark.parametrize("device,backend", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LOGITS))
def test_logits_variant_on_device_matches_float64(device, backend, dtype, case):
    n, vocab, ignored, temperature, softcap = LOGITS[case]
    raw_cpu = (torch.randn(n, vocab) * 4).to(dtype)
    labels = make_labels(n, vocab, ignored, raw_cpu)
    raw = raw_cpu.to(device).requires_grad_()
    out = MODULES[backend].logits_logprobs(raw, labels.to(device), temperature=temperature, softcap=softcap, **ALL)
    raw64 = raw_cpu.double().requires_grad_()
    want = expected(raw64, labels, temperature, softcap)
    assert_close_outputs(out, {k: v.detach() for k, v in want.items()}, device)

    upstream = torch.randn(n)
    (got,) = torch.autograd.grad((out.logps * upstream.to(device)).sum(), raw)
    (ref,) = torch.autograd.grad((want["logps"] * upstream.double()).sum(), raw64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), ref, **grad_tol(dtype))
    assert not got[labels.to(device) == IGNORE].any()


LINEAR = {
    # name: (rows, hidden, vocab, ignored rows, temperature, softcap, bias)
    "prime-vocab-bias": (37, 64, 10007, [1, 2, 30], 0.8, None, True),
    "softcap": (21, 48, 1531, [0], 1.0, 2.5, False),
    "all-ignored": (5, 32, 997, [0, 1, 2, 3, 4], 1.0, None, True),
}


@pytest.mark.parametrize("device,backend", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_variant_on_device_matches_float64_with_every_gradient(device, backend, dtype, case):
    n, hid, vocab, ignored, temperature, softcap, with_bias = LINEAR[case]
    cpu = [torch.randn(n, hid), torch.randn(vocab, hid) / hid**0.5 * 3] + ([torch.randn(vocab)] if with_bias else [])
    cpu = [t.to(dtype) for t in cpu]
    params = [t.to(device).requires_grad_() for t in cpu]
    p64 = [t.double().requires_grad_() for t in cpu]
    raw64 = p64[0] @ p64[1].T + (p64[2] if with_bias else 0)
    labels = make_labels(n, vocab, ignored, raw64.detach())
    bias = params[2] if with_bias else None
    out = MODULES[backend].linear_logprobs(params[0], params[1], labels.to(device), bias, temperature=temperature,
                                           softcap=softcap, **ALL)
    want = expected(raw64, labels, temperature, softcap)
    assert_close_outputs(out, {k: v.detach() for k, v in want.items()}, device)

    upstream = torch.randn(n)
    grads = torch.autograd.grad((out.logps * upstream.to(device)).sum(), params)
    refs = torch.autograd.grad((want["logps"] * upstream.double()).sum(), p64)
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, refs):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double().cpu(), ref, **grad_tol(dtype), msg=lambda m: f"grad {name}: {m}")
    assert not grads[0][labels.to(device) == IGNORE].any()


@pytest.mark.parametrize("device,backend", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_kernel_on_device_writes_every_element_of_a_poisoned_tile(device, backend, dtype):
    n, vocab, start, temperature, softcap = 7, 1031, 301, 0.9, 4.0
    raw = (torch.randn(n, vocab) * 3).to(dtype)
    labels = torch.tensor([5, IGNORE, start + 7, vocab - 1, IGNORE, start, 1000])
    raw64 = raw.double().requires_grad_()
    z = processed(raw64, temperature, softcap)
    valid = labels != IGNORE
    logps = torch.log_softmax(z, -1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    upstream = torch.randn(n).double()
    (want,) = torch.autograd.grad((logps * upstream * valid).sum(), raw64)

    tile = raw[:, start:].to(device)
    dst = torch.full_like(tile, float("nan"))
    MODULES[backend].kernels().grad(tile, labels.to(device), IGNORE, start, torch.logsumexp(z, -1).float().to(device),
                                    upstream.float().to(device), 1 / temperature, softcap, dst)
    assert not dst.isnan().any()
    assert not dst[valid.to(device) == 0].any()
    torch.testing.assert_close(dst.double().cpu(), want[:, start:], **grad_tol(dtype))


@pytest.mark.parametrize("device,backend", TARGETS)
def test_linear_variant_on_device_over_several_vocabulary_tiles(device, backend):
    """Forced small tiles: many vocabulary tiles, the last one partial, folded on the device."""
    n, hid, vocab = 19, 32, 3001
    hidden, weight = torch.randn(n, hid), torch.randn(vocab, hid) / hid**0.5
    labels = make_labels(n, vocab, [4])
    kernels = dataclasses.replace(MODULES[backend].kernels(), tile_cols=512)
    out = fused.linear_logprobs(kernels, hidden.to(device), weight.to(device), labels.to(device), **ALL)
    assert_close_outputs(out, expected(hidden.double() @ weight.double().T, labels, 1.0, None), device)
