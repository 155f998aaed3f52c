"""The optimizer and learning-rate schedule a DeepSpeed policy engine gets from DPOConfig, in one process.

Usage: python optim_probe.py MODEL_DIR OUT_JSON. For each optimizer case: the class DeepSpeed steps and its
param groups' hyperparameters (or the error); for each schedule: the learning rate of each of 10 steps.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from dpo_ds import distributed
from dpo_ds.config import DPOConfig
from dpo_ds.engines import build_policy_engine

model_dir, out = sys.argv[1:3]
STAGE0 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}
OFFLOAD = {**STAGE0, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def engine(ds_config, total_steps=10, warmup_steps=2, **kw):
    args = DPOConfig(learning_rate=1e-3, weight_decay=0.01, **kw)
    return build_policy_engine(AutoModelForCausalLM.from_pretrained(model_dir), args, ds_config, total_steps,
                               warmup_steps)


def describe(case):
    ds_config, kw = case
    try:
        e = engine(ds_config, **kw)
    except Exception as exc:  # the message is what the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    groups = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str))}
              | {"size": len(g["params"])} for g in e.basic_optimizer.param_groups]
    found = {"class": type(e.basic_optimizer).__name__, "groups": groups}
    e.destroy()
    return found


def lrs(kw, steps=10):
    e = engine(STAGE0, **kw)
    seen = []
    for _ in range(steps):
        seen.append(e.get_lr()[0])
        e.backward(sum(p.sum() for p in e.module.parameters()) * 0.0)
        e.step()
    e.destroy()
    return seen


distributed.init()
optimizers = {
    "adamw_torch": (STAGE0, dict(optim="adamw_torch")),
    "adamw_torch_fused": (STAGE0, dict(optim="adamw_torch_fused", adam_beta1=0.8)),
    "adafactor": (STAGE0, dict(optim="adafactor")),
    "sgd": (STAGE0, dict(optim="sgd", optim_args="momentum=0.9,nesterov=true")),
    "rmsprop": (STAGE0, dict(optim="rmsprop", optim_args="alpha=0.5")),
    "adagrad": (STAGE0, dict(optim="adagrad")),
    "adamw_bnb_8bit": (STAGE0, dict(optim="adamw_bnb_8bit")),
    "offload_adamw": (OFFLOAD, dict(optim="adamw_torch_fused")),
    "offload_sgd": (OFFLOAD, dict(optim="sgd")),
}
schedules = {
    "linear": {}, "cosine": {}, "constant": {}, "constant_with_warmup": {},
    "cosine_with_restarts": {"num_cycles": 2}, "polynomial": {"power": 2.0, "lr_end": 1e-5},
    "inverse_sqrt": {"timescale": 3}, "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-4}, "warmup_stable_decay": {"num_decay_steps": 4, "min_lr_ratio": 0.1},
}
results = {"optimizers": {name: describe(case) for name, case in optimizers.items()},
           "schedules": {name: lrs(dict(optim="sgd", lr_scheduler_type=name, lr_scheduler_kwargs=kw or None))
                         for name, kw in schedules.items()}}
with open(out, "w") as f:
    json.dump(results, f)
distributed.shutdown()
