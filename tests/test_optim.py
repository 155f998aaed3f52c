"""`optim`, `optim_args`, `weight_decay` and every `lr_scheduler_type` reach the DeepSpeed policy engine as
transformers builds them; learning rates are checked against transformers' own schedule functions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.optimization as hf

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def probe(tiny_model_dir, tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("optim") / "probe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "optim_probe.py"), tiny_model_dir,
                           str(out)], env={**os.environ, **ENV_KEYS}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def expected_lrs(schedule, steps=10) -> list[float]:
    """The rate of each step under transformers' schedule function on a plain torch optimizer."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = schedule(optimizer)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


SCHEDULES = {  # warmup 2 of 10 steps, with the kwargs optim_probe.py passes as lr_scheduler_kwargs
    "linear": lambda o: hf.get_linear_schedule_with_warmup(o, 2, 10),
    "cosine": lambda o: hf.get_cosine_schedule_with_warmup(o, 2, 10),
    "constant": lambda o: hf.get_constant_schedule(o),
    "constant_with_warmup": lambda o: hf.get_constant_schedule_with_warmup(o, 2),
    "cosine_with_restarts": lambda o: hf.get_cosine_with_hard_restarts_schedule_with_warmup(o, 2, 10, num_cycles=2),
    "polynomial": lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, 2, 10, lr_end=1e-5, power=2.0),
    "inverse_sqrt": lambda o: hf.get_inverse_sqrt_schedule(o, 2, timescale=3),
    "cosine_with_min_lr": lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, 2, 10, min_lr_rate=0.1),
    "cosine_warmup_with_min_lr": lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup_lr_rate(o, 2, 10,
                                                                                                  min_lr=1e-4),
    "warmup_stable_decay": lambda o: hf.get_wsd_schedule(o, 2, num_decay_steps=4, num_training_steps=10,
                                                         min_lr_ratio=0.1),
}


@pytest.mark.slow
def test_optimizers_and_schedules_reach_the_engine(probe):
    optimizers = probe["optimizers"]
    for name, cls in [("adamw_torch", "AdamW"), ("adamw_torch_fused", "AdamW"), ("adafactor", "Adafactor"),
                      ("sgd", "SGD"), ("rmsprop", "RMSprop"), ("adagrad", "Adagrad"),
                      ("offload_adamw", "DeepSpeedCPUAdam")]:
        assert optimizers[name].get("class") == cls, (name, optimizers[name])
        # transformers' decay groups: weight_decay on the weights, none on the RMSNorm weights (5 in a 2-layer Llama;
        # ZeRO-2 flattens each group into one tensor).
        decay, no_decay = optimizers[name]["groups"]
        size = 1 if name.startswith("offload") else 5
        assert (decay["weight_decay"], no_decay["weight_decay"], no_decay["size"]) == (0.01, 0.0, size), name
    assert optimizers["adamw_torch_fused"]["groups"][0]["fused"] is True
    assert "fused" not in optimizers["adamw_torch"]["groups"][0] or not optimizers["adamw_torch"]["groups"][0]["fused"]
    assert optimizers["adafactor"]["groups"][0]["relative_step"] is False  # transformers' Adafactor settings
    sgd = optimizers["sgd"]["groups"][0]
    assert (sgd["momentum"], sgd["nesterov"]) == (0.9, True)  # from optim_args
    assert optimizers["rmsprop"]["groups"][0]["alpha"] == 0.5
    assert "bitsandbytes" in optimizers["adamw_bnb_8bit"]["error"]  # not installed here: transformers' own error
    assert "optim='sgd' has no DeepSpeed CPU kernel for offload_optimizer" in optimizers["offload_sgd"]["error"]

    assert sorted(probe["schedules"]) == sorted(SCHEDULES)
    for name, schedule in SCHEDULES.items():
        assert probe["schedules"][name] == pytest.approx(expected_lrs(schedule), rel=1e-9, abs=1e-12), name
