"""dpo_ds.convert in-process: a one-rank engine saves under one ZeRO stage and an engine of another stage
resumes from it. The expected weights, Adam moments and step are read from the saving engine itself
(its torch optimizer at stage 0, DeepSpeed's full-state accessors under ZeRO), never through the
converter's files, so a converter that drops, reorders or mis-shapes a state fails here in seconds."""
from __future__ import annotations

import json
import os

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from torch import nn

from dpo_ds import checkpoint, distributed
from dpo_ds.checkpoint import COMPLETE, UNIVERSAL, CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """A one-rank gloo group in this process, as `DPOTrainer` creates it without a launcher; afterwards
    the group is destroyed and the environment restored, or every later subprocess test would inherit
    this process's MASTER_PORT (still listened on) and fail to bind it."""
    saved = dict(os.environ)
    distributed.init(timeout_s=120)
    yield
    distributed.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def make_engine(stage: int, seed: int):
    """A 2-layer MLP under ZeRO `stage`, fp32, with AdamW and a decaying LR schedule."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


def train(engine, steps: int) -> None:
    inputs = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = engine(torch.randn(2, 8, generator=inputs)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def optimizer_step(engine) -> float:
    """Adam's step count, the same in every state entry: the torch optimizer's at stage 0, ZeRO's inner one."""
    inner = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
    steps = {float(state["step"]) for state in inner.state.values()}
    assert len(steps) == 1, steps
    return steps.pop()


def snapshot(engine) -> dict:
    """Full fp32 weights and Adam moments by parameter name, Adam's step, the engine's and scheduler's counters."""
    tensors = {}
    for name, param in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            state = engine.optimizer.state[param]
            tensors[name] = [param.detach().clone()] + [state[key].clone() for key in MOMENTS]
        else:
            tensors[name] = [safe_get_full_fp32_param(param)] + [safe_get_full_optimizer_state(param, key)
                                                                 for key in MOMENTS]
    return {"tensors": tensors, "step": optimizer_step(engine), "global_steps": engine.global_steps,
            "lr": engine.get_lr()[0], "last_epoch": engine.lr_scheduler.last_epoch}


@pytest.mark.parametrize("saved_stage, loaded_stage", [(0, 3), (3, 0), (2, 0), (0, 2)])
def test_states_survive_a_change_of_zero_stage(tmp_path, saved_stage, loaded_stage):
    source = make_engine(saved_stage, seed=0)
    train(source, 3)
    expected = snapshot(source)
    path = checkpoint.save(source, tmp_path, 3, {"marker": "client"}, save_total_limit=None)

    target = make_engine(loaded_stage, seed=1)
    assert not checkpoint.same_layout(target, path)
    client = checkpoint.load(target, path)
    loaded = snapshot(target)

    assert (path / UNIVERSAL / COMPLETE).exists() and client["marker"] == "client"
    assert loaded["tensors"].keys() == expected["tensors"].keys()
    for name, saved in expected["tensors"].items():
        for what, want, got in zip(("weight",) + MOMENTS, saved, loaded["tensors"][name]):
            assert torch.equal(got, want), f"{name} {what}"
    assert {k: loaded[k] for k in ("step", "global_steps", "lr", "last_epoch")} == \
        {"step": 3.0, "global_steps": 3, "lr": expected["lr"], "last_epoch": 3}
    assert expected["step"] == 3.0


def test_same_layout_loads_directly_without_a_conversion(tmp_path):
    source = make_engine(0, seed=0)
    train(source, 2)
    expected = snapshot(source)
    path = checkpoint.save(source, tmp_path, 2, {}, save_total_limit=None)
    target = make_engine(0, seed=1)
    assert checkpoint.same_layout(target, path)
    checkpoint.load(target, path)
    loaded = snapshot(target)
    assert not (path / UNIVERSAL).exists()
    for name, saved in expected["tensors"].items():
        assert all(torch.equal(want, got) for want, got in zip(saved, loaded["tensors"][name])), name
    assert (loaded["step"], loaded["global_steps"]) == (expected["step"], 2)


def test_a_marker_without_layout_or_files_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-1"
    path.mkdir()
    (path / COMPLETE).write_text(json.dumps({"step": 1}))
    assert checkpoint.verify(path) == f"{path / COMPLETE} lists no files to check (not a marker this version writes)"
    with pytest.raises(CheckpointError, match="records no zero_stage and world_size"):
        checkpoint.saved_layout(path)
