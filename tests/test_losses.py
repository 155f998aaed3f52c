"""dpo_ds.losses against an independent float64 reference of each published formula.

The reference below works on Python floats, one pair at a time, straight from the papers' equations;
it shares no code with dpo_ds.losses.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from dpo_ds.config import DPOConfig
from dpo_ds.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    LossConfig,
    PairLogps,
    compute_loss,
    needs_reference,
    preference_loss,
    preference_rewards,
    validate_loss_args,
)


# ---------------------------------------------------------------- reference formulas (scalar float64)
def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def score(rho, fdiv, alpha):
    u = math.exp(rho)
    if fdiv == "reverse_kl":
        return math.log(u)
    if fdiv == "forward_kl":
        return 1 - 1 / u
    if fdiv == "js_divergence":
        return math.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


def smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def reference_losses(kind, pc, pr, rc, rr, lc, lr, beta=0.1, eps=0.0, fdiv="reverse_kl", alpha=0.5,
                     tau=0.05, gamma=0.5):
    """Per-pair losses as lists of floats, one formula per paper."""
    n = len(pc)
    rw = [pc[i] - rc[i] for i in range(n)]
    rl = [pr[i] - rr[i] for i in range(n)]
    sw = [score(x, fdiv, alpha) for x in rw]
    sl = [score(x, fdiv, alpha) for x in rl]
    d = [sw[i] - sl[i] for i in range(n)]
    lcc = [max(x, 1.0) for x in lc]
    lrc = [max(x, 1.0) for x in lr]
    out = []
    for i in range(n):
        z = beta * d[i]
        if kind == "sigmoid":  # DPO Eq. 7; cDPO when eps > 0
            v = smoothed(z, eps)
        elif kind == "hinge":
            v = max(0.0, 1 - z)
        elif kind == "ipo":  # IPO Eq. 17, per-token
            v = (sw[i] / lcc[i] - sl[i] / lrc[i] - 1 / (2 * beta)) ** 2
        elif kind == "sigmoid_norm":
            v = -logsig(beta * (sw[i] / lcc[i] - sl[i] / lrc[i]))
        elif kind == "exo_pair":  # KL(softmax over {w, l} || [1-eps, eps])
            q = [sig(z), sig(-z)]
            p = [1 - eps, eps]
            v = sum(q[k] * (math.log(q[k]) - math.log(p[k])) for k in range(2))
        elif kind == "nca_pair":
            v = -logsig(beta * rw[i]) - 0.5 * logsig(-beta * rw[i]) - 0.5 * logsig(-beta * rl[i])
        elif kind == "robust":  # rDPO Eq. 8
            v = ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -logsig(beta * rw[i]) - logsig(-beta * rl[i])
        elif kind == "sppo_hard":
            v = (rw[i] - 1 / (2 * beta)) ** 2 + (rl[i] + 1 / (2 * beta)) ** 2
        elif kind == "aot":
            pol = sorted(pc[j] - pr[j] for j in range(n))
            ref = sorted(rc[j] - rr[j] for j in range(n))
            v = smoothed(beta * (pol[i] - ref[i]), eps)
        elif kind == "aot_unpaired":
            v = smoothed(beta * (sorted(rw)[i] - sorted(rl)[i]), eps)
        elif kind == "apo_zero":  # APO Eq. 7
            v = (1 - sig(beta * rw[i])) + sig(beta * rl[i])
        elif kind == "apo_down":  # APO Eq. 8
            v = sig(beta * rw[i]) + (1 - sig(beta * (rw[i] - rl[i])))
        elif kind == "discopop":  # DiscoPOP Eq. 5
            m = sig(z / tau)
            v = (1 - m) * -logsig(z) + m * math.exp(-z)
        elif kind == "sft":
            v = -sum(pc) / max(sum(lc), 1.0)
        elif kind == "simpo":  # SimPO Eq. 6
            v = smoothed(beta * (pc[i] / lcc[i] - pr[i] / lrc[i]) - gamma, eps)
        elif kind == "cpo":  # CPO Eq. 3
            v = smoothed(beta * (pc[i] - pr[i]), eps)
        elif kind == "orpo":  # ORPO Eqs. 4-7: odds = p / (1 - p) with p the per-token mean probability
            pw, pl = math.exp(pc[i] / lcc[i]), math.exp(pr[i] / lrc[i])
            v = -beta * logsig(math.log(pw / (1 - pw)) - math.log(pl / (1 - pl)))
        else:
            raise KeyError(kind)
        out.append(v)
    return out


# ---------------------------------------------------------------- inputs
def make_pairs(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc = -(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 5)
    pr = -(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 5)
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64) * 2
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64) * 2
    lc = torch.randint(1, 60, (n,), generator=g)
    lr = torch.randint(1, 60, (n,), generator=g)
    return [t.to(dtype) for t in (pc, pr, rc, rr)] + [lc, lr]


def lists(*tensors):
    return [t.tolist() for t in tensors]


def loss_of(kind, pc, pr, rc, rr, lc, lr, **kw):
    return preference_loss(kind, pc, pr, rc, rr, loss_config(loss_type=kind, **kw), chosen_lengths=lc,
                           rejected_lengths=lr)


def assert_close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- each loss vs. its formula
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type_matches_formula(kind):
    pc, pr, rc, rr, lc, lr = make_pairs()
    eps = 1e-3 if kind == "exo_pair" else 0.0
    got = loss_of(kind, pc, pr, rc, rr, lc, lr, beta=0.3, label_smoothing=eps)
    assert got.shape == (6,) and got.dtype == torch.float64
    assert_close(got, reference_losses(kind, *lists(pc, pr, rc, rr, lc, lr), beta=0.3, eps=eps))


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo"])
def test_label_smoothing(kind):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=1)
    got = loss_of(kind, pc, pr, rc, rr, lc, lr, beta=0.2, label_smoothing=0.2)
    assert_close(got, reference_losses(kind, *lists(pc, pr, rc, rr, lc, lr), beta=0.2, eps=0.2))
    # label smoothing really changes these losses
    if kind != "exo_pair":
        plain = loss_of(kind, pc, pr, rc, rr, lc, lr, beta=0.2)
        assert not torch.allclose(got, plain)


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("kind", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences(kind, fdiv):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=2)
    eps = 0.1 if kind in {"exo_pair", "robust"} else 0.0
    opts = dict(beta=0.5, label_smoothing=eps, f_divergence_type=fdiv, f_alpha_divergence_coef=0.3)
    got = loss_of(kind, pc, pr, rc, rr, lc, lr, **opts)
    expected = reference_losses(kind, *lists(pc, pr, rc, rr, lc, lr), beta=0.5, eps=eps, fdiv=fdiv, alpha=0.3)
    assert_close(got, expected)


def test_alpha_divergence_at_one_is_reverse_kl():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=3)
    alpha_one = loss_of("sigmoid", pc, pr, rc, rr, lc, lr, f_divergence_type="alpha_divergence",
                        f_alpha_divergence_coef=1.0)
    assert_close(alpha_one, reference_losses("sigmoid", *lists(pc, pr, rc, rr, lc, lr)))


def test_alpha_divergence_other_coefficient_differs_from_trl_default():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=3)
    for alpha in (0.5, 2.0):
        got = loss_of("hinge", pc, pr, rc, rr, lc, lr, beta=2.0, f_divergence_type="alpha_divergence",
                      f_alpha_divergence_coef=alpha)
        expected = reference_losses("hinge", *lists(pc, pr, rc, rr, lc, lr), beta=2.0, fdiv="alpha_divergence",
                                    alpha=alpha)
        assert_close(got, expected)


def test_discopop_tau_and_simpo_gamma_options():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=4)
    got = loss_of("discopop", pc, pr, rc, rr, lc, lr, beta=0.2, discopop_tau=0.7)
    assert_close(got, reference_losses("discopop", *lists(pc, pr, rc, rr, lc, lr), beta=0.2, tau=0.7))
    got = loss_of("simpo", pc, pr, None, None, lc, lr, beta=2.0, simpo_gamma=1.3)
    assert_close(got, reference_losses("simpo", *lists(pc, pr, rc, rr, lc, lr), beta=2.0, gamma=1.3))


def test_reference_free_sigmoid_treats_reference_as_zero():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=6)
    got = loss_of("sigmoid", pc, pr, None, None, lc, lr, reference_free=True)
    zeros = [0.0] * 6
    assert_close(got, reference_losses("sigmoid", pc.tolist(), pr.tolist(), zeros, zeros, lc.tolist(), lr.tolist()))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        loss_of("sigmoid", pc, pr, None, None, lc, lr)


@pytest.mark.parametrize("kind", ["simpo", "cpo", "orpo", "sft"])
def test_policy_only_losses_ignore_reference(kind):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=7)
    torch.testing.assert_close(loss_of(kind, pc, pr, None, None, lc, lr), loss_of(kind, pc, pr, rc, rr, lc, lr))


# ---------------------------------------------------------------- edge cases
def test_sigmoid_is_log2_when_policy_equals_reference():
    pc, pr, _, _, lc, lr = make_pairs(seed=8)
    got = loss_of("sigmoid", pc, pr, pc.clone(), pr.clone(), lc, lr, beta=0.1)
    assert torch.all((got - math.log(2)).abs() < 1e-7)
    equal = torch.full((4,), -12.5, dtype=torch.float64)
    got = preference_loss("sigmoid", equal, equal, equal, equal, loss_config())
    assert torch.all((got - math.log(2)).abs() < 1e-7)


BOUNDED_AT_LARGE_MARGINS = ["sigmoid", "hinge", "robust", "nca_pair", "bco_pair", "apo_zero", "apo_down", "discopop",
                            "exo_pair", "sigmoid_norm", "aot", "aot_unpaired", "simpo", "cpo", "orpo"]


@pytest.mark.parametrize("kind", BOUNDED_AT_LARGE_MARGINS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_margins_stay_finite(kind, sign):
    # chosen/rejected log-ratios of +-1e3: sigmoid(beta * 2e3) underflows, so log(sigmoid(.)) would be -inf.
    pc = torch.tensor([-10.0, -2000.0], requires_grad=True)
    pr = torch.tensor([-2000.0, -10.0], requires_grad=True)
    rc = torch.tensor([-10.0 - sign * 1e3, -2000.0 - sign * 1e3])
    rr = torch.tensor([-2000.0 + sign * 1e3, -10.0 + sign * 1e3])
    lengths = torch.tensor([1, 1])
    eps = 0.1 if kind in {"robust", "exo_pair"} else 0.0
    loss = loss_of(kind, pc, pr, rc, rr, lengths, lengths, beta=1.0, label_smoothing=eps)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if kind == "sigmoid":  # -log sigmoid(z) -> max(0, -z): 0 when chosen wins, |z| = 2e3 when it loses
        expected = torch.full((2,), 0.0 if sign > 0 else 2e3)
        torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm", "simpo", "orpo", "sft"])
def test_zero_lengths_divide_by_one(kind):
    pc, pr, rc, rr, _, _ = make_pairs(n=3, seed=9)
    pc = torch.tensor([-3.0, -4.0, -0.5], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.long)
    # sft divides by the batch's token total, the others by each sequence's length
    one = torch.tensor([1, 0, 0]) if kind == "sft" else torch.ones(3, dtype=torch.long)
    got = loss_of(kind, pc, pr, rc, rr, zero, zero)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, loss_of(kind, pc, pr, rc, rr, one, one))


def test_orpo_is_finite_when_a_sequence_has_probability_one():
    zero = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    loss = preference_loss("orpo", zero, pr, None, None, loss_config(), chosen_lengths=torch.ones(2),
                           rejected_lengths=torch.ones(2))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm", "simpo", "orpo"])
def test_length_normalized_losses_use_given_lengths(kind):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=10)
    longer = lc * 3
    got = loss_of(kind, pc, pr, rc, rr, longer, lr, beta=0.5)
    assert_close(got, reference_losses(kind, *lists(pc, pr, rc, rr, longer, lr), beta=0.5))
    assert (got - loss_of(kind, pc, pr, rc, rr, lc, lr, beta=0.5)).abs().min() > 1e-6
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(kind, pc, pr, rc, rr, loss_config())


def test_sft_is_batch_token_mean():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=11)
    got = loss_of("sft", pc, pr, rc, rr, lc, lr)
    assert torch.all(got == got[0])
    assert got[0].item() == pytest.approx(-sum(pc.tolist()) / sum(lc.tolist()), rel=1e-12)


SMOOTH = ["sigmoid", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
          "discopop", "sft", "sigmoid_norm", "simpo", "cpo", "orpo"]


@pytest.mark.parametrize("kind", SMOOTH)
def test_gradcheck(kind):
    pc, pr, rc, rr, lc, lr = make_pairs(n=4, seed=12)
    pc, pr = pc / 10, pr / 10  # keep orpo's mean probabilities away from 0
    eps = 0.1 if kind in {"exo_pair", "robust"} else 0.0

    def f(a, b):
        return loss_of(kind, a, b, rc / 10, rr / 10, lc, lr, beta=0.5, label_smoothing=eps)

    assert torch.autograd.gradcheck(f, (pc.requires_grad_(), pr.requires_grad_()))


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck_f_divergence(fdiv):
    pc, pr, rc, rr, lc, lr = make_pairs(n=4, seed=13)

    def f(a, b):
        return loss_of("sigmoid", a, b, rc, rr, lc, lr, f_divergence_type=fdiv)

    assert torch.autograd.gradcheck(f, (pc.requires_grad_(), pr.requires_grad_()))


def test_shape_and_type_errors_name_the_argument():
    pc, pr, rc, rr, lc, lr = make_pairs()
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference_loss("sigmoid", pc, pr, rc, rr[:3], loss_config())
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        preference_loss("sigmoid", pc[None], pr, rc, rr, loss_config())
    with pytest.raises(TypeError, match="chosen_lengths"):
        preference_loss("ipo", pc, pr, rc, rr, loss_config(), chosen_lengths=[1] * 6, rejected_lengths=lr)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss("dpo", pc, pr, rc, rr, loss_config())


def test_rewards_are_detached_beta_logratios():
    pc, pr, rc, rr, _, _ = make_pairs(seed=14)
    pc.requires_grad_()
    chosen, rejected = preference_rewards(pc, pr, rc, rr, beta=0.25)
    assert not chosen.requires_grad
    assert_close(chosen, [0.25 * (a - b) for a, b in zip(pc.tolist(), rc.tolist())])
    assert_close(rejected, [0.25 * (a - b) for a, b in zip(pr.tolist(), rr.tolist())])
    chosen, _ = preference_rewards(pc, pr, None, None, beta=0.25)
    assert_close(chosen, [0.25 * a for a in pc.tolist()])


# ---------------------------------------------------------------- compute_loss
def config(**kw):
    base = dict(loss_type="sigmoid", loss_weights=None, beta=0.1, label_smoothing=0.0, rpo_alpha=None,
                use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, simpo_gamma=0.5,
                discopop_tau=0.05, reference_free=False, ld_alpha=None, cpo_alpha=1.0)
    base.update(kw)
    return SimpleNamespace(**base)


def loss_config(**kw):
    return LossConfig.from_config(config(**kw))


def pair_logps(seed=15, wpo=False):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    cw, rw = (-(torch.rand(6, generator=g, dtype=torch.float64) * 2 + 0.1) for _ in range(2)) if wpo else (None, None)
    policy = PairLogps(pc.requires_grad_(), pr.requires_grad_(), lc, lr, cw, rw)
    return policy, PairLogps(rc, rr, lc, lr)


def test_compute_loss_single_sigmoid():
    policy, ref = pair_logps()
    out = compute_loss(loss_config(beta=0.2), policy, ref)
    expected = reference_losses("sigmoid", *lists(policy.chosen, policy.rejected, ref.chosen, ref.rejected,
                                                  policy.chosen_lengths, policy.rejected_lengths), beta=0.2)
    assert_close(out.per_pair, expected)
    assert out.loss.item() == pytest.approx(sum(expected) / 6, rel=1e-12)
    assert_close(out.chosen_rewards, [0.2 * (a - b) for a, b in zip(policy.chosen.tolist(), ref.chosen.tolist())])
    out.loss.backward()
    assert policy.chosen.grad is not None


def test_compute_loss_mpo_weighted_sum():
    policy, ref = pair_logps(seed=16)
    args = loss_config(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    out = compute_loss(args, policy, ref)
    inputs = lists(policy.chosen, policy.rejected, ref.chosen, ref.rejected, policy.chosen_lengths,
                   policy.rejected_lengths)
    parts = [reference_losses(k, *inputs) for k in args.loss_types]
    expected = [0.8 * a + 0.2 * b + 1.0 * c for a, b, c in zip(*parts)]
    assert_close(out.per_pair, expected)
    default_weights = compute_loss(loss_config(loss_type=["sigmoid", "bco_pair"]), policy, ref)
    assert_close(default_weights.per_pair, [a + b for a, b in zip(parts[0], parts[1])])


def test_compute_loss_rpo_alpha_adds_chosen_nll():
    policy, ref = pair_logps(seed=17)
    out = compute_loss(loss_config(rpo_alpha=0.5), policy, ref)
    inputs = lists(policy.chosen, policy.rejected, ref.chosen, ref.rejected, policy.chosen_lengths,
                   policy.rejected_lengths)
    nll = [-c / n for c, n in zip(inputs[0], inputs[4])]
    assert_close(out.per_pair, [d + 0.5 * x for d, x in zip(reference_losses("sigmoid", *inputs), nll)])


def test_compute_loss_wpo_weights_are_unclamped_and_detached():
    """TRL 1.16 multiplies each pair's loss by exp(chosen mean) * exp(rejected mean) with no clamp at 1."""
    policy, ref = pair_logps(seed=18, wpo=True)
    policy.chosen_wpo[0] = 1.0  # exp(1 + 0.5) = 4.48: kept, as TRL keeps it
    policy.rejected_wpo[0] = 0.5
    policy.chosen_wpo.requires_grad_()
    out = compute_loss(loss_config(use_weighting=True, rpo_alpha=0.1), policy, ref)
    inputs = lists(policy.chosen, policy.rejected, ref.chosen, ref.rejected, policy.chosen_lengths,
                   policy.rejected_lengths)
    weights = [math.exp(a) * math.exp(b) for a, b in zip(policy.chosen_wpo.tolist(), policy.rejected_wpo.tolist())]
    assert weights[0] == pytest.approx(math.exp(1.5)) and max(weights[1:]) < 1.0
    nll = [-c / n for c, n in zip(inputs[0], inputs[4])]
    expected = [w * d + 0.1 * x for w, d, x in zip(weights, reference_losses("sigmoid", *inputs), nll)]
    assert_close(out.per_pair, expected)
    out.loss.backward()
    assert policy.chosen_wpo.grad is None
    with pytest.raises(ValueError, match="chosen_wpo"):
        compute_loss(loss_config(use_weighting=True), pair_logps()[0], ref)


