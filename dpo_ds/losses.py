"""Preference losses as pure tensor functions.

Every function here maps per-pair sequence log-probs (shape ``[B]``, B = number
of pairs) to per-pair losses, with no trainer state and no DeepSpeed import, so
that the same code serves training, evaluation and the tests. Loss names and
formulas follow TRL 1.16's ``DPOTrainer``; ``simpo``, ``cpo``, ``orpo``,
conservative DPO and ``reference_free`` are kept from older TRL releases.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "cpo", "orpo",
)
# Losses that read only the policy's log-probs.
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo", "sft"})
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's rule: the f-DPO reparameterization leaves a beta*log Z(x) term that only cancels in the
# chosen-minus-rejected score difference, so only these losses generalize to other f-divergences.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# Losses whose formula reads `label_smoothing`; it is an error to set it for none of them.
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo"})
# Losses that divide summed log-probs by completion lengths.
LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo", "sft"})
# Losses that carry their own chosen-NLL term, added by `compute_loss`.
NLL_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo"})
# Losses that sort over the batch, so per-pair weights would be misaligned.
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})



@dataclass(frozen=True)
class LossConfig:
    """A run's loss settings, copied once from its DPOConfig by :meth:`from_config`.

    DPOConfig states every default and validates them (:func:`validate_loss_args`, from its
    ``__post_init__``); the loss functions read this object and check nothing again.
    """

    loss_types: tuple[str, ...]  # `loss_type`, normalized: one entry per loss
    loss_weights: tuple[float, ...]  # one per loss type (`loss_weights=None`: 1.0 each)
    # The rest carry their DPOConfig field's name.
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    cpo_alpha: float
    rpo_alpha: Optional[float]
    reference_free: bool
    use_weighting: bool

    @classmethod
    def from_config(cls, cfg: Any) -> LossConfig:
        """The loss settings of a DPOConfig (or of any object with its attribute names)."""
        loss_type = cfg.loss_type
        if isinstance(loss_type, str):
            loss_type = [loss_type]
        if not isinstance(loss_type, Sequence) or not loss_type or not all(isinstance(n, str) for n in loss_type):
            raise ValueError(f"loss_type must be a loss name or a non-empty list of names, got {cfg.loss_type!r}")
        weights = cfg.loss_weights
        copied = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)[2:]}
        return cls(tuple(loss_type), tuple(weights) if weights is not None else (1.0,) * len(loss_type), **copied)

    @property
    def needs_reference(self) -> bool:
        """Whether the losses read reference log-probs (False for policy-only losses or ``reference_free``)."""
        return not self.reference_free and not REFERENCE_FREE_LOSS_TYPES.issuperset(self.loss_types)


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    config: LossConfig,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> Tensor:
    r"""Per-pair preference loss, shape ``[B]``, differentiable w.r.t. the policy log-probs.

    Inputs are summed completion log-probs ``[B]``; lengths are completion token counts ``[B]``
    (clamped to >= 1); ``config`` gives the options (already validated). Notation: :math:`\rho_w = \log\pi(y_w) - \log\pi_{ref}(y_w)`, likewise
    :math:`\rho_l`; :math:`s = f'(e^\rho)` is the f-divergence score (:math:`s = \rho` for reverse KL);
    :math:`\Delta = s_w - s_l`, :math:`\sigma` the logistic function, :math:`\epsilon` = ``label_smoothing``.

    - ``sigmoid``: DPO, Rafailov et al., arXiv:2305.18290, Eq. 7: :math:`-\log\sigma(\beta\Delta)`; with
      :math:`\epsilon > 0` conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"):
      :math:`-(1-\epsilon)\log\sigma(\beta\Delta) - \epsilon\log\sigma(-\beta\Delta)`.
    - ``hinge``: SLiC-HF, Zhao et al., arXiv:2305.10425: :math:`\max(0, 1 - \beta\Delta)`.
    - ``ipo``: IPO, Azar et al., arXiv:2310.12036, Eq. 17, on per-token scores:
      :math:`(s_w/|y_w| - s_l/|y_l| - 1/(2\beta))^2`.
    - ``exo_pair``: EXO, Ji et al., arXiv:2402.00856, Eq. 16, with :math:`q = \sigma(\beta\Delta)`:
      :math:`q(\log q - \log(1-\epsilon)) + (1-q)(\log(1-q) - \log\epsilon)`.
    - ``nca_pair``: NCA, Chen et al., arXiv:2402.05369:
      :math:`-\log\sigma(\beta\rho_w) - \frac12\log\sigma(-\beta\rho_w) - \frac12\log\sigma(-\beta\rho_l)`.
    - ``robust``: rDPO, Chowdhury et al., arXiv:2403.00409, Eq. 8:
      :math:`[-(1-\epsilon)\log\sigma(\beta\Delta) + \epsilon\log\sigma(-\beta\Delta)] / (1 - 2\epsilon)`.
    - ``bco_pair``: BCO, Jung et al., arXiv:2404.04656, with the reward shift :math:`\delta` = 0 of
      TRL 1.16 (the paper's :math:`\delta` is a running mean of the rewards):
      :math:`-\log\sigma(\beta\rho_w) - \log\sigma(-\beta\rho_l)`.
    - ``sppo_hard``: SPPO, Wu et al., arXiv:2405.00675, Eq. 4.7 with hard win probabilities:
      :math:`(\rho_w - \frac{1}{2\beta})^2 + (\rho_l + \frac{1}{2\beta})^2`.
    - ``aot`` / ``aot_unpaired``: AOT, Melnyk et al., arXiv:2406.05882: the smoothed logistic loss on
      sorted policy-minus-reference log-ratio margins (``aot``) or on sorted :math:`\rho_w` minus sorted
      :math:`\rho_l` (``aot_unpaired``); the output order is the sorted order, not the pair order.
    - ``apo_zero`` / ``apo_down``: APO, D'Oosterlinck et al., arXiv:2408.06266, Eqs. 7 and 8:
      :math:`1 - \sigma(\beta\rho_w) + \sigma(\beta\rho_l)` and
      :math:`\sigma(\beta\rho_w) + 1 - \sigma(\beta(\rho_w - \rho_l))`.
    - ``discopop``: DiscoPOP, Chris Lu et al., arXiv:2406.08414, Eq. 5, :math:`z = \beta\Delta`,
      :math:`m = \sigma(z/\tau)`: :math:`-(1-m)\log\sigma(z) + m e^{-z}`.
    - ``sft``: the mean negative log-likelihood over all chosen tokens of the batch, repeated per pair.
    - ``sigmoid_norm``: DPO on per-token scores: :math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`.
    - ``simpo``: SimPO, Meng et al., arXiv:2405.14734, Eq. 6, smoothed like cDPO (its ``cpo_alpha`` NLL term,
      as in TRL's CPO trainer, is added by :func:`compute_loss`; ``cpo_alpha=0`` is the paper's SimPO):
      :math:`-\log\sigma(\beta(\log\pi(y_w)/|y_w| - \log\pi(y_l)/|y_l|) - \gamma)`.
    - ``cpo``: CPO, Xu et al., arXiv:2401.08417, Eq. 3 (its NLL term is added by :func:`compute_loss`):
      :math:`-\log\sigma(\beta(\log\pi(y_w) - \log\pi(y_l)))`.
    - ``orpo``: ORPO, Hong et al., arXiv:2403.07691, Eqs. 4-7, with ``beta`` as :math:`\lambda` and
      length-normalized log-probs :math:`\bar p` (its NLL term is added by :func:`compute_loss`):
      :math:`-\lambda\log\sigma(\log\frac{\bar p_w}{1-\bar p_w} - \log\frac{\bar p_l}{1-\bar p_l})`.

    f-divergence scores (f-DPO, Wang et al., arXiv:2309.16240), :math:`u = e^\rho`: ``reverse_kl``
    :math:`\log u`; ``forward_kl`` :math:`1 - 1/u`; ``js_divergence`` :math:`\log(2u/(1+u))`;
    ``alpha_divergence`` :math:`(u^{\alpha-1} - 1)/(\alpha-1)` with :math:`\alpha` =
    ``f_alpha_divergence_coef`` (its exponent is clamped like TRL's, to stay finite).

    ``reference_free=True`` treats the reference log-probs as 0 for every reference-based loss.
    """
    beta, label_smoothing, discopop_tau = config.beta, config.label_smoothing, config.discopop_tau
    _check_pair_tensor("policy_chosen_logps", policy_chosen_logps, policy_chosen_logps)
    _check_pair_tensor("policy_rejected_logps", policy_rejected_logps, policy_chosen_logps)
    if loss_type in LENGTH_LOSS_TYPES:
        if chosen_lengths is None or (rejected_lengths is None and loss_type != "sft"):
            raise ValueError(
                f"loss_type={loss_type!r} divides by completion lengths: pass chosen_lengths and rejected_lengths"
            )
        _check_pair_tensor("chosen_lengths", chosen_lengths, policy_chosen_logps)
        if loss_type != "sft":
            _check_pair_tensor("rejected_lengths", rejected_lengths, policy_chosen_logps)

    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        return _policy_only_loss(
            loss_type, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
            beta=beta, label_smoothing=label_smoothing, simpo_gamma=config.simpo_gamma,
        )

    if config.reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            f"loss_type={loss_type!r} needs reference log-probs: ref_chosen_logps and ref_rejected_logps are "
            "required (or set reference_free=True to treat them as 0)"
        )
    _check_pair_tensor("ref_chosen_logps", ref_chosen_logps, policy_chosen_logps)
    _check_pair_tensor("ref_rejected_logps", ref_rejected_logps, policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_score(chosen_logratios, config.f_divergence_type, config.f_alpha_divergence_coef)
    rejected_scores = f_divergence_score(rejected_logratios, config.f_divergence_type, config.f_alpha_divergence_coef)
    z = beta * (chosen_scores - rejected_scores)

    if loss_type == "sigmoid":
        return smoothed_logistic_loss(z, label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        delta = chosen_scores / _clamped(chosen_lengths, z) - rejected_scores / _clamped(rejected_lengths, z)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        delta = chosen_scores / _clamped(chosen_lengths, z) - rejected_scores / _clamped(rejected_lengths, z)
        return -F.logsigmoid(beta * delta)
    if loss_type == "exo_pair":
        eps = label_smoothing
        # KL(q || p) over {chosen wins, rejected wins}, q = (sigmoid(z), sigmoid(-z)), p = (1 - eps, eps)
        kl_win = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
        return kl_win + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen_rewards) - 0.5 * (F.logsigmoid(-chosen_rewards) + F.logsigmoid(-rejected_rewards))
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy_margins = torch.sort(policy_chosen_logps - policy_rejected_logps).values
        ref_margins = torch.sort(ref_chosen_logps - ref_rejected_logps).values
        return smoothed_logistic_loss(beta * (policy_margins - ref_margins), label_smoothing)
    if loss_type == "aot_unpaired":
        delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
        return smoothed_logistic_loss(beta * delta, label_smoothing)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        margin = beta * (chosen_logratios - rejected_logratios)
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(margin)
    if loss_type == "discopop":
        # m * exp(-z) is computed as exp(log m - z): it tends to 0 where exp(-z) alone overflows.
        return -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    raise ValueError(f"loss_type: unknown loss type {loss_type!r}; valid: {list(LOSS_TYPES)}")


def _policy_only_loss(
    loss_type: str,
    chosen: Tensor,
    rejected: Tensor,
    chosen_lengths: Optional[Tensor],
    rejected_lengths: Optional[Tensor],
    *,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
) -> Tensor:
    """The losses of REFERENCE_FREE_LOSS_TYPES (formulas in :func:`preference_loss`)."""
    if loss_type == "sft":
        return (-chosen.sum() / chosen_lengths.sum().to(chosen.dtype).clamp(min=1)).expand_as(chosen)
    if loss_type == "cpo":
        return smoothed_logistic_loss(beta * (chosen - rejected), label_smoothing)
    chosen_mean = chosen / _clamped(chosen_lengths, chosen)
    rejected_mean = rejected / _clamped(rejected_lengths, chosen)
    if loss_type == "simpo":
        return smoothed_logistic_loss(beta * (chosen_mean - rejected_mean) - simpo_gamma, label_smoothing)
    # orpo, computed in at least float32 as TRL does. A mean log-prob of exactly 0 (probability 1)
    # has infinite odds, so it is capped just below 0.
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    cap = -torch.finfo(dtype).eps
    chosen_mean = chosen_mean.to(dtype).clamp(max=cap)
    rejected_mean = rejected_mean.to(dtype).clamp(max=cap)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return (-beta * F.logsigmoid(log_odds)).to(chosen.dtype)


def smoothed_logistic_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``: the logistic loss with label noise eps (cDPO)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (Maechler 2012: branch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def f_divergence_score(logratio: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """The f-DPO score ``f'(u)`` at ``u = exp(logratio)`` (arXiv:2309.16240), TRL 1.16's choice of f."""
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
            return logratio
        # exp() is taken in at least float32, clamped so that the result stays representable.
        dtype = torch.promote_types(logratio.dtype, torch.float32)
        clamp_max = 11.0 if logratio.dtype == torch.float16 else 80.0
        t = ((alpha - 1.0) * logratio).to(dtype).clamp(max=clamp_max)
        return (torch.expm1(t) / (alpha - 1.0)).to(logratio.dtype)
    raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")


def preference_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    *,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Implicit DPO rewards ``beta * (log pi - log pi_ref)`` per pair, detached; a missing reference counts as 0."""
    with torch.no_grad():
        chosen = policy_chosen_logps if ref_chosen_logps is None else policy_chosen_logps - ref_chosen_logps
        rejected = policy_rejected_logps if ref_rejected_logps is None else policy_rejected_logps - ref_rejected_logps
        return (beta * chosen).detach(), (beta * rejected).detach()


@dataclass
class PairLogps:
    """Per-pair sequence log-probs of one model; every field is ``[B]``."""

    chosen: Tensor  # summed completion-token log-probs (LD-DPO weighting already applied upstream)
    rejected: Tensor
    chosen_lengths: Tensor  # completion token counts (float or long)
    rejected_lengths: Tensor
    chosen_wpo: Optional[Tensor] = None  # mean over completion tokens of (logp - log sum_v p_v^2), for WPO
    rejected_wpo: Optional[Tensor] = None


@dataclass
class LossOutput:
    """What the trainer backpropagates (``loss``) and logs."""

    loss: Tensor  # scalar: mean over pairs of `per_pair`
    per_pair: Tensor  # [B]
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached


def compute_loss(config: LossConfig, policy: PairLogps, reference: Optional[PairLogps]) -> LossOutput:
    """Combined per-pair loss of a run's :class:`LossConfig`.

    ``per_pair = sum_k w_k * (wpo * loss_k + c_k * nll) + rpo_alpha * nll`` where ``w_k`` are
    ``loss_weights`` (several loss types = MPO, arXiv:2411.10442), ``nll = -chosen / chosen_lengths``
    (RPO, Pang et al., arXiv:2404.19733), ``c_k`` is ``cpo_alpha`` for simpo and cpo (as TRL's CPO trainer
    adds it to both), 1 for orpo and 0 otherwise, and ``wpo = exp(chosen_wpo + rejected_wpo)``, detached,
    when ``use_weighting`` (WPO, Zhou et al., arXiv:2406.11827, Eq. 2; unclamped, as in TRL 1.16), else 1.
    """
    if reference is None and config.needs_reference:
        raise ValueError(f"loss_type={list(config.loss_types)} needs reference log-probs, but reference is None")
    ref = None if config.reference_free else reference

    weights = 1.0
    if config.use_weighting:
        if policy.chosen_wpo is None or policy.rejected_wpo is None:
            raise ValueError("use_weighting=True needs PairLogps.chosen_wpo and PairLogps.rejected_wpo")
        weights = torch.exp(policy.chosen_wpo + policy.rejected_wpo).detach()
    nll = -policy.chosen / _clamped(policy.chosen_lengths, policy.chosen)

    nll_weights = {"simpo": config.cpo_alpha, "cpo": config.cpo_alpha, "orpo": 1.0}
    per_pair = torch.zeros_like(policy.chosen)
    for loss_type, loss_weight in zip(config.loss_types, config.loss_weights):
        term = weights * preference_loss(
            loss_type, policy.chosen, policy.rejected,
            None if ref is None else ref.chosen, None if ref is None else ref.rejected, config,
            chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
        )
        if loss_type in NLL_LOSS_TYPES:
            term = term + nll_weights[loss_type] * nll
        per_pair = per_pair + loss_weight * term
    if config.rpo_alpha is not None:
        per_pair = per_pair + config.rpo_alpha * nll

    chosen_rewards, rejected_rewards = preference_rewards(
        policy.chosen, policy.rejected, None if ref is None else ref.chosen, None if ref is None else ref.rejected,
        beta=config.beta,
    )
    return LossOutput(per_pair.mean(), per_pair, chosen_rewards, rejected_rewards)


def needs_reference(args: Any) -> bool:
    """Whether a DPOConfig's losses need reference log-probs (see :attr:`LossConfig.needs_reference`)."""
    return LossConfig.from_config(args).needs_reference


def check_loss_options(loss_type: str, config: LossConfig) -> None:
    """Raise ``ValueError`` naming the key when one loss type's options make its formula invalid."""
    beta, label_smoothing, f_divergence_type = config.beta, config.label_smoothing, config.f_divergence_type
    if loss_type not in LOSS_TYPES:
        close = difflib.get_close_matches(str(loss_type), LOSS_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"loss_type: unknown loss type {loss_type!r}{hint} Valid: {list(LOSS_TYPES)}")
    if not _finite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not _finite(label_smoothing) or not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")
    if loss_type == "robust" and label_smoothing == 0.5:
        raise ValueError("label_smoothing must be < 0.5 for loss_type='robust' (it divides by 1 - 2*label_smoothing)")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError(
            "label_smoothing must be > 0 for loss_type='exo_pair': it is EXO's epsilon (the paper recommends 1e-3)"
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, not {loss_type!r}; use f_divergence_type='reverse_kl'"
        )
    if loss_type == "discopop" and (not _finite(config.discopop_tau) or config.discopop_tau <= 0):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {config.discopop_tau!r}")


def validate_loss_args(args: Any) -> None:
    """Raise ``ValueError`` naming the config key for any invalid combination of a DPOConfig's loss settings.

    The only check: ``DPOConfig.__post_init__`` calls it before anything loads.
    """
    config = LossConfig.from_config(args)
    loss_types = list(config.loss_types)
    for loss_type in loss_types:
        check_loss_options(loss_type, config)
    loss_weights = args.loss_weights
    if loss_weights is not None:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights must be a list with one weight per loss_type ({len(loss_types)} for {loss_types}), "
                f"got {loss_weights!r}"
            )
        if not all(_finite(w) for w in loss_weights):
            raise ValueError(f"loss_weights must be finite numbers, got {loss_weights!r}")
    if config.label_smoothing > 0 and not LABEL_SMOOTHING_LOSS_TYPES.intersection(loss_types):
        raise ValueError(
            f"label_smoothing > 0 has no effect on loss_type={loss_types}; it is read by "
            f"{sorted(LABEL_SMOOTHING_LOSS_TYPES)}"
        )
    if config.use_weighting and SORTING_LOSS_TYPES.intersection(loss_types):
        raise ValueError(
            "use_weighting=True (WPO) is not supported with loss_type 'aot' or 'aot_unpaired': they sort the "
            "batch, which would misalign the per-pair weights"
        )
    for key in ("f_alpha_divergence_coef", "simpo_gamma"):
        if not _finite(getattr(config, key)):
            raise ValueError(f"{key} must be a finite number, got {getattr(config, key)!r}")
    for key in ("rpo_alpha", "cpo_alpha"):
        value = getattr(config, key)
        if value is not None and (not _finite(value) or value < 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    ld_alpha = args.ld_alpha
    if ld_alpha is not None and (not _finite(ld_alpha) or not 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must lie in [0, 1] (or be None), got {ld_alpha!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clamped(lengths: Tensor, like: Tensor) -> Tensor:
    """Lengths as ``like``'s dtype, at least 1, so that empty completions divide by 1, not 0."""
    return lengths.to(like.dtype).clamp(min=1)


def _check_pair_tensor(name: str, value: Any, like: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(value).__name__}")
    if value.dim() != 1 or value.shape != like.shape:
        raise ValueError(f"{name} must have shape {list(like.shape)} (one value per pair), got {list(value.shape)}")
