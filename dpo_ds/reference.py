"""Reference log-probs: where they come from, decided once per run by `build_reference`.

- `NoReference` (the base): none at all, for the reference-free losses; no
  reference model is ever built.
- `EngineReference`: a forward of an inference-only engine (ZeRO-3,
  parameters offloadable), under no_grad. With TR-DPO (`sync_ref_model`) its
  weights move towards the policy's every `ref_model_sync_steps` steps.
- `AdapterReference`: the LoRA policy itself with its adapters disabled, or
  with the frozen copy of the adapter the run started from: no second model.
- `CachedReference`: values computed once, by one of the two above, over the
  train and eval sets (`precompute`), then read by row index: training runs
  with no reference model in memory.

Sequence log-probs always come from `pair_logps`, the same per-row math for
the policy, an online reference and the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from . import preemption
from .builtin.model import cache_dir
from .distributed import barrier as _barrier, rank as _rank, world_size as _world
from .engines import build_reference_engine, hf_deepspeed_config, mix_weights, release_gathered, weights_digest
from .losses import PairLogps, needs_reference
from .models import REFERENCE_ADAPTER, TRAINABLE_ADAPTER, is_peft_model
from .ops import sequence_logps

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever what a cache holds changes meaning, so an old cache is never read as a new one."""
_DATA_COLUMNS = ("row_index", "prompt_ids", "chosen_ids", "rejected_ids",
                 "prompt_loss_mask", "chosen_loss_mask", "rejected_loss_mask")
# DPOConfig fields that change the reference's values for the same token ids and weights.
_VALUE_SETTINGS = ("temperature", "logit_softcap", "ld_alpha", "attn_implementation", "bf16", "fp16")
# ... and those that decide the token ids and which of them are scored (already in the data fingerprint: the ids
# and the loss masks; kept so the manifest tells).
_TOKEN_SETTINGS = ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode", "eos_token",
                   "chat_template_path", "completion_only_loss", "assistant_only_loss")


def pair_logps(token_logps: Tensor, mask: Tensor, ld_alpha: Optional[float] = None,
               log_sum_sq_probs: Optional[Tensor] = None) -> PairLogps:
    """Per-pair sequence log-probs from per-token ones.

    token_logps, mask: [2B, T-1], chosen rows then rejected rows; mask is the
    batch's completion_mask (the scored tokens) shifted to the label
    positions, so lengths are scored-token counts. With `log_sum_sq_probs` the
    WPO terms (mean over scored tokens of logp - log sum_v p_v^2) are filled
    in too.
    """
    seq = sequence_logps(token_logps, mask, ld_alpha)
    lengths = mask.sum(1)
    wpo = None
    if log_sum_sq_probs is not None:
        wpo = ((token_logps - log_sum_sq_probs).detach() * mask).sum(1) / lengths.clamp(min=1)
    chosen, rejected = seq.chunk(2)
    lc, lr = lengths.chunk(2)
    wc, wr = wpo.chunk(2) if wpo is not None else (None, None)
    return PairLogps(chosen, rejected, lc, lr, wc, wr)


def label_mask(inputs: dict) -> Tensor:
    """The batch's completion mask at the label positions [2B, T-1]: which per-token log-probs are scored."""
    return inputs["completion_mask"][:, 1:].to(torch.float32)


class NoReference:
    """No reference model: the reference-free losses."""

    def pair_logps(self, inputs: dict, row_index: Optional[Tensor], split: str) -> Optional[PairLogps]:
        """The reference's PairLogps for a batch (`inputs` as PreferenceModel takes them), or None."""
        return None

    def after_step(self, step: int) -> None:
        """Called after every optimizer step."""

    def save(self, directory: Path) -> None:
        """Write what a resumed run needs into a checkpoint directory (collective)."""

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (collective)."""


class _OnlineReference(NoReference):
    """A model forward per batch, in eval mode and without gradients.

    `engine` is a DeepSpeed engine around a PreferenceModel, or a bare PreferenceModel.
    """

    def __init__(self, engine, ld_alpha: Optional[float]):
        self.engine = engine
        self.module = getattr(engine, "module", engine)
        self.ld_alpha = ld_alpha

    def _context(self):
        return contextlib.nullcontext()

    def token_logps(self, inputs: dict) -> Tensor:
        """Per-token reference log-probs [2B, T-1] (0 outside the completions)."""
        was_training = self.engine.training
        self.engine.eval()
        try:
            with torch.no_grad(), self._context():
                return self.engine(**inputs, with_stats=False).logps
        finally:
            self.engine.train(was_training)

    def pair_logps(self, inputs: dict, row_index: Optional[Tensor], split: str) -> PairLogps:
        return pair_logps(self.token_logps(inputs), label_mask(inputs), self.ld_alpha)

    def identity(self) -> list[tuple[str, Any]]:
        """The (name, parameter) pairs this reference's values depend on: hashed into the cache key."""
        return list(self.module.named_parameters())


