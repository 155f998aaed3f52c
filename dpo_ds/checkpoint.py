"""Save, verify, resume, rotate and export checkpoints.

Layout: `output_dir/checkpoint-<step>/` is what DeepSpeed's `save_checkpoint`
writes (tag = the directory name), plus `COMPLETE`, written by rank 0 only
after every rank has finished writing and every file is fsynced; it records the
ZeRO stage, the number of ranks that wrote the checkpoint, and every file of the
checkpoint with its size and xxh64 checksum, so a truncated, corrupted or missing
file is found before anything loads it (`verify`). The marker and the directory
are fsynced before the marker counts. A stage-0 fp32 checkpoint also holds
`optimizer_param_names.json`, the names behind its optimizer's positional
state. `output_dir/latest` names the newest
complete checkpoint and is replaced atomically, so an interrupted save never
becomes the one a resume picks.

A checkpoint resumes on any number of ranks and any ZeRO stage: `load` reads one
of the same layout directly and hands any other to `dpo_ds.convert`, which goes
through DeepSpeed's universal format (`<checkpoint>/universal`, derived, with a
marker of its own, not listed in the checkpoint's).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import xxhash

from .distributed import barrier as _barrier, rank as _rank, wait_for_rank0, world_size

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the checkpoint and the file."""


def _allowed_globals() -> list:
    """What DeepSpeed's and dpo_ds's checkpoints hold besides tensors and plain containers: DeepSpeed's
    loss scaler, ZeRO stage and fragment records, and the numpy arrays of the saved RNG state."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
            np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def safe_loading():
    """Every `torch.load` inside, DeepSpeed's included (which asks for weights_only=False), unpickles with
    weights_only=True and the allowlist: a checkpoint someone else wrote cannot run code here."""
    original = torch.load

    def weights_only_load(file, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return original(file, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"refusing to load {file}: it holds a Python object outside the types a "
                                  f"checkpoint needs ({str(err).strip().splitlines()[0]})") from err

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the storage (a read-only descriptor will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the directory: after a crash, the old text or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if not dist.is_initialized() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_files(path: Path) -> list[str]:
    """The files of a checkpoint, relative and sorted: all but the marker and the derived `universal/`."""
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")
                  if p.is_file() and p.name != COMPLETE and p.relative_to(path).parts[0] != UNIVERSAL)


def _file_digest(file: Path) -> list:
    """[size, xxh64 hex] of one file, read in 16 MiB chunks."""
    digest, size = xxhash.xxh64(), 0
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return [size, digest.hexdigest()]


def _digests(path: Path, files: list[str]) -> dict[str, list]:
    """{file: [size, xxh64]}; collective under a process group: the files are dealt over the ranks."""
    mine = {rel: _file_digest(path / rel) for rel in files[_rank()::world_size()]}
    if dist.is_initialized() and world_size() > 1:
        parts: list[Any] = [None] * world_size()
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return mine


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint directory was saved at (from its name `checkpoint-<step>`)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (its name is not checkpoint-<step>)")
    return int(match.group(1))


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every checkpoint-<step> directory, complete or not, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_dir()), key=checkpoint_step)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories with a COMPLETE marker, oldest first (unverified: see `verify`)."""
    return [p for p in checkpoint_dirs(output_dir) if (p / COMPLETE).exists()]


def _no_space(err: Optional[BaseException]) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or torch's zip writer's "unexpected pos" after it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left" in str(err) or "unexpected pos" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def begin_save(output_dir: str | Path, step: int) -> None:
    """Collective, before anything of step `step` is written: an older save of the same step loses its
    marker and its universal conversion, so a half-overwritten directory never passes for complete."""
    path = Path(output_dir) / f"checkpoint-{step}"
    if _rank() == 0 and path.exists():
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path / UNIVERSAL, ignore_errors=True)
        _fsync(path)
    _barrier()


def save(engine, output_dir: str | Path, step: int, client_state: dict, save_total_limit: Optional[int],
         best: Optional[str] = None, model_only: bool = False, keep: Optional[Path] = None) -> Path:
    """Collective: every rank writes its shards and fsyncs them; rank 0 then marks the checkpoint complete.

    `model_only` (transformers' `save_only_model`): no DeepSpeed state at all, only the model directory the
    caller wrote into the checkpoint; such a checkpoint cannot be resumed. Rotation (`save_total_limit`)
    never deletes `best` nor `keep`, the checkpoint this run resumed from. A full disk raises
    CheckpointError naming the checkpoint; the earlier ones are left as they were.
    """
    root = Path(output_dir)
    tag = f"checkpoint-{step}"
    path = root / tag
    try:
        if _rank() == 0 and is_replicated(engine) and not model_only:
            # A replicated optimizer's state is keyed by position: keep the names to convert it later.
            path.mkdir(parents=True, exist_ok=True)
            atomic_write(path / OPTIMIZER_PARAM_NAMES, json.dumps(optimizer_param_names(engine)))
        if not model_only:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        files = _from_rank0(checkpoint_files(path) if _rank() == 0 else None)
        for rel in files:  # each rank flushes what it wrote (a no-op for files clean on this node)
            _fsync(path / rel)
        _barrier()
        digests = _digests(path, files)
        if _rank() == 0:
            marker = {"step": step, "zero_stage": engine.zero_optimization_stage(), "world_size": world_size()}
            if model_only:
                marker[MODEL_ONLY] = True
            write_marker(path, marker, digests)
            atomic_write(root / "latest", tag)
            rotate(root, save_total_limit, best, keep)
    except Exception as err:
        raise_if_no_space(err, path)
        raise
    _barrier()
    return path


