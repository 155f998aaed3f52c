"""DeepSpeed engines: the trainable policy and an inference-only reference.

Everything that touches DeepSpeed's engine API lives here (and in
checkpoint.py / distributed.py); the loop in trainer.py only calls
`PreferenceModel` outputs and `engine.backward/step`.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import deepspeed
import torch
import torch.nn as nn

from . import distributed, vision
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

    A vision-language model runs its multimodal backbone (vision tower,
    projector, language model) on the image inputs of the batch
    (`dpo_ds.vision.IMAGE_INPUTS`); the fused op applies its LM head.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, softcap: Optional[float] = None):
        super().__init__()
        self.model = model
        # The architecture's own load-balancing loss, the one its ...ForCausalLM.forward computes.
        self._load_balancing_loss = _load_balancing_loss_func(model)
        self.temperature = temperature
        self.softcap = softcap if softcap is not None else getattr(model.config.get_text_config(),
                                                                   "final_logit_softcapping", None)
        self.multimodal = vision.is_vision_config(model.config)
        head = model.get_output_embeddings()
        if getattr(head.weight, "ds_id", None) is not None:
            deepspeed.zero.register_external_parameter(self, head.weight)
            if getattr(head, "bias", None) is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        completion_mask: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        with_stats: bool = True,
        with_log_sum_sq_probs: bool = False,
        token_index: Optional[torch.Tensor] = None,
        with_aux_loss: bool = False,
        **image_inputs: torch.Tensor,
    ):
        """Per-token outputs of shape [S, T-1] for the next-token labels of S sequences.

        Padded batch: input_ids, attention_mask, completion_mask are all [S, T].
        Packed batch (`dpo_ds.packing`): input_ids and position_ids are [R, N],
        attention_mask is a 4D [R, 1, N, N] bool mask (or None for a varlen
        kernel), and token_index [S, T] gives the flat position in input_ids of
        token t of sequence s, whose completion_mask [S, T] is the padded one.
        Position t of the result scores token t+1 of sequence s; positions
        outside the completion are 0. Only completion positions reach the LM head.
        With `with_aux_loss` (a mixture-of-experts model) the result is `(LogProbs, aux_loss)`: the
        router load-balancing loss the model's own causal-LM forward returns as `aux_loss`.
        """
        if position_ids is None:
            # Correct positions under left padding too (right padding gives 0..T-1 on real tokens).
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if self.model.config._attn_implementation == "eager" and attention_mask is not None \
                and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:  # (flex takes a BlockMask)
            # Eager attention adds the mask to the scores.
            attention_mask = torch.zeros(attention_mask.shape, dtype=self.model.dtype, device=attention_mask.device) \
                .masked_fill(~attention_mask, torch.finfo(self.model.dtype).min)
        if self.multimodal:
            hidden = self._multimodal_hidden(input_ids, attention_mask, position_ids, image_inputs)
        else:
            extra = {"output_router_logits": True} if with_aux_loss else {}
            decoded = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
            )
            hidden = decoded.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if token_index is None:
            token_index = torch.arange(input_ids.numel(), device=input_ids.device).view(input_ids.shape)
        scored = completion_mask[:, 1:] != 0
        labels = input_ids.reshape(-1)[token_index[:, 1:][scored]]
        head = self.model.get_output_embeddings()
        out = linear_logprobs(
            hidden[token_index[:, :-1][scored]],
            head.weight,
            labels,
            bias=getattr(head, "bias", None),
            temperature=self.temperature,
            softcap=self.softcap,
            with_entropy=with_stats,
            with_top1=with_stats,
            with_mean_logits=with_stats,
            with_log_sum_sq_probs=with_log_sum_sq_probs,
        )
        logps = LogProbs(*(None if t is None else torch.zeros(scored.shape, dtype=t.dtype, device=t.device)
                           .masked_scatter(scored, t) for t in out))
        if not with_aux_loss:
            return logps
        # The padding mask of a padded batch; a packed batch has only real tokens.
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return logps, self._load_balancing_loss(decoded.router_logits, self.model.num_experts,
                                                self.model.num_experts_per_tok, mask)

    def _multimodal_hidden(self, input_ids, attention_mask, position_ids, image_inputs: dict) -> torch.Tensor:
        """Last hidden states of a vision-language backbone, given the inputs its forward takes.

        Token-type ids (Gemma 3's `token_type_ids`, Qwen2-VL's `mm_token_type_ids`) mark the image
        tokens. A backbone with its own rotary index (Qwen2-VL's 3-D positions) computes the positions
        from the attention mask and the image grids itself.
        """
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = model.base_model
        accepted = vision.forward_parameters(backbone)
        kwargs = {k: v for k, v in image_inputs.items() if k in accepted}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        image_token = getattr(model.config, "image_token_id", None)
        for name in ("token_type_ids", "mm_token_type_ids"):
            if name in accepted and image_token is not None:
                kwargs[name] = (input_ids == image_token).long()
        if not hasattr(backbone, "get_rope_index"):
            kwargs["position_ids"] = position_ids
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state


@dataclass
class Engines:
    """The policy engine, the reference engine (None when not needed) and their configs."""

    policy: Any
    reference: Any
    ds_config: dict
    ref_ds_config: Optional[dict]
    # The policy's `hf_deepspeed_config`, kept alive: transformers reads it through a weak reference.
    hf_ds_config: Any = None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _load_balancing_loss_func(model: nn.Module):
    """The module-level `load_balancing_loss_func` of the model's (PEFT-unwrapped) modeling file, if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)


def router_aux_loss_coef(args, model: nn.Module) -> float:
    """TRL's weight of a mixture-of-experts model's router load-balancing loss; 0 = not added.

    Unset (None) takes the model config's own `router_aux_loss_coef`; a model is MoE when its config has
    `output_router_logits`. A coefficient for a dense model is refused, as TRL refuses it.
    """
    config = model.config.get_text_config()
    coef = getattr(args, "router_aux_loss_coef", None)
    moe = hasattr(config, "output_router_logits")
    if coef and not moe:
        raise ValueError(f"router_aux_loss_coef={coef}: {type(model).__name__} is not a mixture-of-experts model "
                         "that returns router logits, so there is no auxiliary loss to weight")
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if moe and coef and _load_balancing_loss_func(model) is None:
        raise ValueError(f"router_aux_loss_coef={coef}: {type(model).__name__}'s module has no "
                         "load_balancing_loss_func to compute the auxiliary loss with")
    return float(coef) if moe else 0.0


def _offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def hf_deepspeed_config(ds_config: dict):
    """Make `ds_config` the ZeRO settings transformers sees; returns its `HfDeepSpeedConfig` (None below ZeRO-3).

    transformers holds that object through a weak reference only: keep it alive for as long as the
    settings must apply. While it lives, `from_pretrained` runs under `deepspeed.zero.Init`, so a ZeRO-3
    model is created already partitioned and no rank ever holds it whole.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if zero_stage(ds_config) == 3:
        return HfDeepSpeedConfig(copy.deepcopy(ds_config))
    unset_hf_deepspeed_config()
    return None


# offload_optimizer runs the optimizer step on the CPU: DeepSpeed's own CPU kernels for these `optim` names.
_CPU_OFFLOAD_OPTIMIZERS = {"adamw_torch": "adam", "adamw_torch_fused": "adam", "adagrad": "adagrad",
                           "lion_32bit": "lion"}


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """transformers' two groups: weight decay on every trainable weight except biases and norms."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, module))
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(module: nn.Module, args, ds_config: dict) -> Optional[torch.optim.Optimizer]:
    """The optimizer named by `optim`, built as transformers builds it (`Trainer.get_optimizer_cls_and_kwargs`:
    `optim_args`, `adam_*`, `weight_decay` with transformers' decay groups), unless the JSON brings its own
    "optimizer" section. With `offload_optimizer` the step runs on the CPU: DeepSpeed's CPU Adam/Adagrad/Lion."""
    if "optimizer" in ds_config:
        return None
    groups = _param_groups(module, args.weight_decay)
    if _offloads_optimizer(ds_config):
        kind = _CPU_OFFLOAD_OPTIMIZERS.get(args.optim)
        if kind is None:
            raise ValueError(f"optim={args.optim!r} has no DeepSpeed CPU kernel for offload_optimizer; use one of "
                             f"{sorted(_CPU_OFFLOAD_OPTIMIZERS)}, or give the DeepSpeed JSON an \"optimizer\" section")
        kwargs = dict(lr=args.learning_rate, weight_decay=args.weight_decay)
        if kind == "adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, betas=(args.adam_beta1, args.adam_beta2),
                                    eps=args.adam_epsilon, **kwargs)
        if kind == "adagrad":
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            return DeepSpeedCPUAdagrad(groups, eps=args.adam_epsilon, **kwargs)
        from deepspeed.ops.lion import DeepSpeedCPULion

        return DeepSpeedCPULion(groups, betas=(args.adam_beta1, args.adam_beta2), **kwargs)
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, getattr(module, "model", module))
    return optimizer_cls(groups, **kwargs)