@pytest.mark.parametrize("kind,nll_weight", [("cpo", 0.3), ("simpo", 0.3), ("orpo", 1.0)])
def test_compute_loss_cpo_simpo_orpo_nll_terms(kind, nll_weight):
    policy, _ = pair_logps(seed=19)
    out = compute_loss(loss_config(loss_type=kind, cpo_alpha=0.3, beta=0.2), policy, None)
    inputs = lists(policy.chosen, policy.rejected, policy.chosen, policy.rejected, policy.chosen_lengths,
                   policy.rejected_lengths)
    nll = [-c / n for c, n in zip(inputs[0], inputs[4])]
    expected = [d + nll_weight * x for d, x in zip(reference_losses(kind, *inputs, beta=0.2), nll)]
    assert_close(out.per_pair, expected)
    assert_close(out.chosen_rewards, [0.2 * c for c in inputs[0]])


def test_compute_loss_reference_free_ignores_given_reference():
    policy, ref = pair_logps(seed=20)
    with_ref = compute_loss(loss_config(reference_free=True), policy, ref)
    without = compute_loss(loss_config(reference_free=True), policy, None)
    torch.testing.assert_close(with_ref.per_pair, without.per_pair)
    zeros = [0.0] * 6
    inputs = lists(policy.chosen, policy.rejected)
    assert_close(without.per_pair, reference_losses("sigmoid", *inputs, zeros, zeros, zeros, zeros))


