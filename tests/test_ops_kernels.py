"""Fused log-prob backends (torch, cpp, triton under its interpreter) against float64 formulas written here.

Inputs are fresh random tensors on every run (the seed is printed on failure).
The Triton kernels run with TRITON_INTERPRET=1 on CPU tensors at tiny sizes;
the CUDA sources are compiled with nvcc (not run: no GPU here).
"""
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from dpo_ds import ops
from dpo_ds.ops import backends, dispatch, fused

cpp = backends.Backend("cpp")

# Triton's interpreter must be on before triton is first imported (the conftest's imports may already have
# imported it), so the Triton cases run in a child pytest started with TRITON_INTERPRET=1; see
# test_triton_backend_in_interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
IGNORE = -100
CSRC = Path(__file__).resolve().parents[1] / "csrc"
ALL = dict(with_entropy=True, with_top1=True, with_mean_logits=True, with_log_sum_sq_probs=True)
FP32 = dict(rtol=2e-5, atol=2e-5)
"""fp32 results against float64 formulas."""
FIELDS = ("logps", "entropy", "top1", "mean_logits", "log_sum_sq_probs")
needs_triton = pytest.mark.skipif(not (HAVE_TRITON and INTERPRETED),
                                  reason="runs in the TRITON_INTERPRET=1 child of test_triton_backend_in_interpreter")
BACKENDS = ["torch", "cpp", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")


def backend_module(name):
    return dispatch.BACKENDS[name]


def kernels_of(name) -> fused.Kernels:
    return dispatch.BACKENDS[name].kernels()


def processed(raw, temperature, softcap):
    z = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    return z / temperature


def expected(raw64, labels, temperature, softcap):
    """float64 outputs straight from the definitions; 0 / False on ignored rows."""
    z = processed(raw64, temperature, softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    p = logp.exp()
    return {
        "logps": logp.gather(1, safe[:, None]).squeeze(1) * valid,
        "entropy": -(p * logp).sum(-1) * valid,
        "top1": (z.argmax(-1) == labels) & valid,
        "mean_logits": z.mean(-1) * valid,
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1) * valid,
    }


def make_labels(n, vocab, ignored, raw=None):
    labels = torch.randint(0, vocab, (n,))
    if raw is not None:  # some labels on the argmax, so top-1 sees both answers
        labels[::3] = raw[::3].float().argmax(-1)
    labels[list(ignored)] = IGNORE
    return labels


def assert_outputs(out, want, dtype):
    for name in FIELDS:
        got = getattr(out, name)
        assert got.shape == want[name].shape, name
        if name == "top1":
            assert got.dtype == torch.bool and torch.equal(got, want[name]), name
        else:
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got.double(), want[name], **FP32, msg=lambda m: f"{name}: {m}")


def grad_tol(dtype):
    # gradients come back in the input dtype: one rounding of a value of size <= |g|
    return dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)


