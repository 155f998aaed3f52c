"""Save, resume, rotate and export checkpoints.

Layout: `output_dir/checkpoint-<step>/` is what DeepSpeed's `save_checkpoint`
writes (tag = the directory name), plus `COMPLETE`, written by rank 0 only
after every rank has finished writing. `output_dir/latest` names the newest
complete checkpoint and is replaced atomically, so an interrupted save never
becomes the one a resume picks.
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
        _atomic_write(root / tag / COMPLETE, json.dumps({"step": step}))
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

    A checkpoint written by another number of data-parallel ranks is converted to
    DeepSpeed's universal format (once, kept in `<checkpoint>/universal`) and loaded
    from there: ZeRO optimizer shards only load on the world size that wrote them.
    """
    saved = saved_world_size(path)
    world = world_size()
    if saved is None or saved == world:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
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


def saved_world_size(path: Path) -> Optional[int]:
    """How many data-parallel ranks wrote a checkpoint: its ZeRO optimizer shards (None without ZeRO)."""
    return len(list(Path(path).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def to_universal(path: Path, workers: int = 2) -> Path:
    """Collective: rank 0 runs DeepSpeed's `ds_to_universal` on `path` unless done before; all ranks wait."""
    out = Path(path) / "universal"
    if _rank() == 0 and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        _atomic_write(out / COMPLETE, json.dumps({"from": str(path)}))
    _barrier()
    return out


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
    full = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    check_shapes(state, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _meta_model(config).save_pretrained(out, state_dict=state, safe_serialization=True)
    load_tokenizer(args.model_name_or_path, args).save_pretrained(out)
    return out
