"""Model and tokenizer loading: hub ids, local directories, GGUF files, and the built-in model
(converted once by `dpo_ds.builtin.model`).

DeepSpeed is deliberately absent here: `engines.py` wraps `load_model` in `HfDeepSpeedConfig`
/ `zero.Init`, and because every load goes through `from_pretrained`, ZeRO-3 partitions the
weights while they are read. (A `.gguf` file is the exception: transformers treats it as a
quantized checkpoint and loads it whole; DeepSpeed partitions it afterwards.)
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .builtin.model import builtin_model_dir
from .packing import attention_implementation
from . import vision

BUILTIN = "builtin"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# attn_implementation -> the module it needs, so a missing kernel fails before any weights load.
_ATTN_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """The weights are already dequantized; the leftover GGUF quantizer only blocks `save_pretrained`."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_model_path(name_or_path: str) -> str:
    """"builtin" -> the converted SmolLM2 directory; a local directory or `.gguf` file -> itself;
    anything else is taken for a hub id and passed through unchanged."""
    if name_or_path == BUILTIN:
        return builtin_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model path '{name_or_path}' is a file but not a .gguf; pass a model directory")
        return str(path)
    if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix == ".gguf":
        raise FileNotFoundError(f"model path '{name_or_path}' does not exist")
    return name_or_path


def _from_pretrained_source(path: str) -> tuple[str, dict[str, Any]]:
    """(directory or hub id, extra kwargs): a `.gguf` file loads through `gguf_file=`."""
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_tokenizer(name_or_path: str, args: Any = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and apply `args.chat_template_path`, `args.eos_token` and a pad fallback.

    Setting EOS to the template's end-of-turn token (e.g. "<|im_end|>" for ChatML) makes the
    EOS appended to completions match what the model emits at the end of a reply.
    """
    source, extra = _from_pretrained_source(resolve_model_path(name_or_path))
    if not (Path(source) / "tokenizer_config.json").is_file():
        source = adapter_base_path(source) or source
    revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
    if revision is not None:
        extra["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=bool(getattr(args, "trust_remote_code", False)), **extra
    )
    template_path = getattr(args, "chat_template_path", None)
    if template_path:
        tokenizer.chat_template = _read_chat_template(template_path)
    eos = getattr(args, "eos_token", None)
    if eos:
        if eos not in tokenizer.get_vocab():
            raise ValueError(
                f"eos_token '{eos}' is not in the vocabulary of the tokenizer of '{name_or_path}'"
            )
        tokenizer.eos_token = eos
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer of '{name_or_path}' has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def _read_chat_template(template_path: str) -> str:
    """A Jinja file's text, or the chat template of the tokenizer in a model directory or hub repo (as TRL)."""
    path = Path(template_path).expanduser()
    if path.is_file():
        return path.read_text()
    try:
        template = AutoTokenizer.from_pretrained(resolve_model_path(template_path)).chat_template
    except OSError as exc:
        raise FileNotFoundError(f"chat_template_path '{template_path}' is neither a file, a tokenizer directory "
                                f"nor a loadable hub id: {exc}") from exc
    if not template:
        raise ValueError(f"chat_template_path '{template_path}': its tokenizer has no chat template")
    return template


def _import_model_classes(config: PretrainedConfig) -> None:
    """Import the model classes of `config` and its sub-configs (a VLM's text and vision models) before
    `from_pretrained`, so not inside ZeRO-3's `zero.Init`: on exit that resets the `__init__` of every
    module class created within it to the class's own, undoing the wrapper that the `kernels` package
    (when installed) puts on decorated layers; their forward then fails ("no attribute '_kernel_funcs'")."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    configs = [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))]
    for sub in configs:
        if sub is not None and type(sub) in MODEL_MAPPING:
            MODEL_MAPPING[type(sub)]  # the lookup imports the class's module


def load_model(name_or_path: str | PreTrainedModel, args: Any = None, *, dtype: Any = None) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with `args.model_init_kwargs`, TRL-style
    (`AutoModelForImageTextToText` for a vision-language model).

    dtype: this argument, else `model_init_kwargs["dtype"]` (or "torch_dtype"), else float32
    (as TRL). Attention: `packing.attention_implementation` (`model_init_kwargs["attn_implementation"]`,
    else `args.attn_implementation`, else "sdpa"; packed batches on a GPU take flash-attn's varlen kernel
    or flex attention). An already-built model is returned as is (only `disable_dropout` applies to it).
    """
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path
    else:
        kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs["dtype"] = _torch_dtype(dtype if dtype is not None else kwargs.get("dtype", "float32"))
        attn = attention_implementation(args, _on_gpu())
        _check_attention_available(attn)
        kwargs["attn_implementation"] = attn
        kwargs.setdefault("trust_remote_code", bool(getattr(args, "trust_remote_code", False)))
        if getattr(args, "load_in_4bit", False):
            kwargs["quantization_config"] = _nf4_config(kwargs["dtype"])
        source, extra = _from_pretrained_source(resolve_model_path(name_or_path))
        auto = AutoModelForCausalLM
        if not extra:
            config = AutoConfig.from_pretrained(
                source, **{k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs})
            auto = vision.auto_model_class(config)
            _import_model_classes(config)
        model = auto.from_pretrained(source, **extra, **kwargs)
        if extra:
            _drop_gguf_quantizer(model)
    if getattr(args, "disable_dropout", False):
        disable_dropout(model)
    return model


def _nf4_config(dtype: Any) -> Any:
    """QLoRA's 4-bit NF4 weights, stored in `dtype` tensors so that ZeRO-3 partitions one dtype."""
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                           "this machine; train LoRA in full precision (use_peft without load_in_4bit) instead")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit (QLoRA) needs the 'bitsandbytes' package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)