def raise_if_no_space(err: BaseException, path: Path) -> None:
    """A write into checkpoint `path` that ran out of disk -> CheckpointError in one line naming it."""
    if _no_space(err):
        raise CheckpointError(f"saving checkpoint {path} failed: no space left on device ({err.__class__.__name__}); "
                              f"it has no {COMPLETE} marker and will be skipped; {last_complete(path.parent)}") from err


def write_marker(path: Path, fields: dict, digests: Optional[dict] = None) -> None:
    """`path/COMPLETE`: `fields` and every file with its size and checksum; the files, their folders, the
    marker and the directory fsynced first, so that the marker never counts before the data does.
    Without `digests`, this process (one rank) fsyncs and checksums the files itself."""
    files = checkpoint_files(path)
    if digests is None:
        for rel in files:
            _fsync(path / rel)
        digests = {rel: _file_digest(path / rel) for rel in files}
    for folder in sorted({(path / rel).parent for rel in files}, reverse=True):
        _fsync(folder)
    atomic_write(path / COMPLETE, json.dumps({**fields, "files": digests}))


def last_complete(output_dir: str | Path) -> str:
    """A sentence naming the newest complete checkpoint, the one to resume from."""
    found = complete_checkpoints(output_dir)
    return f"the last complete checkpoint is {found[-1]}" if found else "there is no complete checkpoint"


def verify(path: str | Path) -> Optional[str]:
    """Why `path` is not a usable checkpoint, naming the file; None when every file matches its marker.

    Collective under a process group (the checksums are dealt over the ranks).
    """
    path = Path(path)
    marker_file = path / COMPLETE
    if not marker_file.is_file():
        return f"no {COMPLETE} marker in {path} (an interrupted save)"
    try:
        marker = json.loads(marker_file.read_text() or "{}")
    except ValueError:
        return f"{marker_file} is not valid JSON"
    files = marker.get("files")
    if not isinstance(files, dict):
        return f"{marker_file} lists no files to check (not a marker this version writes)"
    for rel, (size, _) in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, its marker says {size} (truncated or rewritten)"
    digests = _digests(path, sorted(files))
    for rel, (_, checksum) in sorted(files.items()):
        if digests[rel][1] != checksum:
            return f"{path / rel} does not match its checksum (xxh64 {digests[rel][1]}, marker {checksum}): corrupted"
    return None


MODEL_ONLY = "model_only"  # the COMPLETE marker's key of a save_only_model checkpoint


def rotate(root: Path, save_total_limit: Optional[int], best: Optional[str], keep: Optional[Path] = None) -> None:
    """transformers' `rotate_checkpoints`: delete the oldest complete checkpoints beyond `save_total_limit`,
    never the newest (to resume from), the best (`load_best_model_at_end`) nor `keep` (the checkpoint this
    run resumed from), so up to 3 may stay with a limit of 1."""
    if not save_total_limit:
        return
    found = complete_checkpoints(root)
    protected = {found[-1].name, Path(best).name if best else None,
                 Path(keep).name if keep else None} - {None} if found else set()
    keep, remaining = max(save_total_limit, len(protected)), len(found)
    for old in found:
        if remaining <= keep:
            break
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
            remaining -= 1


def resolve_resume(spec: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """`auto` -> the newest checkpoint in output_dir that verifies (None if there is none), with a warning
    naming each newer one skipped and why; a path -> that path, refused when it does not verify.
    Collective under a process group (see `verify`)."""
    if not spec:
        return None
    if spec == "auto":
        for path in reversed(checkpoint_dirs(output_dir)):
            reason = verify(path)
            if reason is None:
                break
            if _rank() == 0:
                logger.warning("resume_from_checkpoint=auto: skipping %s: %s", path, reason)
        else:
            return None
    else:
        path = Path(spec)
        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"resume_from_checkpoint={spec!r}: {reason}; complete checkpoints in "
                                  f"{output_dir}: {[p.name for p in complete_checkpoints(output_dir)]}")
    if json.loads((path / COMPLETE).read_text() or "{}").get(MODEL_ONLY):
        raise ValueError(f"resume_from_checkpoint: {path} was saved with save_only_model=True: it holds the model "
                         "only, without the optimizer, scheduler and RNG states a resume needs")
    return path


