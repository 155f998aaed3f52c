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
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    """Restore model, optimizer and scheduler states; returns this rank's client state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state


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
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    # A plain skeleton on the meta device: ZeRO-3 initialization must not run on it.
    active = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = active
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    wrong = [f"{k}: saved {tuple(v.shape)}, config says {expected.get(k)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    missing = [k for k in expected if k not in state and not _is_tied(k, config)]
    if wrong or missing:
        raise RuntimeError("refusing to export inconsistent weights:\n  " + "\n  ".join(wrong + [
            f"{k}: missing" for k in missing]))


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