def _torch_dtype(dtype: Any) -> Any:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"model_init_kwargs dtype '{dtype}': expected 'auto', {', '.join(map(repr, _DTYPES))} or a torch.dtype")


def _on_gpu() -> bool:
    """Whether the models will run on a CUDA GPU (DeepSpeed's accelerator unless DS_ACCELERATOR says otherwise)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def _check_attention_available(attn: str) -> None:
    module = _ATTN_MODULES.get(attn)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ImportError(
            f"attn_implementation '{attn}' needs the '{module}' package, which is not installed; "
            f"install it or use attn_implementation 'sdpa'"
        )


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: `nn.Dropout` modules, float `*dropout` attributes that attention
    modules copy from the config at init (e.g. Llama's `attention_dropout`), and the config's
    `*dropout` / `*pdrop` values, so a model rebuilt from the config stays dropout-free."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        for name, value in vars(config).items():
            if ("dropout" in name or name.endswith("pdrop")) and _is_number(value):
                setattr(config, name, 0.0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_flops_per_token(model: PretrainedConfig | nn.Module, seq_len: int = 0, *,
                          reference: PretrainedConfig | nn.Module | None = None, recompute: bool = False) -> int:
    """Training FLOPs per token of one DPO step, for MFU, counted as in PaLM (appendix B) / nanochat.

    A forward costs 2 * N + 4 * n_layers * n_heads * head_dim * seq_len per token: N counts the
    weights of every matmul of the decoder and the LM head (each `nn.Linear`, the head included
    even when tied to the embedding, which is a lookup and is not counted); the second term is the
    QK^T and AV matmuls of full (non-causal) attention over `seq_len` tokens (0 leaves it out).
    The policy's backward costs two forwards (6 * N in all), `recompute` (gradient checkpointing)
    one more, and a `reference` that runs a forward per batch one forward of its own model. Full
    fine-tuning is assumed: with frozen weights (LoRA) the backward does less than this counts.
    `model` (and `reference`) is a model (ZeRO-3 partitioned or not) or a config, built on the
    meta device. Dense models only: a MoE would be counted with all experts.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    total = (4 if recompute else 3) * _forward_flops_per_token(model, seq_len)
    if reference is not None:
        total += _forward_flops_per_token(reference, seq_len)
    return total


def _forward_flops_per_token(model: PretrainedConfig | nn.Module, seq_len: int) -> int:
    if isinstance(model, PretrainedConfig):
        with torch.device("meta"):
            model = vision.auto_model_class(model).from_config(model)
    # The text decoder and its head: a vision tower (VLMs) does not run per text token.
    linears = {m for m in model.get_decoder().modules() if isinstance(m, nn.Linear)}
    linears.add(model.get_output_embeddings())
    # ZeRO-3 leaves an empty local tensor; ds_numel is the full parameter's size.
    matmul_params = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in linears)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * matmul_params + 4 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq_len


# ----------------------------------------------------------------------------- PEFT

