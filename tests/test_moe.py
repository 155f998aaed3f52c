"""Mixture-of-experts: the router load-balancing loss is added and logged as TRL does (`router_aux_loss_coef`)."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2MoeConfig

from dpo_ds.engines import PreferenceModel, router_aux_loss_coef

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=128)


def tiny_moe(kind: str):
    torch.manual_seed(0)
    if kind == "mixtral":
        config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SIZES)
    else:
        config = Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, **SIZES)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_aux_loss_is_the_models_own(kind):
    """The fused-head forward returns the aux loss the model's own causal-LM forward computes (padding masked)."""
    model = tiny_moe(kind)
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: those tokens do not count in the balance
    expected = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    out, aux = PreferenceModel(model)(ids, mask, mask, with_aux_loss=True)
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=1e-6)
    aux.backward()  # the router learns from it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "gate" in n)


def test_router_aux_loss_coef_follows_trl():
    model = tiny_moe("mixtral")
    assert router_aux_loss_coef(SimpleNamespace(router_aux_loss_coef=None), model) == model.config.router_aux_loss_coef
    assert router_aux_loss_coef(SimpleNamespace(router_aux_loss_coef=0.25), model) == 0.25
    assert router_aux_loss_coef(SimpleNamespace(router_aux_loss_coef=0.0), model) == 0.0
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SIZES))
    assert router_aux_loss_coef(SimpleNamespace(router_aux_loss_coef=None), dense) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.5: LlamaForCausalLM is not a mixture-of-experts"):
        router_aux_loss_coef(SimpleNamespace(router_aux_loss_coef=0.5), dense)


@pytest.mark.slow
def test_trainer_adds_and_logs_the_aux_loss(tmp_path, builtin_tokenizer):
    """Step 1 (policy == reference, so the DPO loss is ln 2): loss = ln 2 + 0.5 * aux_loss, and the logged
    aux_loss is the one the model's own forward gives on the step's batch."""
    from test_trainer import ENV, write_learnable_data

    model = tiny_moe("mixtral")
    model.resize_token_embeddings(len(builtin_tokenizer))
    model.save_pretrained(tmp_path / "mixtral")
    builtin_tokenizer.save_pretrained(tmp_path / "mixtral")
    data = write_learnable_data(tmp_path / "prefs.jsonl", 4, seed=2)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "moe_probe.py"), str(tmp_path / "mixtral"),
                           str(data), str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "out" / "moe_probe.json").read_text())
    assert got["logged"]["aux_loss"] == pytest.approx(got["own_aux_loss"], rel=1e-5)
    assert got["logged"]["loss"] == pytest.approx(math.log(2) + 0.5 * got["own_aux_loss"], rel=1e-5)
