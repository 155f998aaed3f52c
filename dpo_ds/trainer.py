"""DPOTrainer: the training loop around the DeepSpeed engines.

One optimizer step = `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` pairs per rank. Each micro-batch is one
`[2B, T]` forward of the policy (chosen rows, then rejected rows) and, unless
the loss is reference-free, one no-grad forward of the reference engine.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, Subset

from . import checkpoint, hub, preemption, vision
from .collate import PreferenceCollator
from .config import DPOConfig
from .data import DataError, load_preference_data, prepare_dataset
from .ds_config import load_deepspeed_config, reference_deepspeed_config
from .distributed import on_cpu, rank as _rank, world_size as _world
from .engines import (METRIC_SCHEDULERS, Engines, build_policy_engine, export_peft, hf_deepspeed_config,
                      metric_scheduler, router_aux_loss_coef)
from .losses import LossConfig, compute_loss
from .metrics import MeanAccumulator, MetricsSink, Throughput, pair_metrics, token_metrics
from .models import (adapter_base_path, disable_dropout, is_peft_model, load_model, load_policy_model, load_tokenizer,
                     reference_args, resolve_model_path)
from .packing import inputs_for
from .reference import build_reference, label_mask, load_reference_engine, online_reference, pair_logps, precomputed
from .trl_fields import no_effect_note

logger = logging.getLogger(__name__)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _grad_norm(engine) -> float:
    """L2 norm of the full gradients; DeepSpeed records none for a ZeRO-0 fp32 engine."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads \
        else 0.0


def _best_metric(args: DPOConfig) -> tuple[Optional[str], bool]:
    """transformers' defaults: the eval metric that ranks checkpoints (`eval_loss` when `load_best_model_at_end`
    or `save_strategy: best` name none; None = no ranking) and whether larger is better (not for a *loss)."""
    metric = args.metric_for_best_model or ("loss" if args.load_best_model_at_end or args.save_strategy == "best"
                                            or args.lr_scheduler_type in METRIC_SCHEDULERS else None)
    if metric is None:
        return None, False
    greater = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
    return (metric if metric.startswith("eval_") else f"eval_{metric}"), greater


def _check_strategies(args: DPOConfig) -> None:
    """transformers' checks of how evaluation, saving and the best model fit together, before anything loads."""
    needs_eval = args.load_best_model_at_end or args.save_strategy == "best" \
        or args.lr_scheduler_type in METRIC_SCHEDULERS
    if needs_eval and args.eval_strategy == "no":
        raise ValueError("load_best_model_at_end, save_strategy=best and lr_scheduler_type=reduce_lr_on_plateau/greedy "
                         "need evaluations: set eval_strategy to steps or epoch")
    if args.load_best_model_at_end and args.save_strategy != "best":
        if args.save_strategy != args.eval_strategy:
            raise ValueError(f"load_best_model_at_end needs save_strategy == eval_strategy (got save_strategy="
                             f"{args.save_strategy!r}, eval_strategy={args.eval_strategy!r})")
        if args.save_strategy == "steps" and (not args.save_steps or args.save_steps % args.eval_steps):
            raise ValueError(f"load_best_model_at_end needs save_steps ({args.save_steps}) to be a multiple of "
                             f"eval_steps ({args.eval_steps})")
    if args.load_best_model_at_end and args.save_only_model:
        raise ValueError("save_only_model cannot be combined with load_best_model_at_end under DeepSpeed "
                         "(as in transformers): the best model is restored from the DeepSpeed state")


def _set_tf32(tf32: Optional[bool]) -> None:
    """transformers' `tf32`: TF32 matmuls and convolutions on or off (None leaves torch's setting)."""
    if tf32 is None:
        return
    if tf32 and not torch.cuda.is_available():
        raise ValueError("tf32=True needs a CUDA GPU (Ampere or newer); set tf32 to false or leave it unset")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
class Diverged(RuntimeError):
    """A non-finite loss or gradient norm that the run must not train past (raised on every rank)."""


