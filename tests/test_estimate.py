"""`dpo-ds estimate`: model states against DeepSpeed's own estimators, activations against the
tensors autograd really saves, and the direction every figure moves with batch, length and
checkpointing."""
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dpo_ds.cli import main as cli_main
from dpo_ds.config import ConfigError, DPOConfig
from dpo_ds.tools.estimate import (
    GIB, ZeroSetup, activation_bytes, estimate, estimate_main, logprob_head_bytes, model_shape, parse_size,
    policy_model_states, reference_model_states, shape_from_config,
)

ROOT = Path(__file__).resolve().parent.parent
DS_CONFIGS = ROOT / "ds_configs"
HARDWARE = [(1, 1), (1, 8), (2, 8), (4, 4), (3, 2)]  # (nodes, gpus per node)
SIZES = [(7_241_732_096, 131_072_000), (70_553_706_496, 1_050_673_152), (134_515_008, 28_311_552)]


def printed_table(fn, **kwargs) -> dict[str, tuple[float, float]]:
    """DeepSpeed's printed "per CPU | per GPU | options" rows, as {options: (cpu GB, gpu GB)}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(**kwargs)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", out.getvalue(), re.MULTILINE)
    assert rows, out.getvalue()
    # Python 3.11+ formats DeepSpeed's enum as "OffloadDeviceEnum.cpu".
    return {re.sub(r"\s+|OffloadDeviceEnum\.", "", opts): (float(cpu), float(gpu)) for cpu, gpu, opts in rows}


@pytest.mark.parametrize("nodes,gpus", HARDWARE)
@pytest.mark.parametrize("params,largest", SIZES)
def test_zero2_model_states_match_deepspeed(params, largest, nodes, gpus):
    table = printed_table(estimate_zero2_model_states_mem_needs_all_cold, total_params=params,
                          num_gpus_per_node=gpus, num_nodes=nodes)
    for offload in ("cpu", "none"):
        ours = policy_model_states(params, largest, ZeroSetup(2, offload_optimizer=offload), nodes, gpus)
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=offload == "cpu")
        assert (ours.cpu, ours.gpu) == (pytest.approx(cpu, abs=2), pytest.approx(gpu, abs=2))
        printed = table[f"offload_optimizer={offload}"]
        assert (round(ours.cpu / GIB, 2), round(ours.gpu / GIB, 2)) == printed


@pytest.mark.parametrize("nodes,gpus", HARDWARE)
@pytest.mark.parametrize("params,largest", SIZES)
def test_zero3_model_states_match_deepspeed(params, largest, nodes, gpus):
    table = printed_table(estimate_zero3_model_states_mem_needs_all_cold, total_params=params,
                          largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes)
    cases = [("cpu", "cpu"), ("none", "cpu"), ("none", "none")]  # (offload_param, offload_optimizer)
    for (param_dev, optim_dev) in cases:
        for zero_init in (True, False):
            zero = ZeroSetup(3, offload_param=param_dev, offload_optimizer=optim_dev, zero_init=zero_init)
            ours = policy_model_states(params, largest, zero, nodes, gpus)
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest, gpus, nodes, cpu_offload=optim_dev == "cpu", cpu_offload_params=param_dev == "cpu",
                zero_init=zero_init)
            assert (ours.cpu, ours.gpu) == (pytest.approx(cpu, abs=2), pytest.approx(gpu, abs=2))
            printed = table[f"offload_param={param_dev},offload_optimizer={optim_dev},zero_init={int(zero_init)}"]
            assert (round(ours.cpu / GIB, 2), round(ours.gpu / GIB, 2)) == printed


def test_setups_deepspeed_does_not_cover_follow_the_same_bytes_per_parameter():
    params, largest, gpus = 1_000_000, 1_000, 4
    # Parameters offloaded, optimizer on the GPU: 16 optimizer bytes stay partitioned on the GPUs,
    # the 2 weight bytes go to the host (x1.5 buffer).
    only_params = policy_model_states(params, largest, ZeroSetup(3, offload_param="cpu"), 1, gpus)
    assert only_params == type(only_params)(gpu=4 * largest + 16 * params // gpus, cpu=int(2 * params * 1.5))
    nvme = policy_model_states(params, largest, ZeroSetup(3, offload_param="nvme", offload_optimizer="nvme"), 2, gpus)
    assert (nvme.gpu, nvme.nvme) == (4 * largest, 18 * params // 2)
    # fp32: 4-byte weights and gradients; stage 1 partitions optimizer states only, stage 0 nothing.
    assert policy_model_states(params, largest, ZeroSetup(1, weight_bytes=4), 1, gpus).gpu == 8 * params + 4 * params
    assert policy_model_states(params, largest, ZeroSetup(0), 1, gpus).gpu == 20 * params
    # The inference-only reference: weights only.
    assert reference_model_states(params, largest, 0, "none", 2, 1, gpus).gpu == 2 * params
    assert reference_model_states(params, largest, 3, "none", 2, 1, gpus).gpu == 2 * largest + 2 * params // gpus
    offloaded = reference_model_states(params, largest, 3, "cpu", 2, 2, gpus)
    assert (offloaded.gpu, offloaded.cpu) == (2 * largest, int(2 * params / 2 * 1.5))


def test_zero_setup_reads_the_shipped_configs_and_rejects_impossible_offload():
    def read(name: str, **flags) -> ZeroSetup:
        args = DPOConfig(deepspeed=str(DS_CONFIGS / name), **flags)
        from dpo_ds.ds_config import load_deepspeed_config
        return ZeroSetup.from_deepspeed(load_deepspeed_config(args, 8, hidden_size=64, num_training_steps=1))

    assert read("zero2.json") == ZeroSetup(2, weight_bytes=4)
    assert read("zero3.json", bf16=True) == ZeroSetup(3, weight_bytes=2)
    assert read("zero3_offload_param.json", bf16=True) == ZeroSetup(3, offload_param="cpu")
    assert read("zero3_offload_all.json", bf16=True) == ZeroSetup(3, "cpu", "cpu")
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        ZeroSetup(2, offload_param="cpu")
    with pytest.raises(ConfigError, match="offload_optimizer.device = 'disk'"):
        ZeroSetup(3, offload_optimizer="disk")


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_shape_counts_parameters_like_deepspeed_on_the_real_model(config_cls):
    config = config_cls(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=500, tie_word_embeddings=config_cls is LlamaConfig)
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = AutoModelForCausalLM.from_config(config)
    assert (shape_from_config(config).params, shape_from_config(config).largest_layer_params) == model_to_params(model)


def test_llama3_70b_from_its_config_alone(tmp_path):
    """Only config.json exists: nothing is loaded but the config. 70,553,706,496 is the published count."""
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                max_position_embeddings=8192).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert shape.params == 70_553_706_496
    assert shape.largest_layer_params == 128256 * 8192  # the embedding (and the LM head)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (80, 8, 128)


def saved_activation_bytes(model, pairs: int, seq_len: int) -> int:
    """Bytes of the distinct tensors autograd keeps for backward (weights excluded), for the decoder
    and the LM-head input, measured with saved-tensor hooks."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (2 * pairs, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden[:, :-1].reshape(-1, hidden.shape[-1]) @ model.lm_head.weight.t()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_activations_match_what_autograd_saves(config_cls, attn, dtype):
    config = config_cls(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=500, attn_implementation=attn)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    measured = saved_activation_bytes(model, pairs=2, seq_len=24)
    estimated = activation_bytes(shape_from_config(config), 2, 24, dtype.itemsize, False, attn)
    assert estimated == pytest.approx(measured, rel=0.01)


