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

A checkpoint resumes on any number of ranks and any ZeRO stage: when its
layout differs from the engine's, it goes through DeepSpeed's universal format
(`<checkpoint>/universal`: one file per parameter and optimizer state, with a
marker of its own, not listed in the checkpoint's). A
stage-0 fp32 (replicated) checkpoint is converted by `_replicated_to_universal`,
any other by DeepSpeed's `ds_to_universal`; DeepSpeed's engines load the
universal format themselves, except a replicated one: `_load_universal_replicated`.
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
import subprocess
import sys
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


def _atomic_write(path: Path, text: str) -> None:
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
            _atomic_write(path / OPTIMIZER_PARAM_NAMES, json.dumps(optimizer_param_names(engine)))
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
            _atomic_write(root / "latest", tag)
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
    _atomic_write(path / COMPLETE, json.dumps({**fields, "files": digests}))


def last_complete(output_dir: str | Path) -> str:
    """A sentence naming the newest complete checkpoint, the one to resume from."""
    found = complete_checkpoints(output_dir)
    return f"the last complete checkpoint is {found[-1]}" if found else "there is no complete checkpoint"


def verify(path: str | Path) -> Optional[str]:
    """Why `path` is not a usable checkpoint, naming the file; None when every file matches its marker.

    Collective under a process group (the checksums are dealt over the ranks). A marker from before
    markers listed the files has nothing to check against: accepted.
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
    if files is None:
        return None
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
        with safe_loading():
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
            with safe_loading():
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
    """Rank 0 converts `path` to the universal format unless done before; the other ranks wait for its
    marker (a conversion of a large model may outlast any collective timeout)."""
    out = Path(path) / UNIVERSAL
    if _rank() == 0 and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        if is_replicated_checkpoint(path):
            _replicated_to_universal(Path(path), out)
        else:
            _zero_to_universal(Path(path), out, workers)
        _atomic_write(out / COMPLETE, json.dumps({"from": str(path)}))
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


def _load(file: Path) -> Any:
    """`torch.load` on the CPU, weights only, with the allowlist of DeepSpeed's types."""
    with safe_loading():
        return torch.load(file, map_location="cpu")


def _replicated_to_universal(path: Path, out: Path) -> None:
    """A stage-0 checkpoint (whole weights and a torch optimizer's state in one file) in the layout
    `ds_to_universal` writes: `zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`, the global optimizer
    state in `zero/optimizer_state.pt`, and the model-states file under both ZeRO names."""
    states = _load(path / _MODEL_STATES)
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
    global_state = _load(zero / "optimizer_state.pt")
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
                saved = _load(folder / f"{key}.pt")
                saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's files hold the bare tensor
                return saved.view(param.shape).to(param.device)

            param.copy_(read("fp32"))
            step = _load(folder / "step.pt") if (folder / "step.pt").exists() \
                else nested["state"][0]["step"]
            state[index] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(), "exp_avg": read("exp_avg"),
                            "exp_avg_sq": read("exp_avg_sq")}
    live = optimizer.state_dict()["param_groups"]
    loaded = [{**saved, "params": group["params"]} for saved, group in zip(groups, live)]
    optimizer.load_state_dict({"state": state, "param_groups": loaded})

    model_states = sorted(universal.glob("*" + _MODEL_STATES))[0]
    checkpoint = _load(model_states)
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
        full = _load(path / _MODEL_STATES)["module"]
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