# transformers steps these with an evaluation metric after each evaluation, not at every optimizer step.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


def make_scheduler(args, ds_config: dict, total_steps: int, warmup_steps: int):
    """transformers' schedule named by `lr_scheduler_type` with `lr_scheduler_kwargs` (its `get_scheduler`),
    for DeepSpeed to step, unless the JSON brings a "scheduler" or the schedule follows a metric."""
    if "scheduler" in ds_config or args.lr_scheduler_type in METRIC_SCHEDULERS:
        return None
    from transformers import get_scheduler

    return lambda opt: get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup_steps,
                                     num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def metric_scheduler(engine, args, ds_config: dict):
    """`reduce_lr_on_plateau`/`greedy` on the engine's optimizer (None for any other schedule): the trainer
    steps it with `metric_for_best_model` after each evaluation, as transformers' Trainer does."""
    if "scheduler" in ds_config or args.lr_scheduler_type not in METRIC_SCHEDULERS:
        return None
    from transformers import get_scheduler

    return get_scheduler(args.lr_scheduler_type, engine.basic_optimizer,
                         scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def enable_gradient_checkpointing(model: nn.Module, kwargs: Optional[dict]) -> None:
    """transformers' `gradient_checkpointing_enable` with `gradient_checkpointing_kwargs`; unset, the
    non-reentrant variant (ZeRO-3 needs it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or {"use_reentrant": False})
    model.config.use_cache = False


def build_policy_engine(model: nn.Module, args, ds_config: dict, total_steps: int, warmup_steps: int):
    """Wrap the (possibly already partitioned) policy in a training engine."""
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs)
    module = PreferenceModel(model, temperature=args.temperature, softcap=args.logit_softcap)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=make_optimizer(module, args, ds_config),
        lr_scheduler=make_scheduler(args, ds_config, total_steps, warmup_steps),
        config=ds_config,
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Nothing to reduce over one rank, yet stage 0 would flatten every gradient into buckets,
        # "all-reduce" them over a group of one and copy them back (13 % of a CPU step).
        engine.enable_backward_allreduce = False
    return engine


def build_reference_engine(model: nn.Module, args, ref_ds_config: dict):
    """An inference-only engine: no optimizer, no gradients, dropout off."""
    model.requires_grad_(False)
    model.eval()
    module = PreferenceModel(model, temperature=args.temperature, softcap=args.logit_softcap)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ref_ds_config)
    engine.eval()
    return engine


def _gathered(params: list[nn.Parameter], modifier_rank: Optional[int] = None):
    """Full parameters for the duration of the block (one collective; a no-op without ZeRO-3)."""
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def is_partitioned(param: nn.Parameter) -> bool:
    return getattr(param, "ds_id", None) is not None


def release_gathered(engine) -> None:
    """Finish ZeRO-3 prefetches and re-partition every gathered parameter of an engine (a no-op for
    anything else), so that its parameters can then be gathered one at a time."""
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


def weights_digest(named_params: Iterable[tuple[str, nn.Parameter]]) -> str:
    """SHA-256 of the real weights (name, dtype, shape and bytes of each), identical on every rank.

    Under ZeRO-3 a parameter's local `.data` is an empty placeholder, so each
    one is gathered, hashed and released in turn: one parameter in full at a
    time, never the whole model. Collective: every rank must call it with the
    same names.
    """
    digest = hashlib.sha256()
    for name, param in sorted(named_params, key=lambda item: item[0]):
        with _gathered([param]):
            data = param.data.detach().to("cpu").contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def mix_weights(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """TR-DPO (arXiv 2404.09656): target <- alpha * source + (1 - alpha) * target, parameter by parameter.

    The two modules must have the same parameter names. Under ZeRO-3 each pair
    is gathered in turn (the target with rank 0 as the writer, whose result is
    scattered back into the partitions), so at most one parameter of each model
    is ever whole.
    """
    sources = dict(source.named_parameters())
    for name, param in target.named_parameters():
        if name not in sources:
            raise KeyError(f"mix_weights: the source model has no parameter {name!r}")
        with _gathered([sources[name]]), _gathered([param], modifier_rank=0), torch.no_grad():
            if distributed.rank() == 0 or not is_partitioned(param):
                update = sources[name].data.to(param.device, param.dtype)
                param.data.mul_(1.0 - alpha).add_(update, alpha=alpha)


def export_peft(engine, model, tokenizer, out_dir: str | Path) -> Path:
    """A LoRA policy as its adapter in PEFT's format (`out_dir/adapter`) and merged into a plain model (`out_dir`).

    Collective: every rank gathers. The merge happens on rank 0, on a CPU copy
    built from the model's config and the gathered weights, with PEFT's own
    `merge_and_unload`.
    """
    from peft import get_peft_model

    from .checkpoint import _meta_model, check_shapes, consolidated_state_dict
    from .models import REFERENCE_ADAPTER, TRAINABLE_ADAPTER

    state = consolidated_state_dict(engine)
    out = Path(out_dir)
    if state is not None:
        state = {k: v for k, v in state.items() if f".{REFERENCE_ADAPTER}." not in k}
        adapter_config = model.peft_config[TRAINABLE_ADAPTER]
        model.save_pretrained(out / "adapter", state_dict=state, selected_adapters=[TRAINABLE_ADAPTER],
                              safe_serialization=True)
        base_config = model.get_base_model().config
        skeleton = _meta_model(base_config).to_empty(device="cpu")
        skeleton.tie_weights()
        copy_ = get_peft_model(skeleton, copy.deepcopy(adapter_config), adapter_name=TRAINABLE_ADAPTER,
                               autocast_adapter_dtype=False)
        missing, unexpected = copy_.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _tied_head(k, base_config)]
        if missing or unexpected:
            raise RuntimeError(f"refusing to export: the merged copy lacks {missing[:5]} and has no place for "
                               f"{unexpected[:5]}")
        merged = copy_.merge_and_unload()
        merged_state = merged.state_dict()
        check_shapes(merged_state, base_config)
        merged.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
            tokenizer.save_pretrained(out / "adapter")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def _tied_head(key: str, config) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(config, "tie_word_embeddings", False))