SHAPE = shape_from_config(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=32000))


def test_activations_and_head_move_the_right_way():
    base = activation_bytes(SHAPE, 2, 512, 2, False)
    assert activation_bytes(SHAPE, 4, 512, 2, False) == 2 * base  # linear in the batch
    assert activation_bytes(SHAPE, 2, 1024, 2, False) == 2 * base  # linear in length with fused attention
    assert activation_bytes(SHAPE, 2, 1024, 2, False, "eager") > 2 * activation_bytes(SHAPE, 2, 512, 2, False, "eager")
    assert activation_bytes(SHAPE, 2, 512, 2, True) < base / 2  # checkpointing keeps far less
    assert activation_bytes(SHAPE, 2, 512, 4, False) > base  # fp32 tensors are larger
    # Naive fp32 logits: 2 sequences per pair x tokens x vocab x 4 bytes, twice; the fused op stays small.
    assert logprob_head_bytes(SHAPE, 2, 512, fused=False) == 2 * 4 * (2 * 2 * 512) * 32000
    fused_per_pair = logprob_head_bytes(SHAPE, 3, 512, fused=True) - logprob_head_bytes(SHAPE, 2, 512, fused=True)
    assert fused_per_pair == 2 * 512 * 7 * 4  # only the per-token state grows with the batch
    assert logprob_head_bytes(SHAPE, 8, 2048, fused=True) < logprob_head_bytes(SHAPE, 8, 2048, fused=False) / 50


