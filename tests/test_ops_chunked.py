"""The chunked torch log-prob ops (`ops.chunked`) against float64 formulas and hand-computed sums."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_ds.ops import LogProbs, linear_logprobs, logits_logprobs, sequence_logps
from dpo_ds.ops import chunked


@pytest.fixture(autouse=True)
def torch_chunked_backend(monkeypatch):
    """These tests are about the chunked torch path: keep dispatch from picking a compiled kernel."""
    monkeypatch.setenv("DPO_DS_LOGPROB_BACKEND", "torch")

IGNORE = -100
ALL_METRICS = dict(with_entropy=True, with_top1=True, with_mean_logits=True, with_log_sum_sq_probs=True)


def expected(raw: torch.Tensor, labels: torch.Tensor, temperature=1.0, softcap=None) -> dict:
    """Every output in float64, straight from the definitions; differentiable wrt raw."""
    z = raw.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    return dict(
        logps=logp.gather(1, safe[:, None]).squeeze(1) * valid,
        entropy=-(logp.exp() * logp).sum(-1) * valid,
        top1=(z.argmax(-1) == labels) & valid,
        mean_logits=z.mean(-1) * valid,
        log_sum_sq_probs=torch.logsumexp(2 * logp, dim=-1) * valid,
    )


def make_labels(n: int, vocab: int, ignored: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    labels[ignored] = IGNORE
    return labels


def check_outputs(out: LogProbs, want: dict, atol: float) -> None:
    for name in ("logps", "entropy", "mean_logits", "log_sum_sq_probs"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, name
        assert not got.requires_grad or name == "logps", name
        torch.testing.assert_close(got.double(), want[name].detach(), atol=atol, rtol=0, msg=name)
    assert out.top1.dtype == torch.bool
    assert torch.equal(out.top1, want["top1"])


SETTINGS = [(1.0, None), (0.7, None), (1.0, 4.0), (1.3, 2.5)]


@pytest.mark.parametrize("temperature,softcap", SETTINGS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_logits_variant_matches_float64(temperature, softcap, chunk_size):
    n, vocab = 13, 37  # 13 rows: no chunk size above 1 divides them
    logits = (3 * torch.randn(n, vocab, generator=torch.Generator().manual_seed(1))).requires_grad_()
    labels = make_labels(n, vocab, ignored=[0, 5, 6])
    labels[3] = logits[3].argmax()  # at least one top-1 hit
    weights = torch.randn(n, generator=torch.Generator().manual_seed(2))

    out = logits_logprobs(logits, labels, temperature=temperature, softcap=softcap, chunk_size=chunk_size,
                          **ALL_METRICS)
    (out.logps * weights).sum().backward()

    raw64 = logits.detach().double().requires_grad_()
    want = expected(raw64, labels, temperature, softcap)
    (want["logps"] * weights.double()).sum().backward()
    check_outputs(out, want, atol=2e-5)
    torch.testing.assert_close(logits.grad.double(), raw64.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature,softcap", SETTINGS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_variant_matches_float64(temperature, softcap, with_bias):
    n, hid, vocab = 11, 6, 29
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, hid, generator=g).requires_grad_()
    weight = torch.randn(vocab, hid, generator=g).requires_grad_()
    bias = torch.randn(vocab, generator=g).requires_grad_() if with_bias else None
    labels = make_labels(n, vocab, ignored=[2, 10])
    weights = torch.randn(n, generator=g)

    out = linear_logprobs(hidden, weight, labels, bias, temperature=temperature, softcap=softcap, chunk_size=3,
                          **ALL_METRICS)
    (out.logps * weights).sum().backward()

    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    raw64 = leaves[0] @ leaves[1].T + (leaves[2] if with_bias else 0)
    want = expected(raw64, labels, temperature, softcap)
    (want["logps"] * weights.double()).sum().backward()
    check_outputs(out, want, atol=2e-5)
    for mine, ref in zip((hidden, weight, bias), leaves):
        torch.testing.assert_close(mine.grad.double(), ref.grad, atol=1e-5, rtol=0)


def test_linear_frozen_weight_gives_only_hidden_grad():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    out = linear_logprobs(hidden, weight, torch.tensor([1, 2, IGNORE, 8, 0]))
    out.logps.sum().backward()
    assert weight.grad is None
    assert torch.equal(hidden.grad[2], torch.zeros(4))
    assert hidden.grad.abs().sum() > 0


def test_ignored_rows_are_never_read():
    """NaN in ignored rows cannot reach outputs or gradients, and ignored positions are exactly 0."""
    n, hid, vocab = 8, 5, 17
    labels = make_labels(n, vocab, ignored=[1, 4, 7])
    logits = torch.randn(n, vocab)
    logits[[1, 4, 7]] = float("nan")
    logits.requires_grad_()
    out = logits_logprobs(logits, labels, chunk_size=2, **ALL_METRICS)
    out.logps.sum().backward()
    for name in ("logps", "entropy", "mean_logits", "log_sum_sq_probs"):
        values = getattr(out, name)
        assert torch.isfinite(values).all(), name
        assert torch.equal(values[[1, 4, 7]], torch.zeros(3)), name
    assert not out.top1[[1, 4, 7]].any()
    assert torch.equal(logits.grad[[1, 4, 7]], torch.zeros(3, vocab))

    hidden = torch.randn(n, hid)
    hidden[[1, 4, 7]] = float("nan")
    hidden.requires_grad_()
    weight = torch.randn(vocab, hid, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    out = linear_logprobs(hidden, weight, labels, bias, chunk_size=2)
    out.logps.sum().backward()
    assert torch.isfinite(out.logps).all() and torch.equal(out.logps[[1, 4, 7]], torch.zeros(3))
    assert torch.isfinite(weight.grad).all() and torch.isfinite(bias.grad).all()
    assert torch.equal(hidden.grad[[1, 4, 7]], torch.zeros(3, hid))


def test_all_ignored():
    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.full((4,), IGNORE)
    out = logits_logprobs(logits, labels, **ALL_METRICS)
    assert torch.equal(out.logps, torch.zeros(4)) and torch.equal(out.entropy, torch.zeros(4))
    assert not out.top1.any()
    out.logps.sum().backward()
    assert torch.equal(logits.grad, torch.zeros(4, 7))

    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    out = linear_logprobs(hidden, weight, labels)
    out.logps.sum().backward()
    assert torch.equal(out.logps, torch.zeros(4))
    assert torch.equal(hidden.grad, torch.zeros(4, 3)) and torch.equal(weight.grad, torch.zeros(7, 3))


def test_metrics_only_when_asked():
    out = logits_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert out.entropy is None and out.top1 is None and out.mean_logits is None and out.log_sum_sq_probs is None
    out = logits_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), with_top1=True)
    assert out.top1 is not None and out.entropy is None


def test_bf16_inputs():
    n, hid, vocab = 10, 8, 41
    g = torch.Generator().manual_seed(4)
    labels = make_labels(n, vocab, ignored=[3])
    logits = (4 * torch.randn(n, vocab, generator=g)).bfloat16().requires_grad_()
    out = logits_logprobs(logits, labels, softcap=5.0, temperature=0.9, chunk_size=3, **ALL_METRICS)
    out.logps.sum().backward()
    raw64 = logits.detach().double().requires_grad_()
    want = expected(raw64, labels, 0.9, 5.0)
    want["logps"].sum().backward()
    check_outputs(out, want, atol=1e-4)  # bf16 values are upcast exactly: fp32 math stays close
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.double(), raw64.grad, atol=1e-2, rtol=1e-2)

    hidden = torch.randn(n, hid, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(vocab, hid, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(vocab, generator=g).bfloat16().requires_grad_()
    out = linear_logprobs(hidden, weight, labels, bias, chunk_size=4, **ALL_METRICS)
    out.logps.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = expected(leaves[0] @ leaves[1].T + leaves[2], labels)
    want["logps"].sum().backward()
    check_outputs(out, want, atol=1e-4)
    for mine, ref in zip((hidden, weight, bias), leaves):
        assert mine.grad.dtype == torch.bfloat16
        torch.testing.assert_close(mine.grad.double(), ref.grad, atol=2e-2, rtol=1e-2)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([2, IGNORE, 0, 6, 3])
    logits = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: logits_logprobs(x, labels, temperature=0.8, softcap=3.0, chunk_size=2).logps, (logits,)
    )
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_logprobs(h, w, labels, b, temperature=1.2, softcap=4.0, chunk_size=3).logps,
        (hidden, weight, bias),
    )


class LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_never_holds_all_logits_in_fp32(monkeypatch):
    n, hid, vocab, chunk = 64, 8, 50, 4
    labels = make_labels(n, vocab, ignored=[0, 9])
    logits = torch.randn(n, vocab).bfloat16().requires_grad_()
    with LargestFloat32() as seen:
        out = logits_logprobs(logits, labels, softcap=3.0, temperature=0.5, chunk_size=chunk, **ALL_METRICS)
        out.logps.sum().backward()
    assert 0 < seen.largest <= chunk * vocab

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 5 * vocab * 4)  # the default chunk is then 5 rows
    with LargestFloat32() as seen:
        logits_logprobs(logits, labels, **ALL_METRICS).logps.sum().backward()
    assert 0 < seen.largest <= 5 * vocab

    # The linear variant also keeps fp32 copies of the weight and its gradient: [V, H], smaller than [N, V] here.
    hidden = torch.randn(n, hid).bfloat16().requires_grad_()
    weight = torch.randn(vocab, hid).bfloat16().requires_grad_()
    with LargestFloat32() as seen:
        linear_logprobs(hidden, weight, labels, chunk_size=chunk, **ALL_METRICS).logps.sum().backward()
    assert 0 < seen.largest <= max(chunk * vocab, vocab * hid) < n * vocab


def test_bad_input_errors():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is outside the vocabulary \[0, 5\)"):
        logits_logprobs(logits, torch.tensor([0, 5, IGNORE]))
    with pytest.raises(ValueError, match=r"labels\[2\] = -1"):
        logits_logprobs(logits, torch.tensor([0, 1, -1]))
    with pytest.raises(TypeError, match="integer"):
        logits_logprobs(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N = 3"):
        logits_logprobs(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits must be"):
        logits_logprobs(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        logits_logprobs(logits, torch.tensor([0, 1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        logits_logprobs(logits, torch.tensor([0, 1, 2]), softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logits_logprobs(logits, torch.tensor([0, 1, 2]), chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\] and weight \[V, H\]"):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[5\]"):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), torch.randn(4))


def test_backend_override(monkeypatch):
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    want = torch.log_softmax(logits.double(), -1)[[0, 1], [0, 2]]
    monkeypatch.setenv("DPO_DS_LOGPROB_BACKEND", "torch")
    torch.testing.assert_close(logits_logprobs(logits, labels).logps.double(), want)
    monkeypatch.setenv("DPO_DS_LOGPROB_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="DPO_DS_LOGPROB_BACKEND='cuda'.*not available"):
        logits_logprobs(logits, labels)
    with pytest.raises(RuntimeError, match="not available"):
        linear_logprobs(torch.randn(2, 4), torch.randn(3, 4), labels)


# Four rows [chosen0, chosen1, rejected0, rejected1]; row r holds -(r + 1) * [1..6], so masked-out positions
# carry non-zero values that must not count.
TOKEN_LOGPS = -torch.arange(1.0, 5.0)[:, None] * torch.arange(1.0, 7.0)
MASK = torch.tensor([
    [0, 1, 1, 1, 1, 0],  # chosen0: 4 tokens, -2 -3 -4 -5
    [0, 0, 1, 1, 1, 0],  # chosen1: 3 tokens, -6 -8 -10
    [0, 1, 1, 0, 0, 0],  # rejected0: 2 tokens, -6 -9
    [1, 1, 1, 1, 1, 1],  # rejected1: 6 tokens, -4 -8 -12 -16 -20 -24
])


def test_sequence_logps_plain_sums():
    torch.testing.assert_close(sequence_logps(TOKEN_LOGPS, MASK), torch.tensor([-14.0, -24.0, -15.0, -84.0]))
    torch.testing.assert_close(sequence_logps(TOKEN_LOGPS, MASK.bool()), torch.tensor([-14.0, -24.0, -15.0, -84.0]))


def test_sequence_logps_ld_alpha():
    # Public lengths: pair 0 min(4, 2) = 2, pair 1 min(3, 6) = 3. Tokens past them are scaled by 0.5.
    want = torch.tensor([
        -2 - 3 + 0.5 * (-4 - 5),
        -6 - 8 - 10,
        -6 - 9,
        -4 - 8 - 12 + 0.5 * (-16 - 20 - 24),
    ])
    torch.testing.assert_close(sequence_logps(TOKEN_LOGPS, MASK, ld_alpha=0.5), want)
    torch.testing.assert_close(sequence_logps(TOKEN_LOGPS, MASK, ld_alpha=1.0), sequence_logps(TOKEN_LOGPS, MASK))


def test_sequence_logps_gradient_is_the_weight():
    token_logps = TOKEN_LOGPS.clone().requires_grad_()
    sequence_logps(token_logps, MASK, ld_alpha=0.25).sum().backward()
    assert torch.equal(token_logps.grad[0], torch.tensor([0, 1, 1, 0.25, 0.25, 0]))
    assert torch.equal(token_logps.grad[3], torch.tensor([1, 1, 1, 0.25, 0.25, 0.25]))


def test_sequence_logps_errors():
    with pytest.raises(ValueError, match="same shape"):
        sequence_logps(TOKEN_LOGPS, MASK[:, :5])
    with pytest.raises(ValueError, match="odd count 3"):
        sequence_logps(TOKEN_LOGPS[:3], MASK[:3], ld_alpha=0.5)
    assert math.isclose(sequence_logps(TOKEN_LOGPS[:3], MASK[:3])[2].item(), -15.0)