class NonFiniteGuard:
    """The divergence guard: one all-reduce per optimizer step gives every rank the same decision.

    A non-finite micro-batch loss is turned into NaN gradients (the loss times NaN), so DeepSpeed's
    optimizers, which skip an update whose gradient norm is not finite, discard it on every rank; the
    stage-0 fp32 engine runs a plain torch optimizer, whose update the guard discards itself.
    """

    def __init__(self, args: DPOConfig, engine):
        self.args, self.engine = args, engine
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=engine.device)
        self.in_a_row, self.discarded = 0, False
        if hasattr(engine.optimizer, "check_grad_overflow"):
            # ZeRO-1/2 in bf16 checks the norm only with this set; a NaN update must never be applied.
            engine.optimizer.check_grad_overflow = True

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: itself when finite, else one whose gradients are NaN (no host sync)."""
        finite = torch.isfinite(loss.detach())
        self.bad_loss |= ~finite
        return loss * torch.where(finite, 1.0, float("nan"))

    def before_step(self, grad_norm: Optional[float]) -> Optional[str]:
        """Collective, at the boundary: what is non-finite and on which rank ("loss on rank 1"), or None.

        `grad_norm` is the full norm a stage-0 engine computed before its step (None under ZeRO, whose
        optimizer checks its own)."""
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
        flags = torch.stack([self.bad_loss, torch.tensor(bad_grad, device=self.bad_loss.device)]).float()
        flags *= _rank() + 1
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.bad_loss.zero_()
        loss_rank, grad_rank = (int(v) - 1 for v in flags.tolist())
        if loss_rank >= 0:
            return f"loss on rank {loss_rank}"
        if grad_rank >= 0:
            return f"gradient norm on rank {grad_rank}"
        return None

    def discard(self) -> None:
        """Make the coming `engine.step()` leave a plain torch optimizer untouched: its step is a no-op
        (zeroed gradients keep DeepSpeed's clipping quiet), and the engine counts the step skipped and leaves
        the scheduler alone (DeepSpeed's own overflow path). `after_step` restores the optimizer."""
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        optimizer = self.engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # shadows the method for this one step
        optimizer.overflow = True
        self.discarded = True

    def after_step(self, step: int, what: Optional[str], output_dir: str) -> bool:
        """Whether the step counts as progress (a skipped one does not); raises Diverged to stop the run.

        `what` is `before_step`'s finding; an update DeepSpeed skipped by itself is an fp16 overflow, or
        under ZeRO a non-finite gradient norm."""
        engine = self.engine
        if self.discarded:
            del engine.optimizer.overflow, engine.optimizer.step
            self.discarded = False
        if engine.was_step_applied() and what is None:
            self.in_a_row = 0
            return True
        if what is not None:
            what = f"non-finite {what}"
        elif engine.fp16_enabled():
            what = "fp16 gradient overflow"
        else:
            what = "non-finite gradient norm (the norm over all ranks)"
        if self.args.on_nonfinite == "stop" and not what.startswith("fp16"):
            raise Diverged(f"{what} at step {step}: stopped, nothing new saved; {checkpoint.last_complete(output_dir)}")
        self.in_a_row += 1
        if self.in_a_row >= self.args.max_skipped_steps:
            raise Diverged(f"{self.in_a_row} steps in a row skipped (max_skipped_steps="
                           f"{self.args.max_skipped_steps}), the last for a {what} at step {step}: stopped, "
                           f"nothing new saved; {checkpoint.last_complete(output_dir)}")
        if _rank() == 0:
            logger.warning("step %d skipped (%d in a row): %s", step, self.in_a_row, what)
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool, drop_last: bool, start: int = 0) -> list[int]:
    """This rank's row indices for one epoch; every rank gets the same count.

    Rows are shuffled with (seed, epoch) and dealt round-robin, like
    `DistributedSampler`. Without drop_last the tail is padded with -1: such
    slots are run (every rank must take part in each ZeRO-3 forward) but
    weigh nothing in the metrics. `start` skips the first rows of the shuffled
    order: the samples already consumed, at any world size, so that a run
    resumed on another number of ranks continues with the same rows.
    """
    order = list(range(num_rows))
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_rows, generator=g).tolist()
    order = order[start:]
    num_rows = len(order)
    world, rank = _world(), _rank()
    if drop_last:
        order = order[: num_rows - num_rows % world]
    else:
        order += [-1] * (-num_rows % world)
    return order[rank::world]


