"""The DeepSpeed JSON of a run: the built-in default, "auto" values filled from DPOConfig the way
transformers' HfTrainerDeepSpeedConfig fills them, and the reference engine's own config."""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Any, Optional

from .config import ConfigError, DPOConfig

# Used when DPOConfig.deepspeed is None: ZeRO-3 without offload, shipped as package data (a copy of
# ds_configs/zero3.json); load_deepspeed_config makes it stage 0 for an fp32 run on one rank.
DEFAULT_DEEPSPEED_CONFIG: dict[str, Any] = json.loads(
    resources.files("dpo_ds").joinpath("ds_configs/zero3.json").read_text())

# Hidden size assumed for the ZeRO-3 "auto" bucket sizes when the model's is not known yet: the
# buckets of a mid-size (7B-class) model stay small enough for a laptop and large enough for a GPU.
DEFAULT_HIDDEN_SIZE = 4096


def _read_deepspeed_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed config file {path!r} does not exist", "deepspeed")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed config file {path!r} is not valid JSON: {err.msg} at line {err.lineno} "
                          f"column {err.colno}", "deepspeed") from err
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed config file {path!r} must hold a JSON object", "deepspeed")
    return data


class _Filler:
    """Replaces "auto" values and records explicit values that contradict DPOConfig."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.mismatches: list[str] = []

    def node(self, path: str) -> tuple[Optional[dict], str]:
        *parents, key = path.split(".")
        node = self.config
        for p in parents:
            node = node.get(p)
            if not isinstance(node, dict):
                return None, key
        return node, key

    def fill(self, path: str, value: Any, source: Optional[str], add_missing: bool = False) -> None:
        """Set an "auto" (or, with add_missing, absent) value; an explicit different value is a mismatch
        unless source is None (a value DPOConfig has no opinion on)."""
        node, key = self.node(path)
        if node is None:
            return
        current = node.get(key)
        if current == "auto" or (current is None and add_missing):
            node[key] = value
        elif current is not None and source is not None and not _same(current, value):
            self.mismatches.append(f"{path}={current!r} in the DeepSpeed config vs {source}={value!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def load_deepspeed_config(
    args: DPOConfig,
    world_size: int,
    hidden_size: Optional[int] = None,
    num_training_steps: Optional[int] = None,
) -> dict[str, Any]:
    """The policy engine's DeepSpeed config: args.deepspeed (or the built-in ZeRO-3 default) with
    every "auto" filled from args the way transformers' HfTrainerDeepSpeedConfig fills it.

    hidden_size sizes the ZeRO buckets (DEFAULT_HIDDEN_SIZE when unknown); num_training_steps
    (default: args.max_steps when > 0) fills a scheduler section's step counts. An explicit value
    that contradicts args is a ConfigError naming both.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    source = args.deepspeed or "the built-in default"
    config = _read_deepspeed_json(args.deepspeed) if args.deepspeed else copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    if not args.deepspeed and world_size == 1 and not (args.bf16 or args.fp16):
        # One rank has nothing to partition: ZeRO-3 would only add per-module gathers and a second fp32
        # copy of the weights. A stage-0 checkpoint converts to ZeRO-3's layout when resumed on more
        # ranks (checkpoint.load). Mixed precision keeps ZeRO-3: its stage-0 optimizer state has no converter.
        config["zero_optimization"] = {"stage": 0}
    if num_training_steps is None and args.max_steps > 0:
        num_training_steps = args.max_steps
    f = _Filler(config)
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    f.fill("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", add_missing=True)
    f.fill("gradient_accumulation_steps", accum, "gradient_accumulation_steps", add_missing=True)
    f.fill("train_batch_size", micro * accum * world_size,
           f"per_device_train_batch_size*gradient_accumulation_steps*world_size ({micro}*{accum}*{world_size})",
           add_missing=True)
    f.fill("gradient_clipping", args.max_grad_norm, "max_grad_norm", add_missing=True)

    f.fill("optimizer.params.lr", args.learning_rate, "learning_rate")
    f.fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "[adam_beta1, adam_beta2]")
    f.fill("optimizer.params.eps", args.adam_epsilon, "adam_epsilon")
    f.fill("optimizer.params.weight_decay", args.weight_decay, "weight_decay")

    f.fill("scheduler.params.warmup_min_lr", 0, None)
    f.fill("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate")
    if num_training_steps is not None:
        f.fill("scheduler.params.total_num_steps", num_training_steps, "the number of training steps")
        # DeepSpeed >= 0.19.6 rejects warmup_num_steps <= 0, so a no-warmup run gets 1 (as transformers does).
        f.fill("scheduler.params.warmup_num_steps", max(1, args.get_warmup_steps(num_training_steps)),
               "warmup_steps (from warmup_steps/warmup_ratio)")

    for flag in ("bf16", "fp16"):
        section = "bfloat16" if flag == "bf16" and "bfloat16" in config else flag
        if getattr(args, flag) and section not in config:
            config[section] = {"enabled": True}
        f.fill(f"{section}.enabled", getattr(args, flag), flag)

    size = hidden_size or DEFAULT_HIDDEN_SIZE
    f.fill("zero_optimization.reduce_bucket_size", size * size, None)
    f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * size * size), None)
    f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * size, None)

    if f.mismatches:
        raise ConfigError(f"{source} contradicts the run config:\n  - " + "\n  - ".join(f.mismatches)
                          + '\nSet these DeepSpeed values to "auto" or make them equal.', "deepspeed")
    zero = config.get("zero_optimization", {})
    param_offload = zero.get("offload_param", {}).get("device", "none")
    if param_offload not in (None, "none") and int(zero.get("stage", 0)) < 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param.device={param_offload!r} needs stage 3 "
                          f"(got stage {zero.get('stage', 0)}): DeepSpeed would silently keep the parameters on "
                          "the device; use stage 3 or remove offload_param", "deepspeed")
    left = _find_auto(config)
    if left:
        hint = (" (the scheduler's step counts need num_training_steps or max_steps > 0)"
                if any(p.startswith("scheduler.") for p in left) else "")
        raise ConfigError(f"{source}: no rule fills these \"auto\" values{hint}: {', '.join(left)}; "
                          "set them explicitly", "deepspeed")
    return config


