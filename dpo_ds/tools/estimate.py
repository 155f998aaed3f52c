"""`dpo-ds estimate`: per-GPU and per-node memory of a DPO run, from the model's config alone.

No weights are read: the model is built on the meta device to count its parameters, so a 70B
model is estimated on a laptop. Every figure is documented arithmetic, in bytes:

- Policy model states follow DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs_all_cold`, `estimate_zero3_model_states_mem_needs_all_cold`)
  and agree with them wherever they cover the setup; per parameter: the training-dtype weight
  (w = 2 bytes under bf16/fp16, 4 in fp32), its gradient (ZeRO <= 2), and 16 bytes of optimizer
  state (fp32 master weight 4 + fp32 gradient 4 + Adam moments 8), partitioned per the stage and
  placed per `offload_param` / `offload_optimizer`. Host figures carry DeepSpeed's 1.5 buffer factor.
- The reference is inference-only: weights only, under its own `ref_zero_stage` / `ref_offload`.
- Activations count the tensors a Llama-style decoder layer keeps for backward, per token.
- The log-prob head: naive fp32 logits versus the project's fused chunked op (`dpo_ds.ops`).
A pair is two sequences (chosen and rejected), each padded to `max_length`.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..config import ConfigError, DPOConfig
from ..ds_config import load_deepspeed_config, reference_setup
from ..parser import parse_known

GIB = 2**30
BUFFER_FACTOR = 1.5
"""DeepSpeed's `additional_buffer_factor` on host memory."""
OPTIMIZER_BYTES = 16
"""Per trained parameter: fp32 master weight (4) + fp32 gradient (4) + Adam's two moments (8)."""
LOAD_BYTES = 4
"""Per parameter while a rank loads the model: from_pretrained materializes fp32 weights."""
LSE_BYTES = 4
"""Per head and token: the fp32 log-sum-exp that fused (sdpa/flash) attention keeps for backward."""
HEAD_STATE_BYTES = 7 * 4
"""Per token: the fused log-prob op's fp32 running state (dpo_ds.ops.fused.STATS rows)."""
HEAD_CHUNK_BYTES = 64 * 2**20
"""The fused op's budget for one chunk of fp32 logits (dpo_ds.ops.chunked.CHUNK_BYTES)."""
OFFLOAD_DEVICES = ("none", "cpu", "nvme")

