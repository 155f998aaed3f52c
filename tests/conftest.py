"""Shared fixtures: the built-in tokenizer and model, and tiny real models built from config."""
import glob
import os
import socket

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

from dpo_ds.builtin.model import builtin_model_dir as _builtin_model_dir  # noqa: E402
from dpo_ds.models import load_tokenizer  # noqa: E402


SHM_PORTS: set[int] = set()


def launcher_port() -> int:
    """A free port for a launcher's --master_port; the session's cleanup knows its DeepSpeed shm buffers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    SHM_PORTS.add(port)
    return port


def shm_buffers(port) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers of the run that listened on `port` (see dpo_ds.distributed)."""
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


@pytest.fixture(scope="session", autouse=True)
def remove_own_shm_buffers():
    """After the session, remove the shm buffers that this session's runs left (a rank killed before it
    unlinked its own): those of the ports handed out by `launcher_port` and of in-process DeepSpeed.
    Never others': other test sessions on the machine may be using theirs."""
    yield
    ports = SHM_PORTS | ({os.environ["MASTER_PORT"]} if "MASTER_PORT" in os.environ else set())
    for port in ports:
        for path in shm_buffers(port):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s, or starts a launcher or several ranks; runs "
                                       "after the fast tests; scripts/test.sh --fast leaves it out")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); scripts/gpu_check.sh runs "
                                       "them all with -m gpu")


def pytest_collection_modifyitems(config, items):
    """The fast tests run first, the `slow` ones after them (each group in file order), so a broken unit
    fails within minutes of a full run. `gpu` tests skip, with the reason, where torch sees no CUDA GPU
    (CI, the CPU dry run)."""
    items.sort(key=lambda item: "slow" in item.keywords)  # stable: file order within each group
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def builtin_model_dir() -> str:
    """The converted SmolLM2-135M-Instruct directory (converted once, cached in DPO_DS_CACHE)."""
    return _builtin_model_dir()


@pytest.fixture(scope="session")
def builtin_tokenizer(builtin_model_dir):
    return load_tokenizer("builtin")


def _save_tiny(config, tokenizer, path) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _tiny_sizes(tokenizer) -> dict:
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_tokenizer) -> str:
    """A 2-layer Llama (hidden 32, tied embeddings) with the built-in tokenizer, saved as a model dir."""
    config = LlamaConfig(tie_word_embeddings=True, **_tiny_sizes(builtin_tokenizer))
    return _save_tiny(config, builtin_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, builtin_tokenizer) -> str:
    """A 2-layer Qwen2 (hidden 32, untied embeddings, q/k/v biases) with the built-in tokenizer."""
    config = Qwen2Config(tie_word_embeddings=False, **_tiny_sizes(builtin_tokenizer))
    return _save_tiny(config, builtin_tokenizer, tmp_path_factory.mktemp("tiny_qwen"))
