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
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from . import checkpoint, preemption
from .collate import PreferenceCollator
from .config import DPOConfig
from .ds_config import load_deepspeed_config, reference_deepspeed_config
from .data import load_preference_data, prepare_dataset
from .distributed import on_cpu, rank as _rank, world_size as _world
from .engines import Engines, build_policy_engine, export_peft, load_for_engine
from .losses import compute_loss
from .metrics import MeanAccumulator, MetricsSink, pair_metrics, token_metrics
from .models import (adapter_base_path, disable_dropout, is_peft_model, load_model, load_policy_model, load_tokenizer,
                     resolve_model_path)
from .packing import inputs_for
from .reference import build_reference, pair_logps

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


class DPOTrainer:
    """TRL-style entry point: `DPOTrainer(model, args=DPOConfig(...), train_dataset=ds).train()`.

    `model` is a hub id / local path / "builtin", or a PreTrainedModel.
    `train_dataset`/`eval_dataset` are raw preference datasets (any format
    `dpo_ds.data` accepts); when None they come from `args.dataset_name`.
    """

    def __init__(self, model=None, ref_model=None, args: Optional[DPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None):
        self.args = args or DPOConfig()
        self.peft_config = peft_config
        a = self.args
        seed_everything(a.seed)
        model = model if model is not None else a.model_name_or_path
        model_path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        self.tokenizer = processing_class or load_tokenizer(model_path or "builtin", a)
        self.train_data, self.eval_data, self.data_reports = self._datasets(train_dataset, eval_dataset)
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, padding_side=a.padding_side,
                                           pad_to_multiple_of=a.pad_to_multiple_of)

        steps_per_epoch = len(self.train_data) // (a.per_device_train_batch_size * _world()
                                                   * a.gradient_accumulation_steps)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_data)} training pairs are fewer than one optimizer step needs "
                             f"(per_device_train_batch_size*world_size*gradient_accumulation_steps)")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
        self.warmup_steps = a.get_warmup_steps(self.total_steps)

        load = model if not isinstance(model, str) else resolve_model_path(model)
        hidden = None if isinstance(load, str) else getattr(load.config, "hidden_size", None)
        if hidden is None:
            from transformers import AutoConfig

            hidden = getattr(AutoConfig.from_pretrained(adapter_base_path(load) or load,
                                                        trust_remote_code=a.trust_remote_code), "hidden_size", None)
        ds_config = load_deepspeed_config(a, _world(), hidden_size=hidden, num_training_steps=self.total_steps)
        policy_model, handle = load_for_engine(lambda: self._load(load), ds_config)
        self.model = policy_model
        policy = build_policy_engine(policy_model, a, ds_config, self.total_steps, self.warmup_steps)

        ref_source = ref_model if ref_model is not None else (
            resolve_model_path(a.ref_model_name_or_path) if a.ref_model_name_or_path else load)
        splits = {"train": self.train_data, **({"eval": self.eval_data} if self.eval_data is not None else {})}
        ref_ds = reference_deepspeed_config(a, ds_config, on_cpu=on_cpu())
        self.reference, reference = build_reference(
            a, policy, lambda: self._load(ref_source, fresh=True), ref_ds,
            splits, lambda rows: inputs_for(self.collator(rows), a, policy.device),
            {"train": a.per_device_train_batch_size, "eval": a.per_device_eval_batch_size},
            separate_model=ref_model is not None or bool(a.ref_model_name_or_path))
        # The policy's ZeRO settings stay the ones transformers sees during training.
        _, handle = load_for_engine(lambda: None, ds_config)
        self.engines = Engines(policy, reference, ds_config, ref_ds if reference is not None else None, handle)

        # [tokens, pairs] processed by this rank since the last log (padding slots excluded).
        self.window = torch.zeros(2, dtype=torch.float64)
        # samples_in_epoch counts pairs over all ranks: it stays right when the world size changes.
        self.state = {"global_step": 0, "epoch": 0, "samples_in_epoch": 0, "num_tokens": 0}
        self.sink = MetricsSink(a.output_dir, a.report_to, run_name=a.run_name, config=a.to_dict()) \
            if _rank() == 0 else None

    # ----------------------------------------------------------------- setup
    def _datasets(self, train_dataset, eval_dataset):
        a = self.args
        if train_dataset is None:
            data = load_preference_data(a, self.tokenizer)
            return data.train, data.eval, {"train": data.train_report, "eval": data.eval_report}
        train, report = prepare_dataset(train_dataset, self.tokenizer, a, "train")
        reports = {"train": report}
        evald = None
        if eval_dataset is not None:
            evald, reports["eval"] = prepare_dataset(eval_dataset, self.tokenizer, a, "eval")
        return train, evald, reports

    def _load(self, source, fresh: bool = False):
        """Load (or copy, for an in-memory policy used as its own reference) a model."""
        a = self.args
        if not isinstance(source, str) and fresh:
            import copy

            model = copy.deepcopy(source)
        else:
            model = load_model(source, a) if fresh else load_policy_model(source, a, self.peft_config)
        if a.disable_dropout:
            disable_dropout(model)
        return model

    # ----------------------------------------------------------------- step
    def _forward(self, batch: dict, weights: torch.Tensor, acc: MeanAccumulator, train: bool):
        """Loss of one micro-batch; adds its metrics (weighted by `weights`, 0 for padding slots)."""
        a = self.args
        inputs = inputs_for(batch, a, self.engines.policy.device)
        # The reference first: an adapter-switching reference must not run between the policy's forward and backward.
        ref = self.reference.pair_logps(inputs, batch.get("row_index"), "train" if train else "eval")
        out = self.engines.policy(**inputs, with_stats=True, with_log_sum_sq_probs=a.use_weighting)
        mask = inputs["completion_mask"][:, 1:].to(torch.float32)
        pol = pair_logps(out.logps, mask, a.ld_alpha, out.log_sum_sq_probs)
        loss_out = compute_loss(a, pol, ref)
        self._add_metrics(acc, loss_out, pol, out, mask, weights)
        self.window += torch.stack([(batch["attention_mask"].float() * weights.repeat(2).unsqueeze(1)).sum(),
                                    weights.sum()])
        if not train:
            return None
        # Padding slots carry no weight in the loss either.
        return (loss_out.per_pair * weights).sum() / weights.sum().clamp(min=1)

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

    def _loader(self, data, indices: list[int], batch_size: int) -> DataLoader:
        real = [i if i >= 0 else 0 for i in indices]
        loader = DataLoader(Subset(data, real), batch_size=batch_size, collate_fn=self.collator, shuffle=False)
        valid = torch.tensor([1.0 if i >= 0 else 0.0 for i in indices])
        return loader, valid.split(batch_size)

    # ----------------------------------------------------------------- loop
    def train(self) -> dict:
        a = self.args
        policy = self.engines.policy
        resume = checkpoint.resolve_resume(a.resume_from_checkpoint, a.output_dir)
        if resume is not None:
            client = checkpoint.load(policy, resume)
            self.reference.load(resume)
            self.state.update({k: client[k] for k in self.state})
            _set_rng_state(client["rng"])
            logger.info("resumed from %s at step %d", resume, self.state["global_step"])
        preemption.install()
        if _rank() == 0:
            Path(a.output_dir).mkdir(parents=True, exist_ok=True)
            a.save(os.path.join(a.output_dir, "config.yaml"))

        bar = self._progress_bar()
        acc = MeanAccumulator()
        micro_per_epoch = self.steps_per_epoch * a.gradient_accumulation_steps
        last_log_time, last_log_step = time.perf_counter(), self.state["global_step"]
        history = []
        while self.state["global_step"] < self.total_steps:
            done, per_micro = self.state["samples_in_epoch"], a.per_device_train_batch_size * _world()
            order = epoch_order(len(self.train_data), self.state["epoch"], a.seed, shuffle=True, drop_last=True,
                                start=done)
            order = order[: max(0, micro_per_epoch * per_micro - done) // per_micro * a.per_device_train_batch_size]
            loader, weights = self._loader(self.train_data, order, a.per_device_train_batch_size)
            for batch, w in zip(loader, weights):
                policy.train()
                loss = self._forward(batch, w, acc, train=True)
                policy.backward(loss)
                boundary = policy.is_gradient_accumulation_boundary()
                if boundary:
                    # Logged as TRL does: the rate this step used, the norm before clipping.
                    self.step_lr = policy.get_lr()[0]
                    unpartitioned_norm = _grad_norm(policy) if policy.zero_optimization_stage() == 0 else None
                policy.step()
                self.state["samples_in_epoch"] += per_micro
                if not boundary:
                    continue
                self.state["global_step"] += 1
                step = self.state["global_step"]
                self.reference.after_step(step)
                grad_norm = policy.get_global_grad_norm()
                grad_norm = unpartitioned_norm if grad_norm is None else grad_norm
                acc.add("grad_norm", float(grad_norm) if grad_norm is not None else float("nan"), 1.0)
                if step % a.logging_steps == 0 or step == self.total_steps:
                    now = time.perf_counter()
                    metrics = self._finish_window(acc, now - last_log_time, step - last_log_step)
                    last_log_time, last_log_step = now, step
                    history.append(metrics)
                    self._log(metrics, bar)
                    acc = MeanAccumulator()
                if bar is not None:
                    bar.update(1)
                preemption.stop_if_requested(step, self.save, policy.device)
                if a.eval_strategy != "no" and a.eval_steps and step % a.eval_steps == 0 and step < self.total_steps:
                    self._log(self.evaluate(), bar)
                if a.save_steps and step % a.save_steps == 0:
                    self.save(step)
                if step >= self.total_steps:
                    break
            else:
                self.state["epoch"] += 1
                self.state["samples_in_epoch"] = 0
        final = {}
        if a.eval_strategy != "no" and self.eval_data is not None:
            final = self.evaluate()
            self._log(final, bar)
        if bar is not None:
            bar.close()
        return {"history": history, "eval": final}

    def _finish_window(self, acc: MeanAccumulator, seconds: float, steps: int) -> dict:
        """Reduce the window's metrics across ranks and add the throughput figures."""
        a = self.args
        totals = acc.reduce()
        window = self.window.to(self.engines.policy.device)
        if dist.is_initialized():
            dist.all_reduce(window)
        tokens, pairs = window.tolist()
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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The training metrics on the eval split, prefixed `eval_`; exact across ranks."""
        a = self.args
        if self.eval_data is None:
            return {}
        self.engines.policy.eval()
        train_window = self.window.clone()
        acc = MeanAccumulator()
        order = epoch_order(len(self.eval_data), 0, a.seed, shuffle=False, drop_last=False)
        loader, weights = self._loader(self.eval_data, order, a.per_device_eval_batch_size)
        batches = zip(loader, weights)
        if _rank() == 0 and not a.disable_tqdm:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=len(loader), desc="eval", leave=False, dynamic_ncols=True)
        for batch, w in batches:
            self._forward(batch, w, acc, train=False)
        totals = acc.reduce()
        self.window.copy_(train_window)
        self.engines.policy.train()
        return {"global_step": self.state["global_step"], **{f"eval_{k}": v for k, v in totals.items()}}

    # ----------------------------------------------------------------- saving
    def save(self, step: int) -> Path:
        client = {**self.state, "rng": _rng_state()}
        # Inside the checkpoint directory before checkpoint.save marks it complete.
        self.reference.save(Path(self.args.output_dir) / f"checkpoint-{step}")
        return checkpoint.save(self.engines.policy, self.args.output_dir, step, client, self.args.save_total_limit)

    def export(self, out_dir: Optional[str] = None) -> Path:
        """Save the policy in Hugging Face format (collective: call on every rank).

        A LoRA policy is saved twice: its adapter in PEFT's format under `adapter/`, and merged into the
        base weights as a plain model.
        """
        out = out_dir or os.path.join(self.args.output_dir, "final")
        if is_peft_model(self.model):
            return export_peft(self.engines.policy, self.model, self.tokenizer, out)
        return checkpoint.export_hf(self.engines.policy, self.model, self.tokenizer, out)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"


def resolve_config(argv: list[str]) -> tuple[DPOConfig, dict[str, str], list[str]]:
    """(config, where each value came from, warnings about keys without effect) of a train.py command line.

    The embedded default (examples/default.yaml) applies only to a command line with no run
    arguments, launcher arguments (--local_rank) aside; otherwise unset keys keep DPOConfig's defaults.
    """
    from .parser import ConfigParser

    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--local_rank", "--local-rank")
    if not launcher.parse_known_args(argv)[1]:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = ConfigParser(prog="train.py")
    config, sources, _ = parser.parse(argv)
    return config, sources, parser.notes


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
        args, sources, notes = resolve_config(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"dpo_ds: config error: {e}", file=sys.stderr)
        return 2
    if _rank() == 0:
        print("\n".join([describe(args, sources), *(f"dpo_ds: warning: {n}" for n in notes)]), flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed's ZeRO-3 calls torch's deprecated collective names on every step: one line each, no signal.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    try:
        distributed.init()
        trainer = DPOTrainer(args=args)
        trainer.train()
        out = trainer.export()
        trainer.close()
        if _rank() == 0:
            print(f"dpo_ds: done; model saved to {out}")
        distributed.shutdown()
        return 0
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
