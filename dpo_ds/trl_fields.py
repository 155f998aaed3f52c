"""TRL and transformers options that are not DPOConfig fields: accepted with a warning, or refused.

Every field of TRL 1.16's DPOConfig (with transformers' TrainingArguments), ModelConfig,
ScriptArguments and DatasetMixtureConfig is a DPOConfig field (honoured), a key folded into one
(ALIASES), or listed here:

- NO_EFFECT: accepted; a value other than TRL's default prints one warning line with the reason.
- REFUSED: accepted at TRL's default; any other value is an error, because ignoring it would
  silently change the result.

Keys that older TRL/transformers versions had and published recipes still carry are listed
too. docs/trl_fields.md shows the whole table; tests/test_trl_fields.py keeps both complete.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

# key: (TRL's default, why it has no effect here)
NO_EFFECT: dict[str, tuple[Any, str]] = {
    "remove_unused_columns": (True, "rows are tokenized from their prompt/chosen/rejected columns; others are never fed to the model"),
    "label_names": (None, "the loss reads no label columns"),
    "length_column_name": ("length", "no length-grouped sampling"),
    "do_train": (False, "train.py always trains"),
    "do_eval": (False, "evaluation follows eval_strategy"),
    "do_predict": (False, "there is no predict pass"),
    "overwrite_output_dir": (False, "removed from transformers; checkpoints resume via resume_from_checkpoint"),
    "logging_dir": (None, "removed from transformers; TensorBoard logs go under output_dir"),
    "log_level": ("passive", "dpo_ds logs at INFO on rank 0"),
    "log_level_replica": ("warning", "dpo_ds logs at INFO on rank 0"),
    "log_on_each_node": (True, "only global rank 0 logs"),
    "logging_nan_inf_filter": (True, "logged metrics are exact means, nan/inf included"),
    "debug": ("", "transformers' TPU/underflow debug modes do not apply"),
    "skip_memory_metrics": (True, "memory is reported by the DeepSpeed engines"),
    "include_num_input_tokens_seen": ("no", "tokens/s is always logged"),
    "project": ("huggingface", "the metric sinks name runs by run_name"),
    "trackio_space_id": (None, "trackio logs locally"),
    "trackio_bucket_id": (None, "trackio logs locally"),
    "trackio_static_space_id": (None, "trackio logs locally"),
    "eval_delay": (0, "evaluation follows eval_strategy/eval_steps only"),
    "prediction_loss_only": (False, "evaluation computes the DPO metrics, never predictions"),
    "eval_do_concat_batches": (True, "eval metrics are accumulated, not concatenated"),
    "eval_use_gather_object": (False, "eval metrics are reduced across ranks"),
    "eval_accumulation_steps": (None, "eval metrics are accumulated on the device"),
    "include_for_metrics": ([], "there are no compute_metrics callbacks"),
    "batch_eval_metrics": (False, "there are no compute_metrics callbacks"),
    "save_on_each_node": (False, "rank 0 writes the export; DeepSpeed shards go where DeepSpeed puts them"),
    "enable_jit_checkpoint": (False, "preemption signals already checkpoint (see preemption.py)"),
    "hub_always_push": (False, "pushes wait for the previous one"),
    "hub_revision": (None, "pushes go to the default branch"),
    "restore_callback_states_from_checkpoint": (False, "there are no trainer callbacks"),
    "full_determinism": (False, "seed and data_seed fix the run; no deterministic-kernels mode"),
    "use_cpu": (False, "the device follows DS_ACCELERATOR / the hardware"),
    "accelerator_config": (None, "no accelerate: DeepSpeed engines are used directly"),
    "parallelism_config": (None, "no accelerate: parallelism comes from the DeepSpeed config"),
    "dataloader_pin_memory": (True, "batches are built in the training process and moved once"),
    "dataloader_persistent_workers": (False, "see dataloader_num_workers"),
    "dataloader_prefetch_factor": (None, "see dataloader_num_workers"),
    "dataloader_multiprocessing_context": (None, "see dataloader_num_workers"),
    "dataloader_in_order": (True, "batches are always delivered in order"),
    "ddp_find_unused_parameters": (None, "DeepSpeed engines, not DDP, reduce the gradients"),
    "ddp_bucket_cap_mb": (None, "DeepSpeed engines, not DDP: bucket sizes live in the DeepSpeed config"),
    "ddp_broadcast_buffers": (None, "DeepSpeed engines, not DDP, reduce the gradients"),
    "ddp_static_graph": (None, "DeepSpeed engines, not DDP, reduce the gradients"),
    "ddp_backend": (None, "the backend follows the accelerator (nccl on CUDA, gloo on CPU)"),
    "fsdp": (None, "sharding is DeepSpeed ZeRO: pass --deepspeed ds_configs/zero3.json"),
    "fsdp_config": (None, "sharding is DeepSpeed ZeRO: pass --deepspeed ds_configs/zero3.json"),
    "activation_checkpointing": (None, "FSDP's option; use gradient_checkpointing"),
    "activation_checkpointing_kwargs": (None, "FSDP's option; use gradient_checkpointing_kwargs"),
    "activation_offloading": (False, "use a ZeRO offload config to move state off the accelerator"),
    "torch_compile": (False, "the fused log-prob head is already a compiled kernel; models run eagerly"),
    "torch_compile_backend": (None, "see torch_compile"),
    "torch_compile_mode": (None, "see torch_compile"),
    "use_liger_kernel": (False, "the fused LM head (dpo_ds.ops) is the equivalent: log-probs without [tokens, vocab] logits"),
    "liger_kernel_config": (None, "see use_liger_kernel"),
    "use_logits_to_keep": (False, "the fused head computes log-probs of completion tokens only"),
    "use_cache": (False, "the KV cache is always off in training"),
    "auto_find_batch_size": (False, "the batch size is fixed; dpo-ds estimate sizes it before the run"),
    "average_tokens_across_devices": (True, "losses are per pair and reduced across ranks by their definition"),
    "label_smoothing_factor": (0.0, "transformers' cross-entropy smoothing; DPO's is label_smoothing"),
    "ignore_bias_buffers": (False, "DDP's bias-buffer broadcast does not exist under DeepSpeed"),
    "local_rank": (-1, "set by the launcher; the rank comes from the environment"),
    "pad_token": (None, "padding positions are masked, so the pad token's id never matters"),
}

# key: (TRL's default, why ignoring another value would change the result)
REFUSED: dict[str, tuple[Any, str]] = {
    "dataset_streaming": (False, "streaming datasets are not implemented yet: rows are tokenized up front and drawn by index"),
    "streaming": (False, "streaming datasets are not implemented yet: rows are tokenized up front and drawn by index"),
    "neftune_noise_alpha": (None, "NEFTune embedding noise is not implemented, and training without it gives other weights"),
    "bf16_full_eval": (False, "evaluation runs in the training precision; a bf16-only eval would give other metrics"),
    "fp16_full_eval": (False, "evaluation runs in the training precision; an fp16-only eval would give other metrics"),
    "dataloader_drop_last": (False, "the last partial batch is always trained on"),
    "train_sampling_strategy": ("random", "batches are always drawn in random order"),
    "ignore_data_skip": (False, "a resumed run always skips the batches it already trained on"),
    "optim_target_modules": (None, "GaLore/APOLLO target modules are not implemented"),
    "load_in_8bit": (False, "8-bit base weights are not implemented (load_in_4bit is)"),
    "bnb_4bit_quant_type": ("nf4", "4-bit quantization is always NF4"),
    "use_bnb_nested_quant": (False, "nested (double) 4-bit quantization is not implemented"),
    "bnb_4bit_quant_storage": (None, "the 4-bit storage type is bitsandbytes' default"),
}

# key: (DPOConfig field, key inside it or None to copy the value): honoured by folding into a field.
ALIASES: dict[str, tuple[str, Any]] = {
    "dtype": ("model_init_kwargs", "dtype"),
    "torch_dtype": ("model_init_kwargs", "dtype"),
    "model_revision": ("model_init_kwargs", "revision"),
    "lora_modules_to_save": ("peft_config", "modules_to_save"),
    "lora_target_parameters": ("peft_config", "target_parameters"),
    "lora_task_type": ("peft_config", "task_type"),
    "use_rslora": ("peft_config", "use_rslora"),
    "use_dora": ("peft_config", "use_dora"),
    "test_split_size": ("eval_fraction", None),
}
# TRL's defaults of the aliases: a key left at its default is not folded.
ALIAS_DEFAULTS: dict[str, Any] = {
    "dtype": None, "torch_dtype": None, "model_revision": "main", "lora_modules_to_save": None,
    "lora_target_parameters": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False,
    "test_split_size": None,
}

# Every TRL-only key with TRL's default.
TRL_ONLY_DEFAULTS: dict[str, Any] = {**ALIAS_DEFAULTS, **{k: d for k, (d, _) in {**NO_EFFECT, **REFUSED}.items()}}


def _trl_only_field(default: Any) -> dataclasses.Field:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
    return dataclasses.field(default=default)


# The base class of DPOConfig, so that `DPOConfig(remove_unused_columns=False)` works from Python as
# with TRL; DPOConfig.__post_init__ folds, refuses or notes these keys.
TRLKeys = dataclasses.make_dataclass(
    "TRLKeys", [(name, bool if isinstance(default, bool) else Any, _trl_only_field(default))
                for name, default in TRL_ONLY_DEFAULTS.items()],
    namespace={"__module__": __name__,
               "__doc__": "TRL/transformers keys that are not DPOConfig options (see this module's docstring)."})


def no_effect_note(name: str, value: Any) -> str:
    """The warning line of a NO_EFFECT key set away from TRL's default."""
    return f"{name}={value!r} has no effect in dpo_ds: {NO_EFFECT[name][1]}"