TRAINABLE_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
"""The frozen copy of the adapter a run continues from: that run's reference."""


def adapter_base_path(path: str) -> str | None:
    """The base model named by a PEFT adapter directory (`adapter_config.json`), None for anything else."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: cannot tell which model the adapter is for")
    return base


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_config(args: Any) -> Any:
    """LoraConfig from `use_peft`'s flags (lora_r, lora_alpha, lora_dropout, lora_target_modules, peft_config)."""
    from peft import LoraConfig

    targets = args.lora_target_modules
    if isinstance(targets, (list, tuple)) and [str(t).lower() for t in targets] == ["all-linear"]:
        targets = "all-linear"  # PEFT expands the shorthand only as a string, not inside a list
    kwargs = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  target_modules=targets, task_type="CAUSAL_LM")
    kwargs.update(getattr(args, "peft_config", None) or {})
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"peft_config / lora_* flags do not make a LoraConfig: {exc}") from exc


def load_policy_model(source: str | nn.Module, args: Any, peft_config: Any = None) -> nn.Module:
    """The policy: `load_model`, wrapped in LoRA adapters when `args.use_peft` (or `peft_config` is given).

    A PEFT adapter directory (or an in-memory `PeftModel`) continues that adapter: it stays trainable, and a
    frozen copy of it, named `REFERENCE_ADAPTER`, serves as the reference. Adapters take the base
    weights' dtype, so that ZeRO-3 partitions one dtype (PEFT would otherwise upcast them to fp32).
    """
    from peft import PeftModel, get_peft_model

    continuing = isinstance(source, PeftModel) or (
        isinstance(source, str) and adapter_base_path(resolve_model_path(source)) is not None)
    if continuing and peft_config is not None:
        raise ValueError("the model already has LoRA adapters, which training continues; a peft_config would be "
                         "ignored: pass one or the other")
    if isinstance(source, str) and continuing:
        adapter_dir = resolve_model_path(source)
        base = load_model(adapter_base_path(adapter_dir), args)
        model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=TRAINABLE_ADAPTER, is_trainable=True,
                                          autocast_adapter_dtype=False)
    elif isinstance(source, PeftModel):
        model = source
    else:
        model = load_model(source, args)
        freeze = getattr(args, "freeze_vision_tower", True) and vision.freeze_vision_tower(model)
        if not (getattr(args, "use_peft", False) or peft_config is not None):
            return model
        config = peft_config or lora_config(args)
        if freeze and config.exclude_modules is None:
            config = copy.copy(config)
            config.exclude_modules = vision.tower_pattern(freeze)
        model = get_peft_model(model, config, adapter_name=TRAINABLE_ADAPTER, autocast_adapter_dtype=False)
        _check_head_untouched(model)
        _cast_adapters(model)
        return model
    if TRAINABLE_ADAPTER not in model.peft_config:
        raise ValueError(f"the PEFT model's adapters are {list(model.peft_config)}; dpo_ds continues the one named "
                         f"{TRAINABLE_ADAPTER!r}")
    _check_head_untouched(model)
    _add_reference_adapter(model)
    _cast_adapters(model)
    return model


def _add_reference_adapter(model: Any) -> None:
    """A frozen copy of the trainable adapter, under REFERENCE_ADAPTER."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[TRAINABLE_ADAPTER])
    state = get_peft_model_state_dict(model, adapter_name=TRAINABLE_ADAPTER)
    set_peft_model_state_dict(model, state, adapter_name=REFERENCE_ADAPTER)
    model.set_adapter(TRAINABLE_ADAPTER)
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)


def _check_head_untouched(model: Any) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError("lora_target_modules includes the LM head, which dpo_ds applies through its fused "
                         "log-prob op without the adapter; leave the head out (e.g. all-linear excludes it)")


def _cast_adapters(model: Any) -> None:
    base = next(p for n, p in model.named_parameters() if "lora_" not in n)
    dtype = base.dtype if base.dtype.is_floating_point else torch.float32
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)


def reference_args(args: Any) -> Any:
    """The config the reference model is loaded with: TRL's `ref_model_init_kwargs` replace
    `model_init_kwargs` (None = the policy's own)."""
    ref_kwargs = getattr(args, "ref_model_init_kwargs", None)
    if ref_kwargs is None:
        return args
    import copy

    ref_args = copy.copy(args)
    ref_args.model_init_kwargs = dict(ref_kwargs)
    return ref_args
