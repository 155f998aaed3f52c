"""LoRA: wrapping, the adapter-disabled reference, continuing from a saved adapter, export, QLoRA's requirements."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_ds.collate import PreferenceCollator  # noqa: E402
from dpo_ds.config import DPOConfig  # noqa: E402
from dpo_ds.engines import PreferenceModel  # noqa: E402
from dpo_ds.models import REFERENCE_ADAPTER, TRAINABLE_ADAPTER, lora_config, load_policy_model  # noqa: E402
from dpo_ds.packing import model_inputs  # noqa: E402
from dpo_ds.reference import AdapterReference  # noqa: E402
from test_trainer import read_metrics, run_train  # noqa: E402

ROWS = [{"prompt_ids": [5, 9, 14, 3], "chosen_ids": [40, 41, 42], "rejected_ids": [50, 51]},
        {"prompt_ids": [7, 8], "chosen_ids": [60], "rejected_ids": [70, 71, 72, 73]}]


def lora_args(**kw) -> DPOConfig:
    return DPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                     lora_target_modules=["q_proj", "v_proj", "up_proj"], **kw)


def base_logps(model_dir: str) -> torch.Tensor:
    """Independent reference: the plain base model's completion log-probs, float64 log-softmax of HF logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = PreferenceCollator(0)(ROWS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    token = logits.log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return token * batch["completion_mask"][:, 1:]


def perturb_adapter(model, seed: int) -> None:
    """Give lora_B non-zero values, so that the adapter changes the model's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{TRAINABLE_ADAPTER}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def policy_and_reference(model):
    module = PreferenceModel(model)
    inputs = model_inputs(PreferenceCollator(0)(ROWS), "padded")
    return module, inputs, AdapterReference(module, ld_alpha=None)


def test_use_peft_trains_only_adapters_in_the_base_dtype(tiny_model_dir):
    args = lora_args(model_init_kwargs={"dtype": "bfloat16"}, peft_config={"use_rslora": True})
    model = load_policy_model(tiny_model_dir, args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # PEFT alone would upcast adapters to fp32
    assert model.peft_config[TRAINABLE_ADAPTER].use_rslora
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "up_proj"}  # ...q_proj.lora_A.default.weight


def test_bad_lora_settings_are_named(tiny_model_dir):
    with pytest.raises(ValueError, match="LM head"):
        load_policy_model(tiny_model_dir, lora_args().__class__(use_peft=True, lora_target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="peft_config / lora_\\* flags do not make a LoraConfig"):
        lora_config(DPOConfig(use_peft=True, peft_config={"no_such_option": 1}))


def test_adapter_disabled_reference_is_the_base_model(tiny_model_dir):
    model = load_policy_model(tiny_model_dir, lora_args())
    perturb_adapter(model, seed=0)
    module, inputs, reference = policy_and_reference(model)
    ref = reference.token_logps(inputs)
    torch.testing.assert_close(ref.double(), base_logps(tiny_model_dir), atol=1e-5, rtol=0)
    policy = module(**inputs).logps
    assert (policy - ref).abs().max() > 1e-2  # the adapter is on again for the policy
    assert policy.requires_grad and not ref.requires_grad


def test_continuing_from_a_saved_adapter_uses_a_frozen_copy_as_reference(tiny_model_dir, tmp_path):
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(lora_args()))
    perturb_adapter(start, seed=1)
    start.save_pretrained(tmp_path / "adapter")
    model = load_policy_model(str(tmp_path / "adapter"), DPOConfig())
    assert isinstance(model, PeftModel) and set(model.peft_config) == {TRAINABLE_ADAPTER, REFERENCE_ADAPTER}
    params = dict(model.named_parameters())
    copies = [n for n in params if f".{REFERENCE_ADAPTER}." in n]
    assert copies and not any(params[n].requires_grad for n in copies)
    for n in copies:
        trained = params[n.replace(f".{REFERENCE_ADAPTER}.", f".{TRAINABLE_ADAPTER}.")]
        assert trained.requires_grad and torch.equal(trained, params[n])
    module, inputs, reference = policy_and_reference(model)
    # Before any step the policy equals its reference: DPO's first loss is ln 2.
    torch.testing.assert_close(reference.token_logps(inputs), module(**inputs).logps.detach(), atol=0, rtol=0)
    assert (reference.token_logps(inputs).double() - base_logps(tiny_model_dir)).abs().max() > 1e-2
    # Training the adapter moves the policy, not the reference; the trainable adapter stays active.
    perturb_adapter(model, seed=2)
    assert model.active_adapter == TRAINABLE_ADAPTER
    assert (reference.token_logps(inputs) - module(**inputs).logps.detach()).abs().max() > 1e-2
    assert all(params[n.replace(f".{REFERENCE_ADAPTER}.", f".{TRAINABLE_ADAPTER}.")].requires_grad for n in copies)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_qlora_without_a_gpu_says_so(tiny_model_dir):
    with pytest.raises(RuntimeError, match="load_in_4bit \\(QLoRA\\) needs a CUDA GPU"):
        load_policy_model(tiny_model_dir, lora_args(load_in_4bit=True))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_qlora_loads_4bit_base_with_adapters_in_the_compute_dtype(tiny_model_dir):
    model = load_policy_model(tiny_model_dir, lora_args(load_in_4bit=True, model_init_kwargs={"dtype": "bfloat16"}))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    module, inputs, reference = policy_and_reference(model)
    device = next(model.parameters()).device
    ref = reference.token_logps({k: v.to(device) for k, v in inputs.items()})
    assert torch.isfinite(ref).all() and ref.abs().sum() > 0


@pytest.mark.slow
def test_zero3_lora_with_checkpointing_trains_and_exports_adapter_and_merged_model(tmp_path, tiny_model_dir):
    run_train(tmp_path, tiny_model_dir, "--deepspeed", str(Path(__file__).parent.parent / "ds_configs" / "zero3.json"),
              "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
              "--lora_target_modules", "q_proj", "v_proj", "up_proj", "--gradient_checkpointing", "true",
              "--learning_rate", "3e-2", "--max_steps", "4", "--save_steps", "none")
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at zero: policy == reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    final = tmp_path / "out"
    assert (final / "adapter" / "adapter_config.json").exists()
    # Independent merge: PEFT on CPU, base + saved adapter -> merge_and_unload.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload().state_dict()
    merged = load_file(final / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    changed = {n for n, t in merged.items() if not torch.equal(t, initial[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")) for n in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert reloaded.config.tie_word_embeddings == base.config.tie_word_embeddings