class EngineReference(_OnlineReference):
    """A separate inference engine (or, for a precomputation, the policy before its first step).

    With `sync_every`, TR-DPO: after every `sync_every` optimizer steps the
    reference becomes alpha * policy + (1 - alpha) * reference (arXiv 2404.09656).
    """

    def __init__(self, engine, ld_alpha: Optional[float], policy=None, alpha: float = 0.0, sync_every: int = 0):
        super().__init__(engine, ld_alpha)
        self.policy, self.alpha, self.sync_every = policy, alpha, sync_every

    def after_step(self, step: int) -> None:
        if self.sync_every and step % self.sync_every == 0:
            release_gathered(self.engine)
            release_gathered(self.policy)
            mix_weights(self.module, getattr(self.policy, "module", self.policy), self.alpha)

    def _state_file(self, directory: Path) -> Path:
        return Path(directory) / f"reference_rank{_rank()}_of_{_world()}.pt"

    def save(self, directory: Path) -> None:
        """TR-DPO's moved reference: each rank writes its own ZeRO-3 partitions (rank 0 all of a replicated one)."""
        if not self.sync_every:
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {name: _local(p).detach() for name, p in self.module.named_parameters()}
        torch.save(state, self._state_file(directory))

    def load(self, directory: Path) -> None:
        if not self.sync_every:
            return
        path = self._state_file(directory)
        if not path.exists():
            raise FileNotFoundError(f"{directory} holds no TR-DPO reference weights for rank {_rank()} of "
                                    f"{_world()} ({path.name}): resume sync_ref_model runs on the same number of ranks")
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                _local(param).copy_(state[name])


def _local(param) -> Tensor:
    """This rank's own storage of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class AdapterReference(_OnlineReference):
    """The LoRA policy as its own reference: adapters disabled, or the frozen starting adapter active."""

    def __init__(self, engine, ld_alpha: Optional[float]):
        super().__init__(engine, ld_alpha)
        self.peft_model = self.module.model
        self.adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in self.peft_model.peft_config else None

    @contextlib.contextmanager
    def _context(self):
        if self.adapter is None:
            with self.peft_model.disable_adapter():
                yield
            return
        self.peft_model.set_adapter(self.adapter, inference_mode=True)
        try:
            yield
        finally:
            self.peft_model.set_adapter(TRAINABLE_ADAPTER)

    def identity(self) -> list[tuple[str, Any]]:
        """Base weights (and the reference adapter), never the adapter being trained."""
        return [(n, p) for n, p in super().identity() if f".{TRAINABLE_ADAPTER}." not in n
                and (self.adapter is not None or "lora_" not in n)]


class CachedReference(NoReference):
    """Precomputed sequence log-probs, looked up by the rows' `row_index`.

    tables: split -> [rows, 2] float32 (chosen, rejected) at row_index, NaN where absent.
    """

    def __init__(self, tables: dict[str, Tensor], directories: dict[str, Path]):
        self.tables, self.directories = tables, directories

    def pair_logps(self, inputs: dict, row_index: Optional[Tensor], split: str) -> PairLogps:
        if row_index is None:
            raise ValueError("precomputed reference log-probs need the batch's row_index")
        table = self.tables[split]
        rows = row_index.cpu()
        values = table[rows.clamp(max=len(table) - 1)]
        missing = (rows >= len(table)) | values.isnan().any(1)
        if missing.any():
            raise RuntimeError(f"the reference cache {self.directories[split]} has no values for {split} rows "
                               f"{rows[missing].tolist()}")
        mask = label_mask(inputs)
        values = values.to(mask.device)
        lc, lr = mask.sum(1).chunk(2)
        return PairLogps(values[:, 0], values[:, 1], lc, lr)


# ----------------------------------------------------------------------------- the cache

def dataset_fingerprint(dataset) -> str:
    """SHA-256 of the tokenized rows (row_index, the prompt/chosen/rejected ids and loss masks, and the encoded
    images of a vision split): exact, and the same in every process that tokenizes the same data with the
    same settings."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    table = dataset.select_columns(list(_DATA_COLUMNS)).with_format("arrow")
    for batch in table.iter(batch_size=65536):
        for name in _DATA_COLUMNS:
            column = batch[name]
            if name != "row_index":
                digest.update(np.asarray(pc.list_value_length(column), dtype=np.int64).tobytes())
                column = pc.list_flatten(column)
            digest.update(np.asarray(column, dtype=np.int64).tobytes())
    if "images" in dataset.column_names:
        for images in dataset.select_columns(["images"]).with_format("arrow").iter(batch_size=1024):
            for row in images["images"].to_pylist():
                digest.update(np.asarray([len(row)] + [len(image) for image in row], dtype=np.int64).tobytes())
                for image in row:
                    digest.update(image)
    return digest.hexdigest()


