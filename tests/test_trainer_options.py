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
    (dict(load_best_model_at_end=True, eval_steps=3, save_steps=4), r"save_steps \(4\) to be a multiple of eval_steps"),
    (dict(load_best_model_at_end=True, eval_steps=2, save_steps=4, save_only_model=True), "save_only_model"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="no"), "need evaluations"),
])
def test_strategy_combinations_are_refused_before_loading(kw, message):
    with pytest.raises(ValueError, match=message):
        DPOTrainer("does-not-exist", args=DPOConfig(**kw))  # refused before the model name is even looked at