LOGITS_CASES = {
    # name: (rows, vocab, vocab under the interpreter, ignored rows, temperature, softcap)
    "ragged": (13, 1000, 150, [0, 5, 6], 0.7, None),
    "softcap": (7, 517, 97, [3], 1.3, 3.0),
    "all-ignored": (4, 300, 70, [0, 1, 2, 3], 1.0, 5.0),
    "one-row": (1, 7, 7, [], 2.0, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(LOGITS_CASES))
def test_logits_variant_matches_float64(backend, dtype, case):
    n, vocab, small_vocab, ignored, temperature, softcap = LOGITS_CASES[case]
    vocab = small_vocab if backend == "triton" else vocab
    raw = (torch.randn(n, vocab) * 4).to(dtype).requires_grad_()
    labels = make_labels(n, vocab, ignored, raw.detach())
    out = backend_module(backend).logits_logprobs(raw, labels, temperature=temperature, softcap=softcap, **ALL)

    raw64 = raw.detach().double().requires_grad_()
    want = expected(raw64, labels, temperature, softcap)
    assert_outputs(out, {k: v.detach() for k, v in want.items()}, dtype)

    upstream = torch.randn(n)
    (got,) = torch.autograd.grad((out.logps * upstream).sum(), raw)
    (ref,) = torch.autograd.grad((want["logps"] * upstream.double()).sum(), raw64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **grad_tol(dtype))
    assert not got[labels == IGNORE].any()


LINEAR_CASES = {
    # name: (rows, hidden, vocab, ignored rows, temperature, softcap, bias, chunk_size)
    "bias-chunked": (11, 24, 100, [1, 2, 9], 0.8, None, True, 4),
    "softcap": (6, 16, 75, [0], 1.0, 2.5, False, None),
    "all-ignored": (3, 16, 40, [0, 1, 2], 1.0, None, True, None),
}


@pytest.mark.parametrize("backend", BACKENDS + ["cpp-tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_variant_matches_float64(backend, dtype, case, monkeypatch):
    n, hid, vocab, ignored, temperature, softcap, with_bias, chunk = LINEAR_CASES[case]
    monkeypatch.setattr(backends, "ACCUMULATOR_BYTES", 1)  # hidden-gradient accumulators of one tile: many token chunks
    hidden = torch.randn(n, hid).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hid) / hid**0.5 * 3).to(dtype).requires_grad_()
    bias = torch.randn(vocab).to(dtype).requires_grad_() if with_bias else None
    params = [hidden, weight] + ([bias] if with_bias else [])
    p64 = [p.detach().double().requires_grad_() for p in params]
    raw64 = p64[0] @ p64[1].T + (p64[2] if with_bias else 0)
    labels = make_labels(n, vocab, ignored, raw64.detach())

    kw = dict(temperature=temperature, softcap=softcap, chunk_size=chunk, **ALL)
    if backend.startswith("cpp"):  # several vocabulary tiles, the last one partial
        kernels = dataclasses.replace(cpp.kernels(), tile_cols=48)
        if backend == "cpp-tiled":  # the torch.mm tile driver the CUDA backend uses, with the CPU kernels
            kernels = dataclasses.replace(kernels, linear_forward=None, linear_backward=None)
        out = fused.linear_logprobs(kernels, hidden, weight, labels, bias, **kw)
    else:
        out = backend_module(backend).linear_logprobs(hidden, weight, labels, bias, **kw)
    want = expected(raw64, labels, temperature, softcap)
    assert_outputs(out, {k: v.detach() for k, v in want.items()}, dtype)

    upstream = torch.randn(n)
    grads = torch.autograd.grad((out.logps * upstream).sum(), params)
    refs = torch.autograd.grad((want["logps"] * upstream.double()).sum(), p64)
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, refs):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), ref, **grad_tol(dtype), msg=lambda m: f"grad {name}: {m}")
    assert not grads[0][labels == IGNORE].any()


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=needs_triton)])
def test_linear_without_weight_grad_and_under_no_grad(backend):
    n, hid, vocab = 5, 16, 60
    hidden = torch.randn(n, hid, requires_grad=True)
    weight = torch.randn(vocab, hid)
    labels = make_labels(n, vocab, [2])
    mod = backend_module(backend)
    want = expected(hidden.detach().double() @ weight.double().T, labels, 1.0, None)["logps"]
    with torch.no_grad():
        torch.testing.assert_close(mod.linear_logprobs(hidden, weight, labels).logps.double(), want, **FP32)
    out = mod.linear_logprobs(hidden, weight, labels)
    out.logps.sum().backward()
    assert weight.grad is None and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=needs_triton)])
def test_top1_ties_go_to_the_first_maximum(backend):
    vocab = 1100 if backend == "cpp" else 150  # the maxima sit in different row blocks of the kernels
    first, second = 20, vocab - 20
    raw = torch.randn(4, vocab)
    raw[:, first] = raw[:, second] = 50.0
    labels = torch.tensor([first, second, first, 3])
    out = backend_module(backend).logits_logprobs(raw, labels, with_top1=True)
    assert out.top1.tolist() == [True, False, True, False]