def set_aside_newer(output_dir: str | Path, resumed: Optional[Path]) -> None:
    """Collective: move the checkpoints newer than the one resumed from (all of them when none was) to
    `output_dir/abandoned-<UTC time>/`, with a warning: they belong to a run this one replaces, and
    neither rotation nor a later `auto` may prefer them to what this run writes."""
    if _rank() == 0:
        step = checkpoint_step(resumed) if resumed is not None else -1
        newer = [p for p in checkpoint_dirs(output_dir) if checkpoint_step(p) > step]
        if newer:
            aside = Path(output_dir) / time.strftime("abandoned-%Y%m%dT%H%M%SZ", time.gmtime())
            aside.mkdir(exist_ok=True)
            for p in newer:
                os.replace(p, aside / p.name)
            _fsync(Path(output_dir))
            (Path(output_dir) / "latest").unlink(missing_ok=True)
            logger.warning("resuming from %s: moved the newer checkpoints %s aside to %s", resumed,
                           [p.name for p in newer], aside)
    _barrier()



def load(engine, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and scheduler states; returns this rank's client state.

    A checkpoint written by another number of data-parallel ranks or another ZeRO stage goes through
    `dpo_ds.convert` (DeepSpeed's universal format): ZeRO optimizer shards only load on the world size
    and stage that wrote them.
    """
    if same_layout(engine, path):
        with safe_loading():
            _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    else:
        from .convert import load_converted  # convert builds on this module: imported here, not at the top

        client_state = load_converted(engine, path)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state


def same_layout(engine, path: Path) -> bool:
    """Whether `engine` loads `path` as it was written: a replicated checkpoint into any stage-0 engine,
    any other into an engine of the same ZeRO stage on the same number of ranks."""
    if is_replicated_checkpoint(path):
        return engine.zero_optimization_stage() == 0
    return saved_layout(path) == (engine.zero_optimization_stage(), world_size())


def saved_layout(path: Path) -> tuple[int, int]:
    """(ZeRO stage, number of ranks) that wrote a checkpoint, from its COMPLETE marker."""
    marker_file = Path(path) / COMPLETE
    marker = json.loads(marker_file.read_text() or "{}")
    if "zero_stage" not in marker or "world_size" not in marker:
        raise CheckpointError(f"{marker_file} records no zero_stage and world_size: not a dpo_ds checkpoint marker")
    return int(marker["zero_stage"]), int(marker["world_size"])


OPTIMIZER_PARAM_NAMES = "optimizer_param_names.json"
MODEL_STATES = "mp_rank_00_model_states.pt"


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


def read_state(file: Path) -> Any:
    """`torch.load` on the CPU, weights only, with the allowlist of DeepSpeed's types."""
    with safe_loading():
        return torch.load(file, map_location="cpu")


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
    from transformers.integrations import deepspeed as hf_ds

    from .vision import auto_model_class

    active = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            return auto_model_class(config).from_config(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = active


def _is_tied(key: str, config) -> bool:
    return key == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def export_hf(engine, model, tokenizer, out_dir: str | Path, marker: bool = True) -> Optional[Path]:
    """Write the policy in Hugging Face format (safetensors, config, tokenizer, chat template).

    Collective: every rank gathers, so no rank waits on a gather another skipped. The export gets a
    `COMPLETE` marker of its own (files, sizes, checksums, as a checkpoint's): a directory without it is
    an interrupted export. The other ranks wait for the marker, not in a collective that could time out.
    Inside a checkpoint (`marker=False`) only the checkpoint's own marker may count, so none is written.
    """
    out = Path(out_dir)
    if _rank() == 0 and marker:
        (out / COMPLETE).unlink(missing_ok=True)  # an older export here is being replaced
    _barrier()
    state = consolidated_state_dict(engine)
    if _rank() == 0:
        check_shapes(state, model.config)
        check_finite(state)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if marker:
            write_marker(out, {})
    if marker:
        wait_for_rank0(out / COMPLETE, f"the export to {out}")
    else:
        _barrier()
    return out


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """`dpo-ds export`: a saved checkpoint -> Hugging Face directory, in one process, any world size.

    The run's `config.yaml` (beside the checkpoint) names the model, whose config and tokenizer are
    saved with the consolidated fp32 weights. Whether the model's own code may run is the caller's
    `trust_remote_code`, never that config's: the directory may come from someone else.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    from .config import DPOConfig
    from .models import resolve_model_path
    from .vision import load_processing_class

    path = Path(checkpoint_dir)
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a usable dpo_ds checkpoint: {reason}")
    run_config = path.parent / "config.yaml"
    if not run_config.exists():
        raise FileNotFoundError(f"{run_config} (the run's resolved config) is missing: cannot tell the model")
    args = DPOConfig.load(str(run_config))
    args.trust_remote_code = trust_remote_code
    model_path = resolve_model_path(args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    if is_replicated_checkpoint(path):  # the whole weights are in the model-states file
        full = read_state(path / MODEL_STATES)["module"]
        full = {k: v.float() for k, v in full.items()}
    else:
        with safe_loading():
            full = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    check_shapes(state, config)
    check_finite(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _meta_model(config).save_pretrained(out, state_dict=state, safe_serialization=True)
    load_processing_class(args.model_name_or_path, args).save_pretrained(out)
    return out
