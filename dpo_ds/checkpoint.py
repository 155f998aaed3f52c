"""Save, resume, rotate and export checkpoints.

Layout: `output_dir/checkpoint-<step>/` is what DeepSpeed's `save_checkpoint`
writes (tag = the directory name), plus `COMPLETE`, written by rank 0 only
after every rank has finished writing; it records the ZeRO stage and the number
of ranks that wrote the checkpoint. A stage-0 fp32 checkpoint also holds
`optimizer_param_names.json`, the names behind its optimizer's positional
state. `output_dir/latest` names the newest
complete checkpoint and is replaced atomically, so an interrupted save never
becomes the one a resume picks.

A checkpoint resumes on any number of ranks and any ZeRO stage: when its
layout differs from the engine's, it goes through DeepSpeed's universal format
(`<checkpoint>/universal`: one file per parameter and optimizer state). A
stage-0 fp32 (replicated) checkpoint is converted by `_replicated_to_universal`,
any other by DeepSpeed's `ds_to_universal`; DeepSpeed's engines load the
universal format themselves, except a replicated one: `_load_universal_replicated`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .distributed import barrier as _barrier, rank as _rank, world_size

COMPLETE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / COMPLETE).exists()]


def save(engine, output_dir: str | Path, step: int, client_state: dict, save_total_limit: Optional[int]) -> Path:
    """Collective: every rank writes its shards; rank 0 then marks the checkpoint complete."""
    root = Path(output_dir)
    tag = f"checkpoint-{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if _rank() == 0:
        if is_replicated(engine):
            # A replicated optimizer's state is keyed by position: keep the names to convert it later.
            _atomic_write(root / tag / OPTIMIZER_PARAM_NAMES, json.dumps(optimizer_param_names(engine)))
        layout = {"zero_stage": engine.zero_optimization_stage(), "world_size": world_size()}
        _atomic_write(root / tag / COMPLETE, json.dumps({"step": step, **layout}))
        _atomic_write(root / "latest", tag)
        if save_total_limit:
            for old in complete_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def resolve_resume(spec: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """`auto` -> the newest complete checkpoint in output_dir (None if there is none); a path -> that path."""
    if not spec:
        return None
    if spec == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r}: not a complete checkpoint directory (no {COMPLETE} marker); "
            f"complete ones in {output_dir}: {[p.name for p in complete_checkpoints(output_dir)]}"
        )
    return path


def load(engine, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and scheduler states; returns this rank's client state.

    A checkpoint written by another number of data-parallel ranks or another ZeRO
    stage is converted to DeepSpeed's universal format (once, kept in
    `<checkpoint>/universal`) and loaded from there: ZeRO optimizer shards only
    load on the world size and stage that wrote them.
    """
    saved_stage, saved_world = saved_layout(path)
    if saved_stage is None:  # written before the marker recorded the layout
        same_layout = saved_world in (None, world_size())
    elif is_replicated_checkpoint(path):  # loads on any number of stage-0 ranks
        same_layout = engine.zero_optimization_stage() == 0
    else:
        same_layout = (saved_stage, saved_world) == (engine.zero_optimization_stage(), world_size())
    if same_layout:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    elif is_replicated_checkpoint(path) and not (path / OPTIMIZER_PARAM_NAMES).exists():
        # Every rank refuses, before rank 0 would start a conversion the others wait for.
        raise RuntimeError(f"{path} is a stage-0 checkpoint of a bf16/fp16 run (or from before dpo_ds recorded "
                           "its optimizer's parameter names): its optimizer state has no converter to ZeRO's "
                           "layout, so it resumes only on stage 0")
    elif is_replicated(engine):
        client_state = _load_universal_replicated(engine, to_universal(path))
    elif not hasattr(engine.optimizer, "load_hp_checkpoint_state_from_checkpoint_dir"):
        # DeepSpeed's FP16_Optimizer (fp16, and bf16 on CPU, at stage 0) has no universal loader.
        raise RuntimeError(f"{path} was written under ZeRO-{saved_stage} on {saved_world} ranks: this engine's "
                           f"{type(engine.optimizer).__name__} cannot load it; resume with a ZeRO config or in fp32")
    else:
        universal = to_universal(path)
        # DeepSpeed reads this flag only while loading; set it for this load alone.
        engine._config.load_universal_checkpoint = True
        try:
            _, client_state = engine.load_checkpoint(str(path), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state


def saved_layout(path: Path) -> tuple[Optional[int], Optional[int]]:
    """(ZeRO stage, number of ranks) that wrote a checkpoint. Checkpoints from before the marker recorded
    them: (None, number of ZeRO optimizer shards), or (None, None) without ZeRO shards."""
    marker = json.loads((Path(path) / COMPLETE).read_text() or "{}")
    if "zero_stage" in marker:
        return int(marker["zero_stage"]), int(marker["world_size"])
    shards = len(list(Path(path).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    return None, shards or None


OPTIMIZER_PARAM_NAMES = "optimizer_param_names.json"
_MODEL_STATES = "mp_rank_00_model_states.pt"


def is_replicated(engine) -> bool:
    """A stage-0 fp32 engine: its optimizer works on the module's own parameters (DeepSpeed's bf16/fp16
    stage-0 optimizers keep flat fp32 copies instead)."""
    return engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled())


def is_replicated_checkpoint(path: Path) -> bool:
    """Written at stage 0 with whole weights and the optimizer's state in one model-states file (DeepSpeed's
    bf16 optimizer writes per-rank shard files even at stage 0)."""
    return saved_layout(path)[0] == 0 and not any(Path(path).glob("*optim_states.pt"))


def optimizer_param_names(engine) -> list[str]:
    """The names of a stage-0 engine's optimizer parameters, in the optimizer's order."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def to_universal(path: Path, workers: int = 2) -> Path:
    """Collective: rank 0 converts `path` to the universal format unless done before; all ranks wait."""
    out = Path(path) / "universal"
    if _rank() == 0 and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        if is_replicated_checkpoint(path):
            _replicated_to_universal(Path(path), out)
        else:
            _zero_to_universal(Path(path), out, workers)
        _atomic_write(out / COMPLETE, json.dumps({"from": str(path)}))
    _barrier()
    return out


def _zero_to_universal(path: Path, out: Path, workers: int) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers), "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def _replicated_to_universal(path: Path, out: Path) -> None:
    """A stage-0 checkpoint (whole weights and a torch optimizer's state in one file) in the layout
    `ds_to_universal` writes: `zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`, the global optimizer
    state in `zero/optimizer_state.pt`, and the model-states file under both ZeRO names."""
    states = torch.load(path / _MODEL_STATES, map_location="cpu", weights_only=False)
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
    for name in (_MODEL_STATES, "zero_pp_rank_0_" + _MODEL_STATES):
        shutil.copyfile(path / _MODEL_STATES, out / name)


def _load_universal_replicated(engine, universal: Path) -> dict[str, Any]:
    """Load a universal checkpoint into a stage-0 engine (DeepSpeed only loads it into ZeRO engines):
    whole weights and Adam states per parameter name, then the scheduler, counters and client state
    from the model-states file. Frozen parameters keep the values the model was loaded with."""
    optimizer = engine.optimizer
    zero = universal / "zero"
    global_state = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
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
                saved = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
                saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's files hold the bare tensor
                return saved.view(param.shape).to(param.device)

            param.copy_(read("fp32"))
            step = torch.load(folder / "step.pt", weights_only=False) if (folder / "step.pt").exists() \
                else nested["state"][0]["step"]
            state[index] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(), "exp_avg": read("exp_avg"),
                            "exp_avg_sq": read("exp_avg_sq")}
    live = optimizer.state_dict()["param_groups"]
    loaded = [{**saved, "params": group["params"]} for saved, group in zip(groups, live)]
    optimizer.load_state_dict({"state": state, "param_groups": loaded})

    model_states = sorted(universal.glob("*" + _MODEL_STATES))[0]
    checkpoint = torch.load(model_states, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    engine.global_steps = checkpoint["global_steps"]
    engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = checkpoint["skipped_steps"]
    deepspeed_keys = {"module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "global_samples",
                      "dp_world_size", "mp_world_size", "data_sampler", "random_ltd"}
    return {k: v for k, v in checkpoint.items() if k not in deepspeed_keys}


def consolidated_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """The full weights of the wrapped Hugging Face model, on rank 0 (None elsewhere).

    Collective under ZeRO-3: every rank must call it. Keys are those of the
    Hugging Face model (the `PreferenceModel` wrapper's "model." prefix dropped).
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if _rank() == 0 else None
    if state is None or _rank() != 0:
        return None
    return {k[len("model."):]: v.detach().cpu() for k, v in state.items() if k.startswith("model.")}


def check_shapes(state: dict[str, torch.Tensor], config) -> None:
    """Every tensor must have the shape the model config implies (no empty ZeRO shards)."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    wrong = [f"{k}: saved {tuple(v.shape)}, config says {expected.get(k)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    missing = [k for k in expected if k not in state and not _is_tied(k, config)]
    if wrong or missing:
        raise RuntimeError("refusing to export inconsistent weights:\n  " + "\n  ".join(wrong + [
            f"{k}: missing" for k in missing]))


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """An export never holds a NaN or an infinity: refuse naming the tensors (a diverged run)."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise RuntimeError(f"refusing to export non-finite weights: {len(bad)} tensor(s) hold NaN or inf, "
                           f"first {bad[:5]}")


def _meta_model(config):
    """The model's skeleton on the meta device (no memory), never under ZeRO-3 initialization."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    active = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = active


def _is_tied(key: str, config) -> bool:
    return key == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def export_hf(engine, model, tokenizer, out_dir: str | Path) -> Optional[Path]:
    """Write the policy in Hugging Face format (safetensors, config, tokenizer, chat template).

    Collective: every rank gathers, so no rank waits on a gather another skipped.
    """
    state = consolidated_state_dict(engine)
    if _rank() == 0:
        check_shapes(state, model.config)
        check_finite(state)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    _barrier()
    return Path(out_dir)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """`dpo-ds export`: a saved checkpoint -> Hugging Face directory, in one process, any world size.

    The run's `config.yaml` (beside the checkpoint) names the model, whose config and tokenizer are
    saved with the consolidated fp32 weights.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    from .config import DPOConfig
    from .models import load_tokenizer, resolve_model_path

    path = Path(checkpoint_dir)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete dpo_ds checkpoint (no {COMPLETE} marker)")
    run_config = path.parent / "config.yaml"
    if not run_config.exists():
        raise FileNotFoundError(f"{run_config} (the run's resolved config) is missing: cannot tell the model")
    args = DPOConfig.load(str(run_config))
    model_path = resolve_model_path(args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    if is_replicated_checkpoint(path):  # the whole weights are in the model-states file
        full = torch.load(path / _MODEL_STATES, map_location="cpu", weights_only=False)["module"]
        full = {k: v.float() for k, v in full.items()}
    else:
        full = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    check_shapes(state, config)
    check_finite(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _meta_model(config).save_pretrained(out, state_dict=state, safe_serialization=True)
    load_tokenizer(args.model_name_or_path, args).save_pretrained(out)
    return out