USAGE = """usage: dpo-ds estimate --model MODEL --deepspeed CONFIG [--nodes N] [--gpus-per-node G]
                       [--max_length L] [--per_device_train_batch_size B] [--gpu-memory 80GB] [--json]
                       [--config run.yaml] [--any_training_flag VALUE ...]

Per-GPU and per-node host memory of a DPO run: policy model states under the DeepSpeed config's
ZeRO stage and offload, the reference model (ref_zero_stage, ref_offload), activations with and
without gradient checkpointing, and the log-prob head (naive fp32 logits vs the fused op). Only the
model's config is read, never its weights. Sizes are in GiB (2**30 bytes).

  --model MODEL         alias of --model_name_or_path
  --nodes N             number of nodes (default 1)
  --gpus-per-node G     GPUs per node (default 1)
  --gpu-memory SIZE     GPU memory to fit (e.g. 80GB, 24GiB, 16000MB; GB = GiB = 2**30 bytes): adds the
                        largest per_device_train_batch_size that fits, with and without checkpointing
  --json                print one JSON object (bytes) instead of text"""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, read from a model config."""

    params: int
    """Parameters, tied ones counted once."""
    largest_layer_params: int
    """Largest count of parameters owned directly by one module (DeepSpeed's `model_to_params`)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def shape_from_config(config: Any) -> ModelShape:
    """Count parameters on the meta device (no memory, no weights) and read the layer sizes."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(text, k, None) is None]
    if missing:
        raise ConfigError(f"model config of type {type(config).__name__} has no {', '.join(missing)}: "
                          "cannot estimate its activations", "model_name_or_path")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        largest_layer_params=largest,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
    )


def model_shape(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a hub id, local directory, .gguf file or "builtin", from its config only."""
    from transformers import AutoConfig

    from ..models import _from_pretrained_source, resolve_model_path

    try:
        source, extra = _from_pretrained_source(resolve_model_path(name_or_path))
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config of {name_or_path!r}: {exc}", "model_name_or_path") from exc
    return shape_from_config(config)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, per node in host RAM, and per node on NVMe."""

    gpu: int = 0
    cpu: int = 0
    nvme: int = 0

    def __add__(self, other: "Memory") -> "Memory":
        return Memory(self.gpu + other.gpu, self.cpu + other.cpu, self.nvme + other.nvme)


@dataclass(frozen=True)
class ZeroSetup:
    """What the memory of model states depends on in a DeepSpeed config."""

    stage: int
    offload_param: str = "none"
    offload_optimizer: str = "none"
    weight_bytes: int = 2
    """2 under bf16/fp16 mixed precision, 4 in fp32."""
    zero_init: bool = True
    """ZeRO-3 models are created partitioned (HfDeepSpeedConfig), as the trainer does."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_optimization.stage = {self.stage!r}: expected 0, 1, 2 or 3", "deepspeed")
        for name in ("offload_param", "offload_optimizer"):
            device = getattr(self, name)
            if device not in OFFLOAD_DEVICES:
                raise ConfigError(f"zero_optimization.{name}.device = {device!r}: expected one of "
                                  f"{', '.join(OFFLOAD_DEVICES)}", "deepspeed")
        if self.stage < 3 and self.offload_param != "none":
            raise ConfigError(f"zero_optimization.offload_param needs ZeRO stage 3 (stage is {self.stage})",
                              "deepspeed")
        if self.stage < 3 and self.offload_optimizer == "nvme":
            raise ConfigError("zero_optimization.offload_optimizer to nvme needs ZeRO stage 3", "deepspeed")
        if self.stage == 0 and self.offload_optimizer != "none":
            raise ConfigError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3", "deepspeed")

    @classmethod
    def from_deepspeed(cls, ds_config: dict) -> "ZeroSetup":
        """Read stage, offload devices and precision from a filled DeepSpeed config."""
        zero = ds_config.get("zero_optimization") or {}

        def device(key: str) -> str:
            return str((zero.get(key) or {}).get("device") or "none")

        half = any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "bfloat16", "fp16"))
        return cls(int(zero.get("stage", 0)), device("offload_param"), device("offload_optimizer"), 2 if half else 4)


def policy_model_states(params: int, largest_layer_params: int, zero: ZeroSetup, nodes: int = 1,
                        gpus_per_node: int = 1, buffer_factor: float = BUFFER_FACTOR) -> Memory:
    """Weights, gradients and optimizer states of the trained model (DeepSpeed's arithmetic).

    ZeRO-3: the largest layer gathered (weight + gradient), plus the partitions not offloaded;
    host RAM holds the offloaded partitions, or, with nothing offloaded, the loading buffer.
    ZeRO <= 2: weights replicated; gradients partitioned from stage 2, optimizer states from
    stage 1; with offload_optimizer the host holds them (DeepSpeed's ZeRO-2 figure
    `max(4 * total_gpus, 16)` bytes per parameter, not divided across nodes).
    """
    gpus, w = nodes * gpus_per_node, zero.weight_bytes
    if zero.stage == 3:
        offloaded = {"cpu": 0, "nvme": 0}
        if zero.offload_param != "none":
            offloaded[zero.offload_param] += w
        if zero.offload_optimizer != "none":
            offloaded[zero.offload_optimizer] += OPTIMIZER_BYTES
        resident = w + OPTIMIZER_BYTES - sum(offloaded.values())
        gpu = 2 * w * largest_layer_params + int(resident * params / gpus)
        host_offload = offloaded["cpu"] * params / nodes
        loading = LOAD_BYTES * (largest_layer_params if zero.zero_init else params) * gpus_per_node
        # DeepSpeed: with zero.Init the offloaded partitions replace the loading buffer, else the larger wins.
        host = host_offload if zero.zero_init and host_offload else max(loading, host_offload)
        return Memory(gpu, int(host * buffer_factor), int(offloaded["nvme"] * params / nodes))
    if zero.offload_optimizer != "none":
        host = params * max(LOAD_BYTES * gpus, OPTIMIZER_BYTES) * buffer_factor
        return Memory(w * params, int(host))
    grads = w * params if zero.stage < 2 else 0
    partitioned = (w if zero.stage == 2 else 0) + (OPTIMIZER_BYTES if zero.stage >= 1 else 0)
    replicated = w * params + grads + (OPTIMIZER_BYTES * params if zero.stage == 0 else 0)
    return Memory(replicated + int(partitioned * params / gpus),
                  int(LOAD_BYTES * params * gpus_per_node * buffer_factor))


