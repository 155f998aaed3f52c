"""DeepSpeed engines: the trainable policy and an inference-only reference.

Everything that touches DeepSpeed's engine API lives here (and in
checkpoint.py / distributed.py); the loop in trainer.py only calls
`PreferenceModel` outputs and `engine.backward/step`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import deepspeed
import torch
import torch.nn as nn

from .ops import LogProbs, linear_logprobs

logger = logging.getLogger(__name__)


class PreferenceModel(nn.Module):
    """A causal LM whose forward returns per-token log-probs, never logits.

    The decoder runs as usual; the LM head is applied by the fused
    `linear_logprobs` op on the completion tokens only. Under ZeRO-3 the
    LM-head weight (possibly tied to the embeddings) is registered as an
    external parameter of this module, so DeepSpeed gathers it for the whole
    forward and again for the backward instead of handing the op an empty
    shard.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, softcap: Optional[float] = None):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.softcap = softcap if softcap is not None else getattr(model.config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        if getattr(head.weight, "ds_id", None) is not None:
            deepspeed.zero.register_external_parameter(self, head.weight)
            if getattr(head, "bias", None) is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        with_stats: bool = True,
        with_log_sum_sq_probs: bool = False,
    ) -> LogProbs:
        """Per-token outputs of shape [R, T-1] for the next-token labels.

        input_ids, attention_mask, completion_mask: [R, T]. Position t of the
        result scores token t+1; positions outside the completion are 0.
        """
        if position_ids is None:
            # Correct positions under left padding too (right padding gives 0..T-1 on real tokens).
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, :-1]
        labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
        head = self.model.get_output_embeddings()
        out = linear_logprobs(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels.reshape(-1),
            bias=getattr(head, "bias", None),
            temperature=self.temperature,
            softcap=self.softcap,
            with_entropy=with_stats,
            with_top1=with_stats,
            with_mean_logits=with_stats,
            with_log_sum_sq_probs=with_log_sum_sq_probs,
        )
        shape = labels.shape
        return LogProbs(*(None if t is None else t.view(shape) for t in out))


@dataclass
class Engines:
    """The policy engine, the reference engine (None when not needed) and their configs."""

    policy: Any
    reference: Any
    ds_config: dict
    ref_ds_config: Optional[dict]
    # Kept alive: transformers reads ZeRO-3 settings through a weak reference to it.
    hf_ds_config: Any = None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def load_for_engine(load_fn, ds_config: dict):
    """Call `load_fn()` so that a ZeRO-3 model is created already partitioned.

    `HfDeepSpeedConfig` makes `from_pretrained` run under `deepspeed.zero.Init`,
    so no rank ever holds the whole model. Returns (model, hf_config_handle).
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if zero_stage(ds_config) == 3:
        handle = HfDeepSpeedConfig(copy.deepcopy(ds_config))
        return load_fn(), handle
    unset_hf_deepspeed_config()
    return load_fn(), None


def make_optimizer(params, args, ds_config: dict) -> Optional[torch.optim.Optimizer]:
    """AdamW from DPOConfig unless the JSON brings its own "optimizer" section."""
    if "optimizer" in ds_config:
        return None
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay)
    if _offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, args, ds_config: dict, total_steps: int, warmup_steps: int):
    """transformers' schedule named by `lr_scheduler_type`, unless the JSON brings a "scheduler"."""
    if "scheduler" in ds_config:
        return None
    from transformers import get_scheduler

    return lambda opt: get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup_steps,
                                     num_training_steps=total_steps)


def build_policy_engine(model: nn.Module, args, ds_config: dict, total_steps: int, warmup_steps: int):
    """Wrap the (possibly already partitioned) policy in a training engine."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    module = PreferenceModel(model, temperature=args.temperature, softcap=args.logit_softcap)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, args, ds_config, total_steps, warmup_steps),
        config=ds_config,
    )
    return engine


def build_reference_engine(model: nn.Module, args, ref_ds_config: dict):
    """An inference-only engine: no optimizer, no gradients, dropout off."""
    model.requires_grad_(False)
    model.eval()
    module = PreferenceModel(model, temperature=args.temperature, softcap=args.logit_softcap)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ref_ds_config)
    engine.eval()
    return engine