def test_compute_loss_without_needed_reference_raises():
    policy, _ = pair_logps()
    with pytest.raises(ValueError, match="reference"):
        compute_loss(loss_config(loss_type=["sigmoid", "sft"]), policy, None)


def test_needs_reference():
    assert needs_reference(config())
    assert needs_reference(config(loss_type=["sft", "ipo"]))
    for kinds in ("simpo", "cpo", "orpo", "sft", ["sft", "simpo"]):
        assert not needs_reference(config(loss_type=kinds))
    assert not needs_reference(config(loss_type="sigmoid", reference_free=True))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides,key", [
    (dict(loss_type="sigmod"), "did you mean 'sigmoid'"),
    (dict(loss_type=["sigmoid", "apo_zeroo"]), "did you mean 'apo_zero'"),
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_weights=[float("nan")]), "loss_weights"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(label_smoothing=0.6), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(loss_type=["sigmoid", "simpo"], f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(beta=0.0), "beta"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(rpo_alpha=-1.0), "rpo_alpha"),
    (dict(cpo_alpha=float("inf")), "cpo_alpha"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(simpo_gamma=float("nan")), "simpo_gamma"),
])
def test_invalid_combinations_raise_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        validate_loss_args(config(**overrides))


def test_valid_combinations_pass():
    validate_loss_args(config())
    validate_loss_args(DPOConfig())  # all defaults
    validate_loss_args(config(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))
    validate_loss_args(config(loss_type="exo_pair", label_smoothing=1e-3, f_divergence_type="alpha_divergence"))
    validate_loss_args(config(loss_type="robust", label_smoothing=0.4, rpo_alpha=0.5, ld_alpha=0.5))


def test_loss_config_copies_every_field_from_the_dpo_config():
    args = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 2.0], beta=0.3, rpo_alpha=0.2)
    got = LossConfig.from_config(args)
    assert got.loss_types == ("sigmoid", "sft") and got.loss_weights == (0.5, 2.0)
    for name in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
                 "simpo_gamma", "cpo_alpha", "rpo_alpha", "reference_free", "use_weighting"):
        assert getattr(got, name) == getattr(args, name), name
    assert LossConfig.from_config(DPOConfig(loss_type="ipo")).loss_weights == (1.0,)