def reference_model_states(params: int, largest_layer_params: int, stage: int, offload: str, weight_bytes: int,
                           nodes: int = 1, gpus_per_node: int = 1, buffer_factor: float = BUFFER_FACTOR) -> Memory:
    """Weights only (no gradients, no optimizer). ZeRO-3: the largest layer gathered plus the
    weight partitions unless offloaded; below ZeRO-3 every GPU holds all weights."""
    gpus, w = nodes * gpus_per_node, weight_bytes
    if stage < 3:
        return Memory(w * params, int(LOAD_BYTES * params * gpus_per_node * buffer_factor))
    gpu = w * largest_layer_params + (0 if offload != "none" else int(w * params / gpus))
    if offload == "cpu":
        return Memory(gpu, int(w * params / nodes * buffer_factor))
    loading = int(LOAD_BYTES * largest_layer_params * gpus_per_node * buffer_factor)
    return Memory(gpu, loading, int(w * params / nodes) if offload == "nvme" else 0)


def norm_activation_bytes(hidden: int, weight_bytes: int) -> int:
    """Bytes an RMSNorm keeps per token: its input upcast to fp32 (4h), the normalized input and
    the output in the training dtype (2wh; in fp32 these are separate tensors too), fp32 1/rms (4)."""
    return 4 * hidden + 2 * weight_bytes * hidden + 4


def layer_activation_bytes(shape: ModelShape, seq_len: int, weight_bytes: int, attn_implementation: str) -> int:
    """Bytes one decoder layer keeps for backward, per token (Llama-style layer, no dropout).

    Two RMSNorms; the gated MLP's gate, act(gate), up and product (4 * intermediate). Attention,
    with q = heads * head_dim and kv = kv_heads * head_dim: fused kernels (sdpa, flash) keep
    rotated q, k, v and the output, which is also o_proj's input (2q + 2kv), and an fp32
    log-sum-exp per head; eager attention keeps q, k and v repeated to all heads, the o_proj
    input (4q) and the fp32 softmax (`heads * seq_len` floats), plus its training-dtype copy
    under bf16/fp16.
    """
    w, q, kv = weight_bytes, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if attn_implementation == "eager":
        probs = 4 + (w if w < 4 else 0)
        attention = 4 * q * w + shape.heads * seq_len * probs
    else:
        attention = (2 * q + 2 * kv) * w + shape.heads * LSE_BYTES
    return 2 * norm_activation_bytes(shape.hidden, w) + attention + 4 * shape.intermediate * w


def activation_bytes(shape: ModelShape, pairs: int, seq_len: int, weight_bytes: int, checkpointing: bool,
                     attn_implementation: str = "sdpa") -> int:
    """Activations of one micro-batch of `pairs` pairs (2 * pairs sequences of seq_len tokens).

    Without checkpointing every layer's tensors plus the final norm's (its output is the head's
    input); with one checkpoint per decoder layer each layer keeps only its input (h), and one
    layer's tensors are live again while it is recomputed.
    """
    tokens = 2 * pairs * seq_len
    layer = layer_activation_bytes(shape, seq_len, weight_bytes, attn_implementation)
    final_norm = norm_activation_bytes(shape.hidden, weight_bytes)
    if checkpointing:
        return tokens * (shape.layers * shape.hidden * weight_bytes + final_norm + layer)
    return tokens * (shape.layers * layer + final_norm)


def logprob_head_bytes(shape: ModelShape, pairs: int, seq_len: int, fused: bool) -> int:
    """Peak memory of turning last hidden states into per-token log-probs.

    Naive: the [tokens, vocab] logits in fp32 and the fp32 log-softmax autograd keeps for
    backward. Fused (dpo_ds.ops): a 7-float state per token, one chunk of fp32 logits, and the
    fp32 accumulator of the LM-head weight gradient ([vocab, hidden]).
    """
    tokens = 2 * pairs * seq_len
    if not fused:
        return 2 * 4 * tokens * shape.vocab
    return tokens * HEAD_STATE_BYTES + HEAD_CHUNK_BYTES + 4 * shape.vocab * shape.hidden


