"""Resume a checkpoint on another ZeRO stage or another number of ranks: DeepSpeed's universal format.

Why: a job requeued on fewer nodes, or rerun under another ZeRO config to fit memory, must continue
from its last checkpoint, but DeepSpeed's `load_checkpoint` only reads optimizer shards on the ZeRO
stage and the number of data-parallel ranks that wrote them.

When: `checkpoint.load` compares the layout the checkpoint's COMPLETE marker records with the
engine's; only when they differ (2 ranks -> 1, ZeRO-3 -> stage 0, stage 0 -> ZeRO-2, ...) does it
call `load_converted`, which converts the checkpoint once into `<checkpoint>/universal` (one file per
parameter and optimizer state, with a COMPLETE marker of its own; a later resume reuses it) and
loads from there:

- a ZeRO checkpoint is converted by DeepSpeed's `ds_to_universal`, run in a subprocess;
- a replicated one (stage 0, fp32: whole weights and a torch optimizer's state keyed by position, see
  `checkpoint.OPTIMIZER_PARAM_NAMES`) by `_replicated_to_universal`, which writes the same layout;
- ZeRO engines load the universal format themselves (`load_universal_checkpoint`); a stage-0 fp32
  engine, into which DeepSpeed cannot load it, goes through `_load_universal_replicated`.

This writes DeepSpeed's private file layout and sets engine internals (`_config.load_universal_checkpoint`,
`global_steps`, `skipped_steps`): after a DeepSpeed upgrade, run tests/test_checkpoint_convert.py first,
which round-trips the states in-process in seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import (COMPLETE, MODEL_STATES, OPTIMIZER_PARAM_NAMES, UNIVERSAL, atomic_write, is_replicated,
                         is_replicated_checkpoint, optimizer_param_names, read_state, safe_loading, saved_layout)
from .distributed import rank as _rank, wait_for_rank0


def load_converted(engine, path: Path) -> Optional[dict[str, Any]]:
    """Load `path`, written under another ZeRO stage or number of ranks than `engine`'s, through the
    universal format; returns this rank's client state (None when DeepSpeed's loader found none)."""
    if is_replicated_checkpoint(path) and not (path / OPTIMIZER_PARAM_NAMES).exists():
        # Every rank refuses, before rank 0 would start a conversion the others wait for.
        raise RuntimeError(f"{path} is a stage-0 checkpoint of a bf16/fp16 run: its optimizer state has no "
                           "converter to ZeRO's layout, so it resumes only on stage 0")
    if is_replicated(engine):
        return _load_universal_replicated(engine, to_universal(path))
    if not hasattr(engine.optimizer, "load_hp_checkpoint_state_from_checkpoint_dir"):
        # DeepSpeed's FP16_Optimizer (fp16, and bf16 on CPU, at stage 0) has no universal loader.
        saved_stage, saved_world = saved_layout(path)
        raise RuntimeError(f"{path} was written under ZeRO-{saved_stage} on {saved_world} ranks: this engine's "
                           f"{type(engine.optimizer).__name__} cannot load it; resume with a ZeRO config or in fp32")
    universal = to_universal(path)
    # DeepSpeed reads this flag only while loading; set it for this load alone.
    engine._config.load_universal_checkpoint = True
    try:
        with safe_loading():
            _, client_state = engine.load_checkpoint(str(path), tag=universal.name)
    finally:
        engine._config.load_universal_checkpoint = False
    return client_state


def to_universal(path: Path, workers: int = 2) -> Path:
    """Rank 0 converts `path` to the universal format unless done before; the other ranks wait for its
    marker (a conversion of a large model may outlast any collective timeout)."""
    out = Path(path) / UNIVERSAL
    if _rank() == 0 and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        if is_replicated_checkpoint(path):
            _replicated_to_universal(Path(path), out)
        else:
            _zero_to_universal(Path(path), out, workers)
        atomic_write(out / COMPLETE, json.dumps({"from": str(path)}))
    wait_for_rank0(out / COMPLETE, f"the universal conversion of {path}")
    return out


def _zero_to_universal(path: Path, out: Path, workers: int) -> None:
    # DeepSpeed's converter, its forked workers too, under safe_loading. Imported, not run as __main__: its
    # process-pool workers pickle its functions by module name.
    run = ("import sys\nfrom deepspeed.checkpoint import ds_to_universal as convert\n"
           "from dpo_ds.checkpoint import safe_loading\nsys.argv[0] = 'ds_to_universal'\n"
           "with safe_loading():\n    convert.main(convert.parse_arguments())")
    cmd = [sys.executable, "-c", run, "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers), "--inject_missing_state"]
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")



def _replicated_to_universal(path: Path, out: Path) -> None:
    """A stage-0 checkpoint (whole weights and a torch optimizer's state in one file) in the layout
    `ds_to_universal` writes: `zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`, the global optimizer
    state in `zero/optimizer_state.pt`, and the model-states file under both ZeRO names."""
    states = read_state(path / MODEL_STATES)
    names, optimizer = json.loads((path / OPTIMIZER_PARAM_NAMES).read_text()), states["optimizer"]
    step = None
    for index, name in enumerate(names):
        weight = states["module"][name].float()
        state = optimizer["state"].get(index, {})
        folder = out / "zero" / name
        folder.mkdir(parents=True)
        torch.save({"param": weight}, folder / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": state.get(key, torch.zeros_like(weight)).float()}, folder / f"{key}.pt")
        step = state.get("step", step)
        if step is not None:
            torch.save(step, folder / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
    # ZeRO-3 reads the step and hyperparameters from the nested dict, ZeRO-1/2 the top-level groups and
    # the version of DeepSpeed that wrote the checkpoint.
    torch.save({"optimizer_state_dict": {"state": {0: {"step": step if step is not None else 0}},
                                         "param_groups": groups},
                "param_groups": groups, "ds_version": states["ds_version"]}, out / "zero" / "optimizer_state.pt")
    for name in (MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES):
        shutil.copyfile(path / MODEL_STATES, out / name)


def _load_universal_replicated(engine, universal: Path) -> dict[str, Any]:
    """Load a universal checkpoint into a stage-0 engine (DeepSpeed only loads it into ZeRO engines):
    whole weights and Adam states per parameter name, then the scheduler, counters and client state
    from the model-states file. Frozen parameters keep the values the model was loaded with."""
    optimizer = engine.optimizer
    zero = universal / "zero"
    global_state = read_state(zero / "optimizer_state.pt")
    nested = global_state.get("optimizer_state_dict", {})
    groups = global_state.get("param_groups") or nested.get("param_groups")
    names = optimizer_param_names(engine)
    params = dict(engine.module.named_parameters())
    state: dict[int, dict[str, Any]] = {}
    with torch.no_grad():
        for index, name in enumerate(names):
            folder = zero / name
            if not folder.is_dir():
                raise RuntimeError(f"universal checkpoint {universal} has no state for parameter {name!r}")
            param = params[name]

            def read(key: str) -> torch.Tensor:
                saved = read_state(folder / f"{key}.pt")
                saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's files hold the bare tensor
                return saved.view(param.shape).to(param.device)

            param.copy_(read("fp32"))
            step = read_state(folder / "step.pt") if (folder / "step.pt").exists() \
                else nested["state"][0]["step"]
            state[index] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(), "exp_avg": read("exp_avg"),
                            "exp_avg_sq": read("exp_avg_sq")}
    live = optimizer.state_dict()["param_groups"]
    loaded = [{**saved, "params": group["params"]} for saved, group in zip(groups, live)]
    optimizer.load_state_dict({"state": state, "param_groups": loaded})

    model_states = sorted(universal.glob("*" + MODEL_STATES))[0]
    checkpoint = read_state(model_states)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    engine.global_steps = checkpoint["global_steps"]
    engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = checkpoint["skipped_steps"]
    deepspeed_keys = {"module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "global_samples",
                      "dp_world_size", "mp_world_size", "data_sampler", "random_ltd"}
    return {k: v for k, v in checkpoint.items() if k not in deepspeed_keys}