def cache_key(args, dataset, model_digest: str, image_settings: Optional[str] = None) -> dict:
    """Everything a split's reference values depend on: data content, model weights, settings.

    ``image_settings``: the digest of a vision model's image-processor settings, which turn the
    images (in the data fingerprint) into pixels.
    """
    settings = {name: getattr(args, name, None) for name in _VALUE_SETTINGS + _TOKEN_SETTINGS}
    settings["model_init_dtype"] = str((args.model_init_kwargs or {}).get("dtype", "float32"))
    key = {"format": CACHE_FORMAT, "model": model_digest, "data": dataset_fingerprint(dataset), "settings": settings}
    if image_settings is not None:
        key["image_processor"] = image_settings
    return key


def cache_directory(args, key: dict) -> Path:
    root = Path(args.ref_cache_dir) if args.ref_cache_dir else cache_dir() / "ref_logps"
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / name


def _read_parts(directory: Path) -> tuple[Tensor, Tensor]:
    """(row_index [n], logps [n, 2]) of every finished part file."""
    parts = [torch.load(p, weights_only=True) for p in sorted(directory.glob("part-*.pt"))]
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)
    return torch.cat([p["row_index"] for p in parts]), torch.cat([p["logps"] for p in parts])


def _write_part(directory: Path, rows: list[int], values: list[Tensor]) -> None:
    path = directory / f"part-{rows[0]:012d}.pt"
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    torch.save({"row_index": torch.tensor(rows, dtype=torch.long), "logps": torch.cat(values).float()}, tmp)
    os.replace(tmp, path)