def reference_forward_bytes(shape: ModelShape, pairs: int, seq_len: int, weight_bytes: int,
                            attn_implementation: str = "sdpa") -> int:
    """The reference's no-grad forward, which runs while the policy's activations are alive: one
    layer's tensors at a time, and the fused head's forward (its state and one logits chunk)."""
    tokens = 2 * pairs * seq_len
    layer = layer_activation_bytes(shape, seq_len, weight_bytes, attn_implementation)
    return tokens * (layer + HEAD_STATE_BYTES) + HEAD_CHUNK_BYTES


def parse_size(text: str) -> int:
    """'80GB', '24GiB', '16000MB', '1.5T' or a byte count -> bytes (K/M/G/T powers of 1024, as DeepSpeed)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 24GiB or 16000MB", "gpu_memory")
    unit = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * unit)


def _uses_reference_engine(args: DPOConfig) -> bool:
    from ..losses import needs_reference

    return needs_reference(args) and not args.precompute_ref_log_probs


def estimate(args: DPOConfig, shape: ModelShape, nodes: int = 1, gpus_per_node: int = 1,
             gpu_memory: Optional[int] = None) -> dict[str, Any]:
    """Every figure of `dpo-ds estimate` (bytes), for the run `args` on nodes x gpus_per_node GPUs."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if args.use_peft:
        raise ConfigError("dpo-ds estimate does not model LoRA training (use_peft=true): it counts full "
                          "fine-tuning only", "use_peft")
    if args.max_length is None:
        raise ConfigError("dpo-ds estimate needs max_length (the padded sequence length); set --max_length",
                          "max_length")
    steps = args.max_steps if args.max_steps > 0 else 1
    ds = load_deepspeed_config(args, nodes * gpus_per_node, hidden_size=shape.hidden, num_training_steps=steps)
    zero = ZeroSetup.from_deepspeed(ds)
    w, pairs, seq = zero.weight_bytes, args.per_device_train_batch_size, args.max_length
    policy = policy_model_states(shape.params, shape.largest_layer_params, zero, nodes, gpus_per_node)
    reference, ref_setup = Memory(), None
    if _uses_reference_engine(args):
        ref_stage, ref_offload = reference_setup(args, ds)
        ref_setup = {"stage": ref_stage, "offload": ref_offload}
        reference = reference_model_states(shape.params, shape.largest_layer_params, ref_stage,
                                           ref_setup["offload"], w, nodes, gpus_per_node)

    def ref_forward(batch: int) -> int:
        return 0 if ref_setup is None else reference_forward_bytes(shape, batch, seq, w, args.attn_implementation)

    def per_gpu(batch: int, checkpointing: bool) -> int:
        return (policy.gpu + reference.gpu + ref_forward(batch) + logprob_head_bytes(shape, batch, seq, fused=True)
                + activation_bytes(shape, batch, seq, w, checkpointing, args.attn_implementation))

    result: dict[str, Any] = {
        "model": args.model_name_or_path,
        "deepspeed": args.deepspeed,
        "shape": asdict(shape),
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "zero": asdict(zero),
        "reference": ref_setup,
        "per_device_train_batch_size": pairs,
        "max_length": seq,
        "gradient_checkpointing": args.gradient_checkpointing,
        "policy_model_states": asdict(policy),
        "reference_model_states": asdict(reference),
        "reference_forward": ref_forward(pairs),
        "activations": {"checkpointing": activation_bytes(shape, pairs, seq, w, True, args.attn_implementation),
                        "no_checkpointing": activation_bytes(shape, pairs, seq, w, False, args.attn_implementation)},
        "logprob_head": {"fused": logprob_head_bytes(shape, pairs, seq, fused=True),
                         "naive": logprob_head_bytes(shape, pairs, seq, fused=False)},
        "total": {"gpu": per_gpu(pairs, args.gradient_checkpointing), "cpu": policy.cpu + reference.cpu,
                  "nvme": policy.nvme + reference.nvme},
    }
    if gpu_memory is not None:
        result["gpu_memory"] = gpu_memory
        result["max_micro_batch"] = {
            name: _largest_fitting(lambda b, c=ckpt: per_gpu(b, c), gpu_memory)
            for name, ckpt in (("checkpointing", True), ("no_checkpointing", False))}
    return result