def run_estimate(**flags) -> dict:
    args = DPOConfig(deepspeed=str(DS_CONFIGS / flags.pop("ds", "zero3.json")), bf16=True, **flags)
    return estimate(args, SHAPE, nodes=1, gpus_per_node=8, gpu_memory=parse_size("2GB"))


def test_totals_and_largest_micro_batch_move_the_right_way():
    small = run_estimate(per_device_train_batch_size=1, max_length=512, gradient_checkpointing=False)
    bigger = dict(gradient_checkpointing=False, max_length=512)
    assert run_estimate(per_device_train_batch_size=2, **bigger)["total"]["gpu"] > small["total"]["gpu"]
    bigger = dict(gradient_checkpointing=False, max_length=1024)
    assert run_estimate(per_device_train_batch_size=1, **bigger)["total"]["gpu"] > small["total"]["gpu"]
    ckpt = run_estimate(per_device_train_batch_size=1, max_length=512, gradient_checkpointing=True)
    assert ckpt["total"]["gpu"] < small["total"]["gpu"]
    fit = small["max_micro_batch"]
    assert fit["checkpointing"] > fit["no_checkpointing"] >= 1
    for ckpt_on, best in ((False, fit["no_checkpointing"]), (True, fit["checkpointing"])):
        inside = run_estimate(per_device_train_batch_size=best, max_length=512, gradient_checkpointing=ckpt_on)
        over = run_estimate(per_device_train_batch_size=best + 1, max_length=512, gradient_checkpointing=ckpt_on)
        assert inside["total"]["gpu"] <= parse_size("2GB") < over["total"]["gpu"]
    # Offloading moves policy states off the GPU and onto the host.
    offload = run_estimate(ds="zero3_offload_all.json", per_device_train_batch_size=1, max_length=512)
    assert offload["policy_model_states"]["gpu"] < small["policy_model_states"]["gpu"]
    assert offload["policy_model_states"]["cpu"] > small["policy_model_states"]["cpu"]


def test_reference_follows_its_own_stage_and_offload():
    sharded = run_estimate(max_length=512, ref_zero_stage=3, ref_offload="none")
    offloaded = run_estimate(max_length=512, ref_zero_stage=3, ref_offload="cpu")
    replicated = run_estimate(max_length=512, ref_zero_stage=0, ref_offload="none")
    assert replicated["reference_model_states"]["gpu"] == 2 * SHAPE.params
    assert offloaded["reference_model_states"]["gpu"] < sharded["reference_model_states"]["gpu"] \
        < replicated["reference_model_states"]["gpu"]
    assert offloaded["reference_model_states"]["cpu"] == int(2 * SHAPE.params * 1.5)  # bf16 weights, one node
    free = run_estimate(max_length=512, loss_type="simpo")
    assert free["reference"] is None and free["reference_model_states"]["gpu"] == 0
    assert free["total"]["gpu"] < sharded["total"]["gpu"]


def test_parse_size_and_bad_input():
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80g") == 80 * GIB
    assert parse_size("16000MB") == 16000 * 2**20 and parse_size("1.5T") == int(1.5 * 2**40)
    with pytest.raises(ConfigError, match="--gpu-memory 'lots'"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="use_peft"):
        estimate(DPOConfig(use_peft=True), SHAPE)
    with pytest.raises(ConfigError, match="--nodes"):
        estimate_main(["--model", "x", "--nodes", "0"])


def test_cli_json_for_a_config_only_model_dir(tmp_path, capsys):
    LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500).save_pretrained(tmp_path)
    assert cli_main(["estimate", "--model", str(tmp_path), "--deepspeed", str(DS_CONFIGS / "zero2.json"),
                     "--gpus-per-node", "2", "--bf16", "--max_length", "64", "--gpu-memory", "1GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params = model_shape(str(tmp_path)).params
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, 2, 1, cpu_offload=False)
    assert (out["policy_model_states"]["gpu"], out["policy_model_states"]["cpu"]) == (gpu, cpu)
    assert out["max_micro_batch"]["no_checkpointing"] > 0
    assert cli_main(["estimate", "--model", str(tmp_path), "--max_length", "64"]) == 0
    text = capsys.readouterr().out
    assert "policy model states" in text and "log-prob head, naive fp32 logits" in text
    assert cli_main(["estimate", "--model", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_imports_the_tools_only_when_their_subcommand_runs():
    code = "import sys, dpo_ds.cli; print(sorted(m for m in sys.modules if m.startswith('dpo_ds.tools')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert run.stdout.strip() == "[]"