def test_large_logits_stay_finite():
    raw = torch.randn(3, 2000) * 1e4
    labels = torch.tensor([0, 5, IGNORE])
    out = cpp.logits_logprobs(raw, labels, **ALL)
    assert_outputs(out, expected(raw.double(), labels, 1.0, None), torch.float32)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_grad_kernel_writes_every_element_of_a_tile(backend, dtype, softcap):
    n, vocab, start = 6, 300 if backend == "cpp" else 90, 40
    temperature = 0.9
    raw = (torch.randn(n, vocab) * 3).to(dtype)
    labels = torch.tensor([5, IGNORE, start + 7, vocab - 1, IGNORE, start])  # inside and outside the tile
    raw64 = raw.double().requires_grad_()
    z = processed(raw64, temperature, softcap)
    lse = torch.logsumexp(z, -1)
    upstream = torch.randn(n).double()
    valid = labels != IGNORE
    logps = torch.log_softmax(z, -1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    (want,) = torch.autograd.grad((logps * upstream * valid).sum(), raw64)

    tile = raw[:, start:]
    dst = torch.full_like(tile, float("nan"))
    kernels_of(backend).grad(tile, labels, IGNORE, start, lse.float(), upstream.float(), 1 / temperature,
                             softcap or 0.0, dst)
    assert not dst.isnan().any()
    assert not dst[~valid].any()
    torch.testing.assert_close(dst.double(), want[:, start:], **grad_tol(dtype))


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_kernel_merges_tiles_and_skips_ignored_rows(backend, dtype):
    n, vocab = 5, 1300 if backend == "cpp" else 150
    cuts = [0, vocab // 3, vocab // 3 + 1, vocab]  # a one-column tile in the middle
    raw = (torch.randn(n, vocab) * 5).to(dtype)
    labels = torch.tensor([0, IGNORE, vocab // 3, vocab - 1, 17])
    state = fused.new_state(n, raw.device)
    state[:, 1] = float("nan")  # an ignored row: the kernel must not touch it
    k = kernels_of(backend)
    for lo, hi in zip(cuts, cuts[1:]):
        k.fold(raw[:, lo:hi], labels, IGNORE, lo, 1.0, 0.0, sum((1, 2, 4, 8)), state)

    z = raw.double()
    m = z.max(-1).values
    e = (z - m[:, None]).exp()
    before = torch.arange(vocab) < torch.where(labels == IGNORE, 0, labels)[:, None]
    want = torch.stack([
        m, e.sum(-1), (e * (z - m[:, None])).sum(-1), (e * e).sum(-1), z.sum(-1),
        z.masked_fill(~before, float("-inf")).max(-1).values, z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1),
    ])
    valid = labels != IGNORE
    assert state[:, ~valid].isnan().all()
    torch.testing.assert_close(state[:, valid].double(), want[:, valid], rtol=1e-5, atol=1e-4)


def test_self_check_passes_good_kernels_and_rejects_broken_ones():
    fused.self_check(cpp.kernels(), "cpu")
    broken = dataclasses.replace(cpp.kernels(), grad=lambda *args: None)  # leaves the gradient unwritten
    with pytest.raises(fused.BackendUnavailable, match="cpp log-prob kernels failed their self-check on cpu"):
        fused.self_check(broken, "cpu")


def test_dispatch_picks_cpp_on_cpu_and_torch_for_float64(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    x = torch.randn(2, 3)
    assert dispatch.backend_for(x) == "cpp"
    assert dispatch.backend_for(x.double()) == "torch"
    assert dispatch.backend_for(x, torch.randn(3, 3), None) == "cpp"


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=needs_triton)])
def test_forced_backend_runs_that_backend(monkeypatch, backend):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    assert dispatch.backend_for(torch.randn(2, 3)) == backend
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    labels = torch.tensor([4, IGNORE, 19])
    want = expected(hidden.double() @ weight.double().T, labels, 1.0, None)["logps"]
    torch.testing.assert_close(ops.linear_logprobs(hidden, weight, labels).logps.double(), want, **FP32)


def test_forced_backend_errors_are_clear(monkeypatch):
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match=r"DPO_DS_LOGPROB_BACKEND='cuda', but that backend is not available: .*GPU"):
        ops.logits_logprobs(logits, labels)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"'fast' is not a log-prob backend; choose one of \['cpp', 'cuda'"):
        ops.logits_logprobs(logits, labels)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match="cpp log-prob backend takes cpu tensors of dtype float32.*float64"):
        ops.logits_logprobs(logits.double(), labels)


def test_unbuildable_extension_warns_once_and_falls_back(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the build cache should be")
    script = (
        "import warnings, torch\n"
        "from dpo_ds import ops\n"
        "from dpo_ds.ops import dispatch\n"
        "warnings.simplefilter('always')\n"
        "x = torch.randn(3, 5); y = torch.tensor([1, 2, 3])\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for _ in range(3):\n"
        "        out = ops.logits_logprobs(x, y)\n"
        "want = torch.log_softmax(x.double(), -1)[[0, 1, 2], [1, 2, 3]]\n"
        "torch.testing.assert_close(out.logps.double(), want)\n"
        "assert dispatch.backend_for(x) == 'torch'\n"
        "print([str(w.message) for w in seen])\n"
    )
    env = {**os.environ, "DPO_DS_CACHE": str(not_a_dir)}
    env.pop(dispatch.BACKEND_ENV, None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    messages = eval(run.stdout.strip().splitlines()[-1])
    assert len(messages) == 1 and "cpp log-prob backend is unavailable" in messages[0]


@pytest.mark.slow
def test_two_ranks_build_at_once_after_a_crashed_build(tmp_path, monkeypatch):
    """The real build path (file lock, torch's load) on a tiny extension, so it compiles in seconds."""
    src = tmp_path / "probe.cpp"
    src.write_text("#include <pybind11/pybind11.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) "
                   "{ m.def(\"answer\", [] { return 42; }); }\n")
    env = {**os.environ, "DPO_DS_CACHE": str(tmp_path / "cache")}
    build = [sys.executable, "-c",
             f"from pathlib import Path; from dpo_ds.ops import backends; "
             f"print(backends.build_extension('probe', [Path({str(src)!r})], 'sig').answer())"]
    # A builder that died mid-build left torch's baton: plain torch.utils.cpp_extension.load would wait forever.
    monkeypatch.setenv("DPO_DS_CACHE", env["DPO_DS_CACHE"])
    stale = backends.build_root() / backends.extension_name("probe", [src], "sig")
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    ranks = [subprocess.Popen(build, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0 and out.strip() == "42", err


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or not HAVE_TRITON, reason="needs triton; this is the child run itself")
def test_triton_backend_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in (*include_paths(), sysconfig.get_paths()["include"], CSRC)]
    common = ["nvcc", "-c", "-std=c++20", "-Xcompiler", "-fPIC", *includes]
    jobs = [
        common + ["-gencode", "arch=compute_80,code=sm_80", str(CSRC / "logprobs_cuda.cu"), "-o", str(tmp_path / "k.o")],
        common + ["-DTORCH_EXTENSION_NAME=dpo_ds_check", str(CSRC / "logprobs_cuda.cpp"), "-o", str(tmp_path / "b.o")],
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in jobs]
    for cmd, proc in zip(jobs, procs):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{out}"