def _largest_fitting(cost, budget: int) -> int:
    """Largest b >= 0 with cost(b) <= budget, for a cost linear in b (0 when even b = 1 does not fit)."""
    fixed, per_pair = cost(0), cost(1) - cost(0)
    return max(0, (budget - fixed) // per_pair)


def format_text(result: dict[str, Any]) -> str:
    """The human-readable report of `estimate`."""
    def gib(n: int) -> str:
        return f"{n / GIB:10.2f}"

    s, z = result["shape"], result["zero"]
    precision = "bf16/fp16" if z["weight_bytes"] == 2 else "fp32"
    offload = f"offload_param={z['offload_param']}, offload_optimizer={z['offload_optimizer']}"
    ref = result["reference"]
    pol, refm = result["policy_model_states"], result["reference_model_states"]
    lines = [
        f"model {result['model']}: {s['params'] / 1e6:,.1f}M parameters, largest layer "
        f"{s['largest_layer_params'] / 1e6:,.1f}M, {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}",
        f"{result['nodes']} node(s) x {result['gpus_per_node']} GPU(s); policy ZeRO-{z['stage']} ({offload}), "
        f"{precision}; micro-batch {result['per_device_train_batch_size']} pairs "
        f"(x2 sequences) x {result['max_length']} tokens",
        f"{'GiB':<44}{'per GPU':>10}{'per node CPU':>14}",
        f"{'policy model states':<44}{gib(pol['gpu'])}{gib(pol['cpu']):>14}",
    ]
    if ref is None:
        lines.append("reference model: none (reference-free loss or precomputed log-probs)")
    else:
        lines.append(f"{'reference model (ZeRO-%d, offload %s)' % (ref['stage'], ref['offload']):<44}"
                     f"{gib(refm['gpu'])}{gib(refm['cpu']):>14}")
        lines.append(f"{'reference forward (transient)':<44}{gib(result['reference_forward'])}")
    act, head = result["activations"], result["logprob_head"]
    lines += [
        f"{'activations, no gradient checkpointing':<44}{gib(act['no_checkpointing'])}",
        f"{'activations, gradient checkpointing':<44}{gib(act['checkpointing'])}",
        f"{'log-prob head, fused op (used)':<44}{gib(head['fused'])}",
        f"{'log-prob head, naive fp32 logits':<44}{gib(head['naive'])}",
        f"{'total (gradient_checkpointing=%s)' % str(result['gradient_checkpointing']).lower():<44}"
        f"{gib(result['total']['gpu'])}{gib(result['total']['cpu']):>14}",
    ]
    if result["total"]["nvme"]:
        lines.append(f"NVMe per node: {result['total']['nvme'] / GIB:.2f} GiB")
    if "max_micro_batch" in result:
        fit = result["max_micro_batch"]
        lines.append(f"largest per_device_train_batch_size in {result['gpu_memory'] / GIB:.2f} GiB: "
                     f"{fit['no_checkpointing']} without gradient checkpointing, {fit['checkpointing']} with it")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1, got {text!r}")
    return value


def _own_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split off --nodes, --gpus-per-node, --gpu-memory, --json and rename --model; the rest are config flags."""
    parser = argparse.ArgumentParser(prog="dpo-ds estimate", add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--nodes", type=_positive_int, default=1)
    parser.add_argument("--gpus-per-node", "--gpus_per_node", dest="gpus_per_node", type=_positive_int, default=1)
    parser.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", type=parse_size)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model")
    try:
        opts, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(str(err), (err.argument_name or "").lstrip("-").replace("-", "_")) from None
    if opts.model is not None:
        rest.append(f"--model_name_or_path={opts.model}")
    return rest, vars(opts)


def estimate_main(argv: list[str]) -> int:
    """`dpo-ds estimate ...`: print the estimate; 0 on success (ConfigError is reported by the CLI)."""
    rest, opts = _own_flags(list(argv))
    if "-h" in rest or "--help" in rest:
        print(USAGE)
        return 0
    args, remaining = parse_known(rest)
    if remaining:
        raise ConfigError(f"unknown argument(s) {remaining}; see dpo-ds estimate --help")
    shape = model_shape(args.model_name_or_path, args.trust_remote_code)
    result = estimate(args, shape, opts["nodes"], opts["gpus_per_node"], opts["gpu_memory"])
    print(json.dumps(result, indent=2) if opts["json"] else format_text(result))
    return 0