def _remove_stale_parts(directory: Path) -> None:
    """Delete the temporary part files of writers on this host that died before renaming them (a killed
    pass); a live writer's, or another host's on shared storage, stay."""
    host = socket.gethostname()
    for tmp in directory.glob(f".part-*.{host}.*.tmp"):
        pid = int(tmp.name.rsplit(".", 2)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def precompute(source: _OnlineReference, dataset, directory: Path, batches: Callable[[list[dict]], dict],
               batch_size: int, flush_rows: int = 1024) -> Tensor:
    """Reference log-probs of every row of `dataset`, cached in `directory`; returns the table.

    Collective. The rows not yet in the cache are dealt round-robin over the
    ranks (every rank runs the same number of forwards, as ZeRO-3 needs), and
    each rank writes its results every `flush_rows` rows as an atomically
    renamed part file, so an interrupted pass resumes where it stopped.
    `batches(rows)` turns dataset rows into PreferenceModel inputs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        _remove_stale_parts(directory)
    _barrier()
    done = set(_read_parts(directory)[0].tolist())
    row_index = [int(r) for r in dataset.with_format("numpy")["row_index"]]
    todo = [i for i, r in enumerate(row_index) if r not in done]
    if todo and _rank() == 0:
        logger.info("precomputing reference log-probs of %d rows into %s", len(todo), directory)
    todo += [-1] * (-len(todo) % _world())
    mine = todo[_rank()::_world()]
    _barrier()
    rows: list[int] = []
    values: list[Tensor] = []
    # A DeepSpeed engine knows its device (an offloaded one keeps parameters on the CPU); a bare module, its
    # parameters' device.
    device = getattr(source.engine, "device", None) or next(source.engine.parameters()).device
    for start in range(0, len(mine), batch_size):
        if preemption.requested(device):  # collective: every rank stops at the same batch
            if rows:
                _write_part(directory, rows, values)
            _barrier()
            preemption.stop(f"stopped the reference precomputation into {directory}, the rows done so far saved")
        slots = mine[start:start + batch_size]
        inputs = batches([dataset[i if i >= 0 else 0] for i in slots])
        out = pair_logps(source.token_logps(inputs), label_mask(inputs), source.ld_alpha)
        real = torch.tensor([i >= 0 for i in slots])
        rows += [row_index[i] for i in slots if i >= 0]
        values.append(torch.stack([out.chosen, out.rejected], 1).cpu()[real])
        if len(rows) >= flush_rows:
            _write_part(directory, rows, values)
            rows, values = [], []
    if rows:
        _write_part(directory, rows, values)
    _barrier()
    return load_table(directory, row_index)


def load_table(directory: Path, row_index: list[int]) -> Tensor:
    """The cached values as a [max row_index + 1, 2] table; every row of the split must be there."""
    cached_rows, cached = _read_parts(directory)
    table = torch.full((max(row_index, default=-1) + 1, 2), float("nan"))
    known = cached_rows < len(table)
    table[cached_rows[known]] = cached[known]
    wanted = torch.tensor(row_index, dtype=torch.long)
    missing = wanted[table[wanted].isnan().any(1)].tolist()
    if missing:
        raise RuntimeError(f"reference cache {directory} lacks {len(missing)} rows (first: {missing[:5]}); with "
                           "several nodes, ref_cache_dir must be on storage that every node shares")
    return table


def precomputed(source: _OnlineReference, args, splits: dict, batches: Callable[[list[dict]], dict],
                batch_sizes: dict[str, int], image_settings: Optional[str] = None) -> CachedReference:
    """Look up (or compute and store) the cached reference log-probs of each split. Collective."""
    release_gathered(source.engine)
    model_digest = weights_digest(source.identity())
    tables, directories = {}, {}
    for split, dataset in splits.items():
        key = cache_key(args, dataset, model_digest, image_settings)
        directory = cache_directory(args, key)
        if _rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        with preemption.phase("precompute"):
            tables[split] = precompute(source, dataset, directory, batches, args.precompute_ref_batch_size
                                       or batch_sizes[split])
        directories[split] = directory
        if _rank() == 0:
            logger.info("reference log-probs of the %s split: %s", split, directory)
    return CachedReference(tables, directories)


# ----------------------------------------------------------------------------- choosing

def online_reference(engine, args) -> _OnlineReference:
    """The reference read from `engine`'s model: with its adapters disabled when it is a LoRA model."""
    if is_peft_model(engine.module.model):
        return AdapterReference(engine, args.ld_alpha)
    return EngineReference(engine, args.ld_alpha)


def load_reference_engine(load_reference: Callable[[], Any], args, ref_ds_config: dict):
    """`load_reference()`'s model in its own inference engine, loaded under the reference's ZeRO settings."""
    zero3_settings = hf_deepspeed_config(ref_ds_config)  # kept alive while the model loads: a weak reference
    engine = build_reference_engine(load_reference(), args, ref_ds_config)
    del zero3_settings
    return engine


def build_reference(args, policy, load_reference: Callable[[], Any], ref_ds_config: dict,
                    splits: dict, batches: Callable[[list[dict]], dict],
                    batch_sizes: dict[str, int], separate_model: bool,
                    image_settings: Optional[str] = None) -> tuple[NoReference, Any]:
    """The run's reference strategy and the reference engine it keeps alive (None when there is none).

    `load_reference()` loads the reference model (called only when one is
    needed); `separate_model` says whether it differs from the policy's
    starting point. For a precomputation without a separate model, the policy
    engine itself, before its first step, is the reference: no second model is
    loaded at all. ``image_settings``: see ``cache_key``.
    """
    if not needs_reference(args):
        return NoReference(), None
    if is_peft_model(policy.module.model) or (args.precompute_ref_log_probs and not separate_model):
        online, engine = online_reference(policy, args), None
    else:
        engine = load_reference_engine(load_reference, args, ref_ds_config)
        online = EngineReference(engine, args.ld_alpha, policy, args.ref_model_mixup_alpha,
                                 args.ref_model_sync_steps if args.sync_ref_model else 0)
    if not args.precompute_ref_log_probs:
        return online, engine
    cached = precomputed(online, args, splits, batches, batch_sizes, image_settings)
    if engine is not None:
        engine.destroy()
    return cached, None