def reference_setup(args: DPOConfig, policy_ds: dict[str, Any], on_cpu: bool = False) -> tuple[int, str]:
    """(ZeRO stage, offload device) of the reference engine: ref_zero_stage and ref_offload where set.

    Unset, the reference is ZeRO-3 offloaded to CPU (sharded across ranks, off the accelerator between
    uses), except beside the built-in one-rank stage-0 policy of a CPU run (`on_cpu`): there it is
    replicated too, since one rank has nothing to shard and a CPU run nowhere to offload to.
    """
    one_rank_default = not args.deepspeed and int(policy_ds.get("zero_optimization", {}).get("stage", 0)) == 0
    stage = args.ref_zero_stage
    if stage is None:
        stage = 0 if one_rank_default and on_cpu and args.ref_offload in ("auto", "none") else 3
    offload = args.ref_offload if args.ref_offload != "auto" else ("cpu" if stage == 3 else "none")
    return stage, offload


def reference_deepspeed_config(args: DPOConfig, policy_ds: dict[str, Any], on_cpu: bool = False) -> dict[str, Any]:
    """The inference-only reference engine's config, derived from the policy's filled config:
    the ZeRO stage and offload of `reference_setup`, the same precision and batch sizes, and no
    optimizer or scheduler."""
    ref = {key: copy.deepcopy(policy_ds[key]) for key in (
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
        "bf16", "bfloat16", "fp16", "steps_per_print", "wall_clock_breakdown") if key in policy_ds}
    stage, offload = reference_setup(args, policy_ds, on_cpu)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        policy_zero = policy_ds.get("zero_optimization", {})
        zero.update({k: v for k, v in policy_zero.items() if k.startswith("stage3_")})
        if offload != "none":
            zero["offload_param"] = {"device": offload, "pin_memory": True}
            if offload == "nvme":
                zero["offload_param"]["nvme_path"] = args.ref_nvme_path
    ref["zero_optimization"] = zero
    return ref
