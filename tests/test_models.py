"""Model and tokenizer loading, the built-in SmolLM2 conversion, dropout and FLOP counting."""
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dpo_ds.builtin import model as builtin
from dpo_ds.builtin.model import builtin_gguf_path
from dpo_ds.models import (
    disable_dropout,
    load_model,
    load_tokenizer,
    model_flops_per_token,
    resolve_model_path,
)


def args(**kw):
    return SimpleNamespace(**kw)


@pytest.fixture(scope="module")
def builtin_model(builtin_model_dir):
    return load_model("builtin")


# --- the built-in model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_tensors():
    return {t.name: t for t in GGUFReader(str(builtin_gguf_path())).tensors}


def _dequant_q8_0(raw: np.ndarray, rows: int) -> torch.Tensor:
    """GGML Q8_0 blocks of 32 weights: fp16 scale d, then 32 int8 q; w = d * q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return torch.from_numpy((d * q).reshape(rows, -1))


def _dequant_q4_1(raw: np.ndarray, rows: int) -> torch.Tensor:
    """GGML Q4_1 blocks of 32 weights: fp16 d, fp16 m, 16 bytes; low nibbles are weights 0-15,
    high nibbles 16-31; w = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return torch.from_numpy((d * q + m).reshape(rows, -1))


def test_builtin_dir_is_a_plain_hf_model(builtin_model_dir):
    names = set(os.listdir(builtin_model_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads(Path(builtin_model_dir, "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert Path(builtin_model_dir).parent == builtin.cache_dir()


def test_builtin_dir_is_idempotent(builtin_model_dir):
    weights = Path(builtin_model_dir, "model.safetensors")
    before = weights.stat().st_mtime_ns
    assert builtin.builtin_model_dir() == builtin_model_dir
    assert weights.stat().st_mtime_ns == before


def test_converted_weights_match_hand_dequantized_gguf(builtin_model, gguf_tensors):
    embed = gguf_tensors["token_embd.weight"]
    expected = _dequant_q8_0(embed.data, 49152)
    torch.testing.assert_close(builtin_model.model.embed_tokens.weight.data, expected, rtol=1e-6, atol=0)
    assert builtin_model.lm_head.weight.data_ptr() == builtin_model.model.embed_tokens.weight.data_ptr()

    down = gguf_tensors["blk.0.ffn_down.weight"]
    expected = _dequant_q4_1(down.data, 576)
    torch.testing.assert_close(builtin_model.model.layers[0].mlp.down_proj.weight.data, expected, rtol=1e-6, atol=0)

    norm = gguf_tensors["output_norm.weight"]
    torch.testing.assert_close(builtin_model.model.norm.weight.data, torch.from_numpy(norm.data.copy()))


def test_builtin_greedy_answer_is_sensible(builtin_model, builtin_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = builtin_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = builtin_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = builtin_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in reply
    assert reply.endswith("<|im_end|>")  # stops at the template's end of turn


def test_builtin_tokenizer_is_chatml(builtin_tokenizer):
    assert builtin_tokenizer.eos_token == "<|im_end|>"
    assert builtin_tokenizer.pad_token is not None
    text = builtin_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def _cheap_build(log: str, out: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    (out / "payload").write_text("x")
    (out / builtin._MARKER).write_text("{}")


def _race(target: str, log: str) -> None:
    builtin._build_once(Path(target), lambda out: _cheap_build(log, out))


def test_build_once_under_concurrency_builds_once(tmp_path):
    target, log = tmp_path / "model", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")  # spawn would re-import torch in each child
    procs = [ctx.Process(target=_race, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert (target / "payload").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "model", "model.lock"]  # no temp dirs left


def test_build_once_replaces_a_stale_incomplete_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "half_written").write_text("")
    builtin._build_once(target, lambda out: _cheap_build(str(tmp_path / "log"), out))
    assert sorted(p.name for p in target.iterdir()) == sorted(["payload", builtin._MARKER])


def test_build_failure_leaves_nothing_behind(tmp_path):
    def failing(out: Path) -> None:
        (out / "partial").write_text("")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        builtin._build_once(tmp_path / "model", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]


@pytest.mark.slow
def test_two_processes_convert_builtin_concurrently(tmp_path, builtin_model_dir):
    env = dict(os.environ, DPO_DS_CACHE=str(tmp_path))
    code = "from dpo_ds.builtin.model import builtin_model_dir; print(builtin_model_dir())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    expected = str(tmp_path / "smollm2-135m-instruct")
    assert outputs == [expected, expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
    fresh = load_model(expected)
    cached = load_model(builtin_model_dir)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(a, b), name


# --- resolve_model_path ----------------------------------------------------------------------


def test_resolve_model_path(tmp_path, builtin_model_dir, tiny_model_dir):
    assert resolve_model_path("builtin") == builtin_model_dir
    assert resolve_model_path(tiny_model_dir) == tiny_model_dir
    assert resolve_model_path(str(builtin_gguf_path())) == str(builtin_gguf_path())
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="weights.bin.*not a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match="./missing"):
        resolve_model_path("./missing")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        resolve_model_path("somewhere/model.gguf")


# --- load_tokenizer --------------------------------------------------------------------------


def test_tokenizer_from_gguf_file_matches_converted(builtin_tokenizer):
    from_gguf = load_tokenizer(str(builtin_gguf_path()))
    text = "Hello, world! 12 + 30 = 42.<|im_end|>"
    assert from_gguf(text).input_ids == builtin_tokenizer(text).input_ids
    assert from_gguf.chat_template == builtin_tokenizer.chat_template


def test_pad_token_falls_back_to_eos(tmp_path, builtin_tokenizer):
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_eos_token_override(builtin_tokenizer):
    tok = load_tokenizer("builtin", args(eos_token="<|endoftext|>"))
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == builtin_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0


def test_eos_token_not_in_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match=r"eos_token '<\|eot_id\|>' is not in the vocabulary"):
        load_tokenizer("builtin", args(eos_token="<|eot_id|>"))


def test_chat_template_from_jinja_file(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer("builtin", args(chat_template_path=str(template)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


def test_chat_template_from_model_dir(tmp_path, tiny_model_dir):
    donor = AutoTokenizer.from_pretrained(tiny_model_dir)
    donor.chat_template = "{{ messages[0]['content'] | upper }}"
    donor.save_pretrained(tmp_path)
    tok = load_tokenizer(tiny_model_dir, args(chat_template_path=str(tmp_path)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "HI"


def test_chat_template_path_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="chat_template_path .*nope.jinja"):
        load_tokenizer("builtin", args(chat_template_path=str(tmp_path / "nope.jinja")))


# --- load_model ------------------------------------------------------------------------------


def test_load_model_defaults(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_model_untied_qwen(tiny_qwen_dir):
    model = load_model(tiny_qwen_dir)
    assert model.config.model_type == "qwen2"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    "init_kwargs, dtype, expected",
    [
        ({"dtype": "bfloat16"}, None, torch.bfloat16),
        ({"torch_dtype": "float16"}, None, torch.float16),
        ({"dtype": "bfloat16"}, torch.float32, torch.float32),
        ({}, torch.bfloat16, torch.bfloat16),
    ],
)
def test_load_model_dtype(tiny_model_dir, init_kwargs, dtype, expected):
    model = load_model(tiny_model_dir, args(model_init_kwargs=init_kwargs), dtype=dtype)
    assert model.dtype == expected


def test_load_model_bad_dtype_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        load_model(tiny_model_dir, args(model_init_kwargs={"dtype": "fp8"}))


def test_attention_implementation_from_args_and_init_kwargs(tiny_model_dir):
    assert load_model(tiny_model_dir, args(attn_implementation="eager")).config._attn_implementation == "eager"
    both = args(attn_implementation="sdpa", model_init_kwargs={"attn_implementation": "eager"})
    assert load_model(tiny_model_dir, both).config._attn_implementation == "eager"


def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_model_dir):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ImportError, match="flash_attention_2.*'flash_attn'"):
        load_model(tiny_model_dir, args(attn_implementation="flash_attention_2"))


_REMOTE_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class MarkedConfig(LlamaConfig):
    model_type = "marked_llama"


class MarkedLlama(LlamaForCausalLM):
    config_class = MarkedConfig
"""


def test_remote_code_needs_trust_remote_code(tmp_path, tiny_model_dir):
    config = json.loads(Path(tiny_model_dir, "config.json").read_text())
    config["model_type"] = "marked_llama"
    config["auto_map"] = {
        "AutoConfig": "modeling_marked.MarkedConfig",
        "AutoModelForCausalLM": "modeling_marked.MarkedLlama",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(Path(tiny_model_dir, "model.safetensors"))
    (tmp_path / "modeling_marked.py").write_text(_REMOTE_CODE)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(tmp_path))
    assert type(load_model(str(tmp_path), args(trust_remote_code=True))).__name__ == "MarkedLlama"


def test_load_model_passes_a_built_model_through(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert load_model(model) is model


@pytest.mark.slow
def test_load_model_from_gguf_file_is_plain_and_saveable(tmp_path, builtin_model):
    model = load_model(str(builtin_gguf_path()))
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    for (name, a), (_, b) in zip(model.state_dict().items(), builtin_model.state_dict().items()):
        assert torch.equal(a, b), name
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


# --- dropout ---------------------------------------------------------------------------------


def _llama_with_dropout(tmp_path, tiny_model_dir) -> str:
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return str(tmp_path)


def test_disable_dropout_on_load_makes_training_forward_deterministic(tmp_path, tiny_model_dir):
    path = _llama_with_dropout(tmp_path, tiny_model_dir)
    ids = torch.arange(3, 19).reshape(2, 8)

    kept = load_model(path, args(attn_implementation="eager")).train()
    assert not torch.equal(kept(ids).logits, kept(ids).logits)  # dropout is really active

    model = load_model(path, args(attn_implementation="eager", disable_dropout=True)).train()
    assert model.config.attention_dropout == 0.0
    train_logits = model(ids).logits
    assert torch.equal(train_logits, model(ids).logits)
    torch.testing.assert_close(train_logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_disable_dropout_zeroes_dropout_modules_and_config():
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    disable_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop, config.summary_first_dropout) == (0, 0, 0, 0)


def test_disable_dropout_applies_to_a_built_model(tmp_path, tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(_llama_with_dropout(tmp_path, tiny_model_dir))
    load_model(model, args(disable_dropout=True))
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


# --- FLOPs -----------------------------------------------------------------------------------


def test_flops_per_token_smollm2_by_hand(builtin_model):
    h, layers, heads, kv, d, inter, vocab, seq = 576, 30, 9, 3, 64, 1536, 49152, 1024
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    n = layers * per_layer + vocab * h  # the tied LM head is a matmul; the embedding lookup is not
    assert model_flops_per_token(builtin_model.config, seq) == 6 * n + 12 * layers * heads * d * seq
    assert model_flops_per_token(builtin_model.config) == 6 * n


def test_flops_per_token_untied_qwen(tiny_qwen_dir):
    config = load_model(tiny_qwen_dir).config
    h, layers, heads, kv, inter, vocab = 32, 2, 4, 2, 64, config.vocab_size
    d = h // heads
    n = layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter) + vocab * h
    assert model_flops_per_token(config, 16) == 6 * n + 12 * layers * heads * d * 16


def test_flops_negative_seq_len_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(load_model(tiny_model_dir).config, -1)


def test_chat_template_hub_id_is_accepted_and_fails_clearly_offline(monkeypatch):
    """TRL takes a hub id (a model whose template is borrowed); offline, the error names the key and the id."""
    config = args(chat_template_path="HuggingFaceTB/SmolLM3-3B")  # no "expected an existing file"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import: without its constant too, it retries the network for ~45 s.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="chat_template_path 'HuggingFaceTB/SmolLM3-3B' is neither"):
        load_tokenizer("builtin", config)
