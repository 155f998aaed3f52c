"""Training metrics: weighted means reduced across ranks, and the sinks that record them.

A metric is a ratio of sums (numerator over pairs or tokens, divided by their count), reduced
across ranks before dividing, so that a rank with more tokens weighs more, as the definition says,
rather than averaging per-rank means. Names follow TRL's ``DPOTrainer`` so dashboards carry over.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .losses import LossOutput, PairLogps

logger = logging.getLogger(__name__)

# The names the trainer logs at every logging step (eval logs the pair and token metrics with "eval_").
LOGGED_METRICS = (
    "global_step", "epoch", "num_tokens", "loss", "entropy", "mean_token_accuracy", "learning_rate", "grad_norm",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    "logits/chosen", "logits/rejected", "tokens_per_second", "tokens_per_second_per_device", "samples_per_second",
    "step_time",
)
# Also logged: "mfu" where the peak rate is known (see Throughput), "max_memory_allocated" on accelerators.
REPORT_TO_CHOICES = ("tensorboard", "wandb", "trackio")

Scalar = Union[float, int, Tensor]


class MeanAccumulator:
    """Sums of numerators and denominators per metric name, over micro-batches and ranks.

    Values may stay tensors on the accelerator (no host sync per micro-batch); they are kept in float64
    so that large token counts stay exact. Every rank must add the same set of names before
    :meth:`reduce` (add ``(name, 0, 0)`` where a rank has nothing), or the collective hangs; the order
    does not matter, names are sorted before the reduction.
    """

    def __init__(self) -> None:
        self._totals: dict[str, Scalar] = {}
        self._counts: dict[str, Scalar] = {}

    def add(self, name: str, total: Scalar, count: Scalar) -> None:
        """Add ``total`` (sum of the values) and ``count`` (how many values: pairs or tokens) to ``name``."""
        self._totals[name] = self._totals.get(name, 0.0) + _scalar(name, "total", total)
        self._counts[name] = self._counts.get(name, 0.0) + _scalar(name, "count", count)

    def reduce(self, group: Optional[Any] = None) -> dict[str, float]:
        """Global ``total / count`` per name (0.0 where the count is 0, as TRL logs).

        One all-reduce (SUM) of a flat float64 tensor of every total and count when
        ``torch.distributed`` is initialized; local values otherwise. An accumulator with no
        names returns ``{}`` without communicating.
        """
        names = sorted(self._totals)
        if not names:
            return {}
        values = [self._totals[n] for n in names] + [self._counts[n] for n in names]
        device = _reduce_device(group, values)
        flat = torch.stack([torch.as_tensor(v).to(device=device, dtype=torch.float64) for v in values])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        sums = flat.tolist()
        return {n: (t / c if c else 0.0) for n, t, c in zip(names, sums[: len(names)], sums[len(names):])}


def pair_metrics(
    acc: MeanAccumulator, out: LossOutput, policy: PairLogps, prefix: str = "", weights: Optional[Tensor] = None
) -> None:
    """Add the pair-weighted metrics of one micro-batch: ``loss``, ``rewards/*``, ``logps/*``.

    ``weights [B]`` (default all 1) lets a batch carry filler pairs that must not count (weight 0),
    e.g. the padding that keeps every rank's eval batch count equal.
    """
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    w = torch.ones_like(chosen) if weights is None else weights.to(chosen.device, chosen.dtype)
    pairs = w.sum()
    acc.add(prefix + "loss", (out.per_pair.detach() * w).sum(), pairs)
    acc.add(prefix + "rewards/chosen", (chosen * w).sum(), pairs)
    acc.add(prefix + "rewards/rejected", (rejected * w).sum(), pairs)
    acc.add(prefix + "rewards/accuracies", ((chosen > rejected) * w).sum(), pairs)
    acc.add(prefix + "rewards/margins", ((chosen - rejected) * w).sum(), pairs)
    acc.add(prefix + "logps/chosen", (policy.chosen.detach() * w).sum(), pairs)
    acc.add(prefix + "logps/rejected", (policy.rejected.detach() * w).sum(), pairs)


def token_metrics(
    acc: MeanAccumulator,
    *,
    entropy_sum: Scalar,
    entropy_count: Scalar,
    top1_sum: Scalar,
    top1_count: Scalar,
    chosen_logit_sum: Scalar,
    chosen_count: Scalar,
    rejected_logit_sum: Scalar,
    rejected_count: Scalar,
    prefix: str = "",
) -> None:
    """Add the token-weighted metrics of one micro-batch.

    ``entropy``: over chosen and rejected completion tokens; ``mean_token_accuracy``: share of chosen
    completion tokens whose label is the top-1 prediction; ``logits/chosen|rejected``: mean over
    completion tokens of the vocabulary-mean logit.
    """
    acc.add(prefix + "entropy", entropy_sum, entropy_count)
    acc.add(prefix + "mean_token_accuracy", top1_sum, top1_count)
    acc.add(prefix + "logits/chosen", chosen_logit_sum, chosen_count)
    acc.add(prefix + "logits/rejected", rejected_logit_sum, rejected_count)


# Peak dense bf16 tensor TFLOP/s from the vendors' datasheets (without sparsity), matched in this order
# against the device name (case-insensitive): the PCIe/NVL parts before the SXM name they contain.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200 NVL", 835.0), ("H200", 989.4),  # the H200 NVL is the PCIe card
    ("A100", 312.0),  # SXM and PCIe alike
    ("L40S", 362.05),
    ("A10G", 125.0),  # NVIDIA's A10 datasheet: AWS publishes no figure of its own for the A10G
    ("RTX 4090", 165.2),  # with FP32 accumulation, as training uses
    ("MI300X", 1307.4),
)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The datasheet peak of the card named `device_name` (as `torch.cuda.get_device_name` gives it), or None."""
    name = device_name.lower()
    return next((peak for card, peak in PEAK_BF16_TFLOPS if card.lower() in name), None)


class Throughput:
    """`tokens_per_second_per_device` and `mfu` (model FLOPs utilization) of a logging window.

    The model FLOPs of a token in a sequence of length s are affine in s (`models.model_flops_per_token`:
    matmuls plus attention over the sequence), so a window's FLOPs follow from two sums over its real
    (non-padding) sequences: their tokens and their squared lengths. MFU divides them by the peak rate of
    all devices: `peak_tflops` when given, else the datasheet figure of a known GPU; without either
    (a CPU, an unknown card) there is no `mfu`.
    """

    def __init__(self, policy: Any, reference: Any = None, recompute: bool = False,
                 device: Union[str, torch.device] = "cpu", peak_tflops: Optional[float] = None) -> None:
        from .models import model_flops_per_token

        self.per_token = model_flops_per_token(policy, 0, reference=reference, recompute=recompute)
        self.per_token_and_length = model_flops_per_token(policy, 1, reference=reference,
                                                          recompute=recompute) - self.per_token
        device = torch.device(device)
        if peak_tflops is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak_tflops = peak_bf16_tflops(name)
            if peak_tflops is None:
                logger.warning("no peak bf16 TFLOP/s known for %r: mfu is not logged; set peak_tflops", name)
        self.peak_tflops = peak_tflops

    def metrics(self, tokens: float, squared_lengths: float, seconds: float, world_size: int) -> dict[str, float]:
        """Figures for a window of `tokens` real tokens in sequences whose squared lengths sum to
        `squared_lengths`, processed by `world_size` devices in `seconds`."""
        device_seconds = max(seconds, 1e-9) * world_size
        out = {"tokens_per_second_per_device": tokens / device_seconds}
        if self.peak_tflops is not None:
            flops = self.per_token * tokens + self.per_token_and_length * squared_lengths
            out["mfu"] = flops / device_seconds / (self.peak_tflops * 1e12)
        return out


class MetricsSink:
    """Writes each logging step to ``output_dir/metrics.jsonl`` (always) and the requested trackers.

    ``report_to`` takes TRL's values: a list of ``tensorboard``, ``wandb`` (honours ``WANDB_MODE=offline``,
    project from ``WANDB_PROJECT``), ``trackio`` (project from ``TRACKIO_PROJECT``), or ``"all"``
    (those installed) / ``"none"``. A requested tracker that is not installed gets one warning and is
    skipped. Create it on rank 0 only. JSON has no NaN or infinity: non-finite values are written as null.
    """

    def __init__(
        self,
        output_dir: Union[str, os.PathLike],
        report_to: Union[str, list[str], None],
        run_name: Optional[str] = None,
        config: Optional[dict] = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or f"{time.strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}"
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._trackers: list[Any] = []
        requested, explicit = _parse_report_to(report_to)
        for name in requested:
            try:
                self._trackers.append(_TRACKERS[name](self.output_dir, self.run_name, config or {}))
            except ImportError as err:
                if explicit:
                    logger.warning("report_to includes %r, but it cannot be imported (%s): skipped", name, err)

    @property
    def trackers(self) -> list[str]:
        """Names of the trackers actually in use (besides the JSONL file)."""
        return [t.name for t in self._trackers]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one logging step."""
        values = {k: _plain(v) for k, v in metrics.items()}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **record}, allow_nan=False) + "\n")
        self._jsonl.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.log(numbers, int(step))

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: Path, run_name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is missing

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name))
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, output_dir: Path, run_name: str, config: dict) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dpo_ds"), name=run_name, config=config, dir=str(output_dir)
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    name = "trackio"

    def __init__(self, output_dir: Path, run_name: str, config: dict) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dpo_ds"), name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


def _parse_report_to(report_to: Union[str, list[str], None]) -> tuple[list[str], bool]:
    """(tracker names, whether they were named explicitly) from TRL-style ``report_to``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names in (["none"], []):
        return [], True
    if names == ["all"]:
        return list(REPORT_TO_CHOICES), False
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(
            f"report_to: unsupported {unknown}; choose from {list(REPORT_TO_CHOICES)}, 'all' or 'none' "
            "(metrics.jsonl is always written)"
        )
    return list(dict.fromkeys(names)), True


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers; anything else unchanged."""
    return value.item() if callable(getattr(value, "item", None)) else value


def _scalar(name: str, what: str, value: Scalar) -> Scalar:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r}: {what} must be a scalar, got a tensor of shape {list(value.shape)}")
        return value.detach().reshape(()).to(torch.float64)
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r}: {what} must be a number or a scalar tensor, got {type(value).__name__}")
    return float(value)


def _reduce_device(group: Optional[Any], values: list[Scalar]) -> torch.device:
    """NCCL reduces CUDA tensors only; otherwise reduce where the values already are (CPU by default)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