def rest_of_epoch(order: list[int], epoch_pairs: int, done: int, batch_size: int) -> list[int]:
    """This rank's rows for the micro-batches left in the epoch.

    `epoch_pairs` pairs (over all ranks) make the epoch's whole optimizer steps, of which `done` are
    consumed; `order` (this rank's rows from `done` on) is cut to the micro-batches, of `batch_size` rows
    per rank, that still fit, so every rank stops after the same micro-batch and the rows of a partial
    last step are left out.
    """
    per_micro = batch_size * _world()
    return order[: max(0, epoch_pairs - done) // per_micro * batch_size]


class DPOTrainer:
    """TRL-style entry point: `DPOTrainer(model, args=DPOConfig(...), train_dataset=ds).train()`.

    `model` is a hub id / local path / "builtin", or a PreTrainedModel.
    `train_dataset`/`eval_dataset` are raw preference datasets (any format
    `dpo_ds.data` accepts); when None they come from `args.dataset_name`.
    """

    def __init__(self, model=None, ref_model=None, args: Optional[DPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None):
        self._set_up(args or DPOConfig(), model, train_dataset, eval_dataset, processing_class, peft_config)
        a = self.args
        ds_config = self._deepspeed_config()
        # Kept alive while the policy loads and its engine is built: transformers holds it by a weak reference.
        policy_zero_settings = hf_deepspeed_config(ds_config)
        policy_model = self._load(self._model_source)
        self.model = policy_model
        self.loss_config = LossConfig.from_config(a)
        self.aux_loss_coef = router_aux_loss_coef(a, policy_model)
        policy = build_policy_engine(policy_model, a, ds_config, self.total_steps, self.warmup_steps)

        ref_source = ref_model if ref_model is not None else (
            resolve_model_path(a.ref_model_name_or_path) if a.ref_model_name_or_path else self._model_source)
        ref_ds = reference_deepspeed_config(a, ds_config, on_cpu=on_cpu())
        self.reference, reference_engine = build_reference(
            a, policy, lambda: self._load(ref_source, fresh=True), ref_ds,
            separate_model=ref_model is not None or bool(a.ref_model_name_or_path),
            **self._reference_data(policy.device))
        # A reference model loads under its own ZeRO settings, which replace the policy's in transformers:
        # the policy's become transformers' again, kept alive by Engines for the whole run.
        del policy_zero_settings
        self.engines = Engines(policy, reference_engine, ds_config, ref_ds if reference_engine is not None else None,
                               hf_deepspeed_config(ds_config))
        self.metric_scheduler = metric_scheduler(policy, a, ds_config)

        # [tokens, pairs, squared sequence lengths] processed by this rank since the last log (padding excluded).
        self.window = torch.zeros(3, dtype=torch.float64)
        # Only an online reference (it holds a module) runs a forward per batch.
        ref_module = getattr(self.reference, "module", None)
        self.throughput = Throughput(self.model, getattr(ref_module, "model", None), a.gradient_checkpointing,
                                     policy.device, a.peak_tflops)
        # samples_in_epoch counts pairs over all ranks: it stays right when the world size changes.
        self.resumed_from: Optional[Path] = None  # rotation keeps it
        self.state = {"global_step": 0, "epoch": 0, "samples_in_epoch": 0, "num_tokens": 0, "skipped": 0,
                      "best_metric": None, "best_model_checkpoint": None}
        self._last_eval: dict = {}
        self._best_metric_name, self._greater_is_better = _best_metric(a)
        self.sink = MetricsSink(a.output_dir, a.report_to, run_name=a.run_name, config=a.to_dict()) \
            if _rank() == 0 else None

    @classmethod
    def precompute_reference(cls, args: DPOConfig) -> dict[str, Path]:
        """`dpo-ds precompute-ref`: this run's reference pass on its own; returns each split's cache directory.

        The run's own set-up (data, tokenizer, DeepSpeed config, model loading), without the policy engine:
        the reference (the model, or the LoRA policy with its adapters disabled) runs in a ZeRO inference
        engine from `ref_zero_stage`/`ref_offload`, and the cache lands where training looks for it.
        Collective: run it under the same launcher as training.
        """
        trainer = cls.__new__(cls)  # set up, but no engines
        trainer._set_up(args, None, None, None, None, None)
        separate = bool(args.ref_model_name_or_path)
        source = resolve_model_path(args.ref_model_name_or_path) if separate else trainer._model_source
        ref_ds = reference_deepspeed_config(args, trainer._deepspeed_config(), on_cpu=on_cpu())
        engine = load_reference_engine(lambda: trainer._load(source, fresh=separate), args, ref_ds)
        cached = precomputed(online_reference(engine, args), args, **trainer._reference_data(engine.device))
        engine.destroy()
        return cached.directories

    # ----------------------------------------------------------------- setup
    def _set_up(self, args: DPOConfig, model, train_dataset, eval_dataset, processing_class, peft_config) -> None:
        """Everything before the engines: checks, seeds, tokenizer or processor, data, collator, step counts."""
        self.args = args
        self.peft_config = peft_config
        a = self.args
        _check_strategies(a)
        if _rank() == 0:  # TRL keys this config sets that do nothing here: one line each, with the reason
            for key in a.no_effect_keys:
                logger.warning("%s", no_effect_note(key, getattr(a, key)))
        seed_everything(a.seed)
        self._data_seed = a.seed if a.data_seed is None else a.data_seed
        _set_tf32(a.tf32)
        model = model if model is not None else a.model_name_or_path
        model_path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        # A vision-language model tokenizes with its processor (images included); None for a text model.
        self.processor = vision.processor_for(model, processing_class, a)
        if self.processor is not None:
            vision.check_layout(a)
        self.tokenizer = self.processor.tokenizer if self.processor is not None else (
            processing_class or load_tokenizer(model_path or "builtin", a))
        self.train_data, self.eval_data, self.data_reports = self._datasets(train_dataset, eval_dataset)
        if self.eval_data is None and (_best_metric(a)[0] is not None and a.eval_strategy != "no"):
            raise ValueError("load_best_model_at_end / save_strategy=best / metric_for_best_model / "
                             f"lr_scheduler_type={a.lr_scheduler_type} rank evaluations, but there is no eval "
                             "dataset (eval_dataset=None and no eval split)")
        self._report_data()
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, padding_side=a.padding_side,
                                           pad_to_multiple_of=a.pad_to_multiple_of, processor=self.processor)

        steps_per_epoch = len(self.train_data) // (a.per_device_train_batch_size * _world()
                                                   * a.gradient_accumulation_steps)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_data)} training pairs are fewer than one optimizer step needs "
                             f"(per_device_train_batch_size*world_size*gradient_accumulation_steps)")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
        self.warmup_steps = a.get_warmup_steps(self.total_steps)
        # A resolved path or an in-memory model: what the policy (and by default the reference) loads from.
        self._model_source = model if not isinstance(model, str) else resolve_model_path(model)

    def _deepspeed_config(self) -> dict:
        """The run's DeepSpeed config, "auto" values filled from the model's hidden size and the step count."""
        a, load = self.args, self._model_source
        hidden = None if isinstance(load, str) else getattr(load.config.get_text_config(), "hidden_size", None)
        if hidden is None:
            from transformers import AutoConfig

            hidden = getattr(AutoConfig.from_pretrained(adapter_base_path(load) or load, trust_remote_code=a
                                                        .trust_remote_code).get_text_config(), "hidden_size", None)
        return load_deepspeed_config(a, _world(), hidden_size=hidden, num_training_steps=self.total_steps)

    def _reference_data(self, device) -> dict:
        """What a reference pass reads (`build_reference`'s and `precomputed`'s keywords): the splits, their
        rows as model inputs on `device`, the batch sizes and a vision model's image settings."""
        a = self.args
        return dict(splits={"train": self.train_data, **({"eval": self.eval_data} if self.eval_data is not None
                                                         else {})},
                    batches=lambda rows: inputs_for(self.collator(rows), a, device),
                    batch_sizes={"train": a.per_device_train_batch_size, "eval": a.per_device_eval_batch_size},
                    image_settings=vision.processor_digest(self.processor) if self.processor is not None else None)

    def _datasets(self, train_dataset, eval_dataset):
        a = self.args
        processing = self.processor or self.tokenizer
        if train_dataset is None:
            data = load_preference_data(a, processing)
            return data.train, data.eval, {"train": data.train_report, "eval": data.eval_report}
        train, report = prepare_dataset(train_dataset, processing, a, "train")
        reports = {"train": report}
        evald = None
        if eval_dataset is not None:
            evald, reports["eval"] = prepare_dataset(eval_dataset, processing, a, "eval")
        return train, evald, reports

    def _report_data(self) -> None:
        """Rank 0 logs what preparation kept, dropped (by reason) and truncated, so that a run never trains
        on a fraction of its data unnoticed; more than max_dropped_fraction of the train rows dropped stops it."""
        for report in self.data_reports.values():
            if report is not None and _rank() == 0:
                dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items())) or "none"
                truncated = ", ".join(f"{n} {part}" for part, n in report.truncated.items()) or "none"
                logger.info("data report, %s split: %d rows read, %d kept; dropped: %s; truncated: %s",
                            report.split, report.rows_read, report.rows_kept, dropped, truncated)
        train = self.data_reports["train"]
        lost = train.rows_read - train.rows_kept
        if train.rows_read and lost / train.rows_read > self.args.max_dropped_fraction:
            raise DataError(f"{lost} of the {train.rows_read} train rows were dropped in preparation "
                            f"({', '.join(f'{n} {r}' for r, n in sorted(train.dropped.items()))}), more than "
                            f"max_dropped_fraction={self.args.max_dropped_fraction}: fix the data or the length "
                            "limits, or raise max_dropped_fraction")

    def _load(self, source, fresh: bool = False):
        """Load (or copy, for an in-memory policy used as its own reference) a model."""
        a = self.args
        if not isinstance(source, str) and fresh:
            import copy

            model = copy.deepcopy(source)
        else:
            model = load_model(source, reference_args(a)) if fresh else load_policy_model(source, a, self.peft_config)
        if a.disable_dropout:
            disable_dropout(model)
        return model

    # ----------------------------------------------------------------- step
    def _loss_and_metrics(self, batch: dict, weights: torch.Tensor, acc: MeanAccumulator, train: bool):
        """Loss of one micro-batch (None when not `train`); adds its metrics to `acc` (weighted by `weights`,
        0 for padding slots)."""
        a = self.args
        inputs = inputs_for(batch, a, self.engines.policy.device)
        # The reference first: an adapter-switching reference must not run between the policy's forward and backward.
        ref = self.reference.pair_logps(inputs, batch.get("row_index"), "train" if train else "eval")
        out = self.engines.policy(**inputs, with_stats=True, with_log_sum_sq_probs=a.use_weighting,
                                  with_aux_loss=bool(self.aux_loss_coef))
        out, aux_loss = out if self.aux_loss_coef else (out, None)
        mask = label_mask(inputs)
        pol = pair_logps(out.logps, mask, a.ld_alpha, out.log_sum_sq_probs)
        loss_out = compute_loss(self.loss_config, pol, ref)
        self._add_metrics(acc, loss_out, pol, out, mask, weights)
        if aux_loss is not None:
            self._add_aux_loss(acc, aux_loss, weights)
        lengths = batch["attention_mask"].sum(1).double()
        self.window += torch.stack([(lengths * weights.repeat(2)).sum(), weights.sum().double(),
                                    (lengths ** 2 * weights.repeat(2)).sum()])
        if not train:
            return None
        # Padding slots carry no weight in the loss either.
        loss = (loss_out.per_pair * weights).sum() / weights.sum().clamp(min=1)
        return loss if aux_loss is None else loss + self.aux_loss_coef * aux_loss

    def _add_aux_loss(self, acc: MeanAccumulator, aux_loss: torch.Tensor, weights: torch.Tensor) -> None:
        """TRL's MoE metrics: `aux_loss`, the mean over micro-batches and ranks, and `loss` including
        `router_aux_loss_coef * aux_loss` (added once per pair, so the pair-weighted mean carries it once)."""
        aux = aux_loss.detach().to(torch.float64)
        acc.add("aux_loss", aux, 1.0)
        acc.add("loss", self.aux_loss_coef * aux * weights.sum(), 0.0)

    @staticmethod
    def _add_metrics(acc, loss_out, pol, out, mask, weights) -> None:
        pair_metrics(acc, loss_out, pol, weights=weights)
        token_w = mask * weights.to(mask.device, mask.dtype).repeat(2).unsqueeze(1)
        cw, rw = token_w.chunk(2)
        chosen_logits, rejected_logits = out.mean_logits.chunk(2)
        token_metrics(
            acc,
            entropy_sum=(out.entropy * token_w).sum(), entropy_count=token_w.sum(),
            top1_sum=(out.top1.chunk(2)[0] * cw).sum(), top1_count=cw.sum(),
            chosen_logit_sum=(chosen_logits * cw).sum(), chosen_count=cw.sum(),
            rejected_logit_sum=(rejected_logits * rw).sum(), rejected_count=rw.sum(),
        )

    def _loader(self, data, indices: list[int], batch_size: int) -> tuple[DataLoader, tuple[torch.Tensor, ...]]:
        """Batches of `indices` (-1: a padding slot, filled with row 0), and each batch's weights (0 for padding)."""
        real = [i if i >= 0 else 0 for i in indices]
        loader = DataLoader(Subset(data, real), batch_size=batch_size, collate_fn=self.collator, shuffle=False,
                            num_workers=self.args.dataloader_num_workers)
        valid = torch.tensor([1.0 if i >= 0 else 0.0 for i in indices])
        return loader, valid.split(batch_size)

    # ----------------------------------------------------------------- loop
    def _resume_path(self, spec: str | bool | None) -> Optional[Path]:
        """transformers' meaning: a checkpoint path, True = the newest complete checkpoint in output_dir (an
        error when there is none), False = none; None falls back to `args.resume_from_checkpoint`."""
        a = self.args
        spec = a.resume_from_checkpoint if spec is None else spec
        if spec is True:
            found = checkpoint.resolve_resume("auto", a.output_dir)
            if found is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {a.output_dir}")
            return found
        return checkpoint.resolve_resume(spec or None, a.output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Train to `max_steps` (or `num_train_epochs`), resuming from `resume_from_checkpoint` as transformers
        does. Returns the logged training rows (`history`) and the final evaluation (`eval`)."""
        a = self.args
        policy = self.engines.policy
        resume = self._resume_path(resume_from_checkpoint)
        if resume is not None:
            # Later checkpoints of an abandoned run move aside, so `auto` never jumps back to them.
            checkpoint.set_aside_newer(a.output_dir, resume)
        self.resumed_from = resume
        if resume is not None:
            client = checkpoint.load(policy, resume)
            self.reference.load(resume)
            self.state.update({k: client[k] for k in self.state})
            if self.metric_scheduler is not None and "metric_scheduler" in client:
                self.metric_scheduler.load_state_dict(client["metric_scheduler"])
            _set_rng_state(client["rng"])
            logger.info("resumed from %s at step %d", resume, self.state["global_step"])
        preemption.install()
        guard = NonFiniteGuard(a, policy)
        if _rank() == 0:
            Path(a.output_dir).mkdir(parents=True, exist_ok=True)
            a.save(os.path.join(a.output_dir, "config.yaml"))

        bar = self._progress_bar()
        acc = MeanAccumulator()
        micro_per_epoch = self.steps_per_epoch * a.gradient_accumulation_steps
        last_log_time, last_log_step = time.perf_counter(), self.state["global_step"]
        history = []
        if a.eval_on_start and self.state["global_step"] == 0:
            self._log(self.evaluate(), bar)
        while self.state["global_step"] < self.total_steps:
            done, per_micro = self.state["samples_in_epoch"], a.per_device_train_batch_size * _world()
            order = epoch_order(len(self.train_data), self.state["epoch"], self._data_seed, shuffle=True,
                                drop_last=True, start=done)
            order = rest_of_epoch(order, micro_per_epoch * per_micro, done, a.per_device_train_batch_size)
            loader, weights = self._loader(self.train_data, order, a.per_device_train_batch_size)
            for batch, w in zip(loader, weights):
                policy.train()
                loss = self._loss_and_metrics(batch, w, acc, train=True)
                policy.backward(guard.watch(loss))
                boundary = policy.is_gradient_accumulation_boundary()
                if boundary:
                    # Logged as TRL does: the rate this step used, the norm before clipping.
                    self.step_lr = policy.get_lr()[0]
                    unpartitioned_norm = _grad_norm(policy) if policy.zero_optimization_stage() == 0 else None
                    nonfinite = guard.before_step(unpartitioned_norm)
                    if nonfinite is not None and checkpoint.is_replicated(policy):
                        guard.discard()
                policy.step()
                self.state["samples_in_epoch"] += per_micro
                if not boundary:
                    continue
                if not guard.after_step(self.state["global_step"] + 1, nonfinite, a.output_dir):
                    self.state["skipped"] += 1  # not "skipped_steps": DeepSpeed's own key in a checkpoint
                    self._log({"global_step": self.state["global_step"] + 1,
                               "skipped_steps": self.state["skipped"]}, bar)
                    continue
                self.state["global_step"] += 1
                step = self.state["global_step"]
                self.reference.after_step(step)
                grad_norm = policy.get_global_grad_norm()
                grad_norm = unpartitioned_norm if grad_norm is None else grad_norm
                acc.add("grad_norm", float(grad_norm) if grad_norm is not None else float("nan"), 1.0)
                epoch_end = self.state["samples_in_epoch"] >= micro_per_epoch * per_micro
                if self._due("logging", step, epoch_end) or (step == 1 and a.logging_first_step) \
                        or (step == self.total_steps and a.logging_strategy != "no"):
                    now = time.perf_counter()
                    metrics = self._finish_window(acc, now - last_log_time, step - last_log_step)
                    last_log_time, last_log_step = now, step
                    history.append(metrics)
                    self._log(metrics, bar)
                    acc = MeanAccumulator()
                if bar is not None:
                    bar.update(1)
                preemption.stop_if_requested(step, self.save, policy.device)
                self._evaluate_and_save(step, epoch_end, bar)
                if a.torch_empty_cache_steps and step % a.torch_empty_cache_steps == 0:
                    get_accelerator().empty_cache()
                if step >= self.total_steps:
                    break
            else:
                self.state["epoch"] += 1
                self.state["samples_in_epoch"] = 0
        final = self._last_eval if self._last_eval.get("global_step") == self.state["global_step"] else {}
        if not final and a.eval_strategy != "no" and self.eval_data is not None:
            final = self.evaluate()
            self._log(final, bar)
        if a.load_best_model_at_end and self.state["best_model_checkpoint"]:
            # As transformers under DeepSpeed: the best checkpoint's DeepSpeed state back into the engine.
            checkpoint.load(policy, Path(self.state["best_model_checkpoint"]))
            logger.info("loaded the best model (%s = %s) from %s", self._best_metric_name,
                        self.state["best_metric"], self.state["best_model_checkpoint"])
        if bar is not None:
            bar.close()
        return {"history": history, "eval": final}

    def _due(self, event: str, step: int, epoch_end: bool) -> bool:
        """transformers' `<event>_strategy`: "steps" every `<event>_steps` optimizer steps, "epoch" at each
        epoch's end, "no" never ("best" saving is decided by the evaluation, in `_evaluate_and_save`)."""
        strategy, every = getattr(self.args, f"{event}_strategy"), getattr(self.args, f"{event}_steps")
        if strategy == "steps":
            return bool(every) and step % every == 0
        return strategy == "epoch" and epoch_end

    def _evaluate_and_save(self, step: int, epoch_end: bool, bar) -> None:
        """Evaluate, then checkpoint, when their strategies say so, as transformers orders them: the checkpoint
        saved at an evaluation's step is the one that evaluation scores for `load_best_model_at_end`."""
        a = self.args
        new_best = False
        if self._due("eval", step, epoch_end) and self.eval_data is not None:
            self._last_eval = self.evaluate()
            self._log(self._last_eval, bar)
            new_best = self._track_best(self._last_eval)
            if self.metric_scheduler is not None:
                self.metric_scheduler.step(self._last_eval[self._best_metric_name])
        if self._due("save", step, epoch_end) or (a.save_strategy == "best" and new_best):
            if new_best:
                self.state["best_model_checkpoint"] = str(Path(a.output_dir) / f"checkpoint-{step}")
            self.save(step)

    def _track_best(self, metrics: dict) -> bool:
        """Record `metric_for_best_model` when it improves (in `greater_is_better`'s direction)."""
        name = self._best_metric_name
        if name is None:
            return False
        if name not in metrics:
            raise ValueError(f"metric_for_best_model={self.args.metric_for_best_model!r}: the evaluation has no "
                             f"{name!r}; it reports {sorted(k for k in metrics if k != 'global_step')}")
        value, best = metrics[name], self.state["best_metric"]
        better = best is None or (value > best if self._greater_is_better else value < best)
        if better:
            self.state["best_metric"] = value
        return better

    def _finish_window(self, acc: MeanAccumulator, seconds: float, steps: int) -> dict:
        """Reduce the window's metrics across ranks and add the throughput figures."""
        totals = acc.reduce()
        window = self.window.to(self.engines.policy.device)
        if dist.is_initialized():
            dist.all_reduce(window)
        tokens, pairs, squared_lengths = window.tolist()
        self.window.zero_()
        self.state["num_tokens"] += int(tokens)
        step = self.state["global_step"]
        metrics = {
            "global_step": step,
            "epoch": step / self.steps_per_epoch,
            "num_tokens": self.state["num_tokens"],
            "learning_rate": self.step_lr,
            **totals,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            **self.throughput.metrics(tokens, squared_lengths, seconds, _world()),
            "samples_per_second": pairs / max(seconds, 1e-9),
            "step_time": seconds / max(steps, 1),
            **self._peak_memory(),
        }
        return metrics

    def _peak_memory(self) -> dict:
        """`max_memory_allocated`: bytes, the largest accelerator peak over ranks (absent on CPU)."""
        device = self.engines.policy.device
        if getattr(device, "type", "cpu") != "cuda":
            return {}
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"max_memory_allocated": int(peak.item())}

    def _log(self, metrics: dict, bar) -> None:
        if self.sink is not None:
            self.sink.log(metrics, metrics.get("global_step", self.state["global_step"]))
        if bar is not None and "loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            tok_s=f"{metrics['tokens_per_second']:.0f}")
        if _rank() == 0:
            # Four significant digits, not four decimals: a learning rate of 5e-06 must not print as 0.0.
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in metrics.items()}
            (bar.write if bar is not None else print)(str(shown))

    def _progress_bar(self):
        if _rank() != 0 or self.args.disable_tqdm:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state["global_step"], desc="dpo", dynamic_ncols=True)

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """TRL's `trainer.evaluate()`: the training metrics on the eval split (or on `eval_dataset`: a raw
        preference dataset, or a dict of them, each reported as `{metric_key_prefix}_{name}_*`), prefixed
        `{metric_key_prefix}_`; exact across ranks. Collective."""
        if isinstance(eval_dataset, dict):
            results = {"global_step": self.state["global_step"]}
            for name, dataset in eval_dataset.items():
                results.update(self.evaluate(dataset, f"{metric_key_prefix}_{name}"))
            return results
        data = self.eval_data
        if eval_dataset is not None:
            if self.args.precompute_ref_log_probs:
                raise ValueError("evaluate(eval_dataset=...): the reference log-probs were precomputed for the "
                                 "datasets given at construction only; pass this one as eval_dataset to DPOTrainer")
            data, _ = prepare_dataset(eval_dataset, self.tokenizer, self.args, "eval")
        if data is None:
            return {}
        return {"global_step": self.state["global_step"],
                **{f"{metric_key_prefix}_{k}": v for k, v in self._evaluate(data).items()}}

    @torch.no_grad()
    def _evaluate(self, data) -> dict:
        a = self.args
        self.engines.policy.eval()
        train_window = self.window.clone()
        acc = MeanAccumulator()
        order = epoch_order(len(data), 0, a.seed, shuffle=False, drop_last=False)
        loader, weights = self._loader(data, order, a.per_device_eval_batch_size)
        batches = zip(loader, weights)
        if _rank() == 0 and not a.disable_tqdm:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=len(loader), desc="eval", leave=False, dynamic_ncols=True)
        with preemption.phase("eval"):
            for batch, w in batches:
                # Collective: a signal stops the evaluation at this batch on every rank, and saves the step.
                preemption.stop_if_requested(self.state["global_step"], self.save, self.engines.policy.device)
                self._loss_and_metrics(batch, w, acc, train=False)
        totals = acc.reduce()
        self.window.copy_(train_window)
        self.engines.policy.train()
        return totals

    # ----------------------------------------------------------------- saving
    def save(self, step: int) -> Path:
        client = {**self.state, "rng": _rng_state()}
        if self.metric_scheduler is not None:
            client["metric_scheduler"] = self.metric_scheduler.state_dict()
        checkpoint.begin_save(self.args.output_dir, step)
        folder = Path(self.args.output_dir) / f"checkpoint-{step}"
        # Inside the checkpoint directory before checkpoint.save marks it complete: the reference's state, and
        # the model directory transformers writes into every checkpoint (`pipeline(model=checkpoint-N)` loads it);
        # that model gets no marker of its own: only the checkpoint's counts.
        try:
            self.reference.save(folder)
            self._write_model(folder, marker=False)
        except Exception as err:
            checkpoint.raise_if_no_space(err, folder)
            raise
        saved = checkpoint.save(self.engines.policy, self.args.output_dir, step, client, self.args.save_total_limit,
                                best=self.state["best_model_checkpoint"], model_only=self.args.save_only_model,
                                keep=self.resumed_from)
        if self.args.push_to_hub and _rank() == 0:
            try:
                hub.push_checkpoint(self.args, saved)
            except hub.HubPushError as exc:  # training goes on; the final push_to_hub reports the failure
                logger.warning("%s", exc)
        return saved

    def save_model(self, output_dir: Optional[str] = None) -> Path:
        """TRL's `trainer.save_model()`: the policy and tokenizer in Hugging Face format, by default in
        `output_dir` itself. Collective: call on every rank (ZeRO-3 gathers the 16-bit weights, rank 0 writes).

        A LoRA policy is saved twice: its adapter in PEFT's format under `adapter/`, and merged into the
        base weights as a plain model.
        """
        return self._write_model(output_dir or self.args.output_dir, marker=True)

    def _write_model(self, out: str | Path, marker: bool) -> Path:
        """The model directory; `marker`: with the export's own COMPLETE (not inside a checkpoint, whose
        marker must be the only one)."""
        processing = self.processor or self.tokenizer  # a processor saves its tokenizer too
        if is_peft_model(self.model):
            return export_peft(self.engines.policy, self.model, processing, out)
        return checkpoint.export_hf(self.engines.policy, self.model, processing, out, marker=marker)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None,
                    private: Optional[bool] = None) -> Optional[str]:
        """TRL's `trainer.push_to_hub()`: save the model into `output_dir`, then upload `output_dir` (without its
        checkpoints) to `hub_model_id` (default: output_dir's name). Collective; rank 0 uploads and returns the
        repository id. Uploads always block here (`blocking` is accepted for TRL's signature). A failed upload
        raises `HubPushError` after the local save, so the trained model is kept."""
        self.save_model()
        if _rank() != 0:
            return None
        return hub.upload(self.args, self.args.output_dir, commit_message=commit_message or "End of training",
                          token=token, revision=revision, private=private)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"


