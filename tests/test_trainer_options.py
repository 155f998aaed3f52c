"""Single-purpose transformers options, checked without a training run: gradient_checkpointing_kwargs,
ref_model_init_kwargs, tf32, and the checks of how evaluation, saving and the best model fit together."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_ds.config import DPOConfig
from dpo_ds.engines import enable_gradient_checkpointing
from dpo_ds.models import load_model, reference_args
from dpo_ds.trainer import DPOTrainer, _best_metric, _set_tf32


@pytest.mark.parametrize("kwargs,reentrant", [({"use_reentrant": True}, True), (None, False)])
def test_gradient_checkpointing_kwargs_reach_the_model(tiny_model_dir, kwargs, reentrant):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enable_gradient_checkpointing(model, kwargs)
    layer = model.model.layers[0]
    assert model.model.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {
        "use_reentrant": reentrant}


def test_ref_model_init_kwargs_load_the_reference_only(tiny_model_dir):
    args = DPOConfig(model_init_kwargs={"dtype": "float32"}, ref_model_init_kwargs={"dtype": "bfloat16"})
    assert load_model(tiny_model_dir, reference_args(args)).dtype == torch.bfloat16
    assert load_model(tiny_model_dir, args).dtype == torch.float32  # the policy's own kwargs are untouched
    assert reference_args(DPOConfig()).model_init_kwargs == {}  # unset: the policy's kwargs


def test_tf32_sets_torch_and_needs_a_gpu():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        _set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="tf32=True needs a CUDA GPU"):
                _set_tf32(True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_best_metric_defaults_follow_transformers():
    assert _best_metric(DPOConfig()) == (None, False)
    assert _best_metric(DPOConfig(load_best_model_at_end=True, eval_steps=10, save_steps=10)) == ("eval_loss", False)
    assert _best_metric(DPOConfig(metric_for_best_model="rewards/accuracies")) == ("eval_rewards/accuracies", True)
    assert _best_metric(DPOConfig(metric_for_best_model="eval_loss", greater_is_better=True)) == ("eval_loss", True)


@pytest.mark.parametrize("kw,message", [
    (dict(load_best_model_at_end=True, eval_strategy="no"), "need evaluations"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), "save_strategy == eval_strategy"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=4),
     r"save_steps \(4\) to be a multiple of eval_steps"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=4, save_only_model=True),
     "save_only_model"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="no"), "need evaluations"),
])
def test_strategy_combinations_are_refused_before_loading(kw, message):
    with pytest.raises(ValueError, match=message):
        DPOTrainer("does-not-exist", args=DPOConfig(**kw))  # refused before the model name is even looked at


@pytest.mark.slow
def test_data_seed_alone_fixes_the_order_and_workers_keep_it(tmp_path, tiny_model_dir):
    """The first step's rows (seen through its logps/chosen) follow data_seed, not seed, and stay the same
    when dataloader_num_workers collate them in worker processes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_trainer import ENV, write_learnable_data

    root = Path(__file__).resolve().parent.parent
    data = write_learnable_data(tmp_path / "prefs.jsonl", 32, seed=3)
    proc = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "data_order_probe.py"), tiny_model_dir,
                           str(data), str(tmp_path)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "data_order.json").read_text())
    assert got["seed2_data7"] == pytest.approx(got["seed1_data7"], abs=1e-6)  # seed changes, data_seed fixes rows
    assert got["seed1_data8"] != pytest.approx(got["seed1_data7"], abs=1e-3)  # data_seed changes the rows
    assert got["seed1_data7_workers2"] == pytest.approx(got["seed1_data7"], abs=1e-6)