def resolve_config(argv: list[str]) -> tuple[DPOConfig, dict[str, str]]:
    """(config, where each value came from) of a train.py command line.

    The embedded default (examples/default.yaml) applies only to a command line with no run
    arguments, launcher arguments (--local_rank) aside; otherwise unset keys keep DPOConfig's defaults.
    """
    from .parser import ConfigParser

    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--local_rank", "--local-rank")
    if not launcher.parse_known_args(argv)[1]:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    config, sources, _ = ConfigParser(prog="train.py").parse(argv)
    return config, sources


def main(argv: Optional[list[str]] = None) -> int:
    """`deepspeed launch/train.py [--config X.yaml] [--key value ...]`; exit code 0 on success, 2 on a config error.

    Given no run arguments at all (launcher arguments such as --local_rank aside), the embedded
    default (examples/default.yaml) runs. Given any, every key they do not set keeps DPOConfig's
    default, which is TRL's. An error on any rank ends the process with code 1 at once: the
    launcher then stops the other ranks instead of leaving them waiting in a collective.
    """
    import sys
    import traceback
    import warnings

    from . import distributed
    from .config import ConfigError
    from .parser import describe

    try:
        args, sources = resolve_config(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"dpo_ds: config error: {e}", file=sys.stderr)
        return 2
    if _rank() == 0:
        print(describe(args, sources), flush=True)  # the trainer warns about keys without effect
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed's ZeRO-3 calls torch's deprecated collective names on every step: one line each, no signal.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    preemption.install("setup")  # a signal before training starts: nothing to save, exit 75 at once
    try:
        distributed.init(args.ddp_timeout)
        trainer = DPOTrainer(args=args)
        trainer.train()
        with preemption.phase("export"):
            if _rank() == 0:
                logger.info("saving the model to %s", args.output_dir)
            if args.push_to_hub:  # saves into output_dir first: a failed upload keeps the model
                trainer.push_to_hub()
            else:
                trainer.save_model()
        out = args.output_dir
        trainer.close()
        if _rank() == 0:
            print(f"dpo_ds: done; model saved to {out}")
        distributed.shutdown()
        return 0
    except Diverged as e:  # decided alike on every rank: a clean collective exit
        if _rank() == 0:
            print(f"dpo_ds: {e}", file=sys.stderr)
        distributed.shutdown()
        return 1
    except DataError as e:  # the same on every rank: one line, no traceback
        if _rank() == 0:
            print(f"dpo_ds: data error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    except checkpoint.CheckpointError as e:  # one line that names the checkpoint, no traceback
        print(f"dpo_ds: rank {_rank()}: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
