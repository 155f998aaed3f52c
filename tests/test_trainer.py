"""End-to-end: the real entry script under the real deepspeed launcher, 2 CPU ranks, a tiny model."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import signal
import time

import pytest
import torch

from dpo_ds.metrics import LOGGED_METRICS

ROOT = Path(__file__).resolve().parent.parent


def write_learnable_data(path: Path, n: int, seed: int) -> Path:
    """Chosen answers always say 'yes', rejected ones always 'no': a tiny model learns it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "water"]
    with path.open("w") as f:
        for i in range(n):
            idx = torch.randint(0, len(words), (3,), generator=g).tolist()
            prompt = "Question about " + " ".join(words[j] for j in idx) + "?"
            f.write(json.dumps({"prompt": prompt, "chosen": " yes indeed, it is.", "rejected": " no."}) + "\n")
    return path


def train_command(tmp_path: Path, model_dir: str, *extra: str, nprocs: int = 2, out: str = "out",
                  script: Path = ROOT / "launch" / "train.py") -> list[str]:
    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        write_learnable_data(data, 64, seed=0)
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
        "--master_port", str(29500 + os.getpid() % 1000),
        str(script),
        "--config", str(ROOT / "examples" / "default.yaml"),
        "--model_name_or_path", model_dir, "--dataset_name", str(data), "--dataset_test_split", "none",
        "--output_dir", str(tmp_path / out), "--per_device_train_batch_size", "2", "--max_length", "48",
        "--max_prompt_length", "32", "--learning_rate", "3e-3", "--logging_steps", "1", "--warmup_ratio", "0",
        "--lr_scheduler_type", "constant", "--disable_tqdm", "true", "--dataset_num_proc", "none",
        *extra,
    ]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


def run_train(tmp_path: Path, model_dir: str, *extra: str, timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    cmd = train_command(tmp_path, model_dir, *extra, **kw)
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_zero3_policy_zero3_offloaded_reference_learns(tmp_path, tiny_model_dir):
    run_train(tmp_path, tiny_model_dir, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
              "--ref_zero_stage", "3", "--ref_offload", "cpu", "--max_steps", "8", "--save_steps", "none")
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8
    for name in LOGGED_METRICS:
        assert all(name in r for r in rows), name
    # Policy == reference at step 1: every pair's loss is exactly -log sigmoid(0) = log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[-1]["rewards/accuracies"] > rows[0]["rewards/accuracies"]
    assert rows[-1]["rewards/accuracies"] == 1.0
    # Two ranks, batch 2 each: 4 pairs per step, counted across ranks.
    assert rows[0]["samples_per_second"] > 0 and rows[0]["num_tokens"] > 0
    export = tmp_path / "out"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()


@pytest.mark.slow
def test_zero2_policy_with_zero3_offloaded_reference(tmp_path, tiny_qwen_dir):
    proc = run_train(tmp_path, tiny_qwen_dir, "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
                     "--ref_zero_stage", "3", "--ref_offload", "cpu", "--max_steps", "4", "--save_steps", "none",
                     "--lr_scheduler_type", "linear", "--learning_rate", "3e-5")
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # As TRL logs it: the rate each step used (linear decay over 4 steps from 3e-5, no warmup).
    assert [r["learning_rate"] for r in rows] == pytest.approx([3e-5, 2.25e-5, 1.5e-5, 0.75e-5])
    assert "'learning_rate': 7.5e-06" in proc.stdout  # the console line keeps small rates readable
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_one_rank_stage0_without_the_all_reduce_trains_like_zero2(tmp_path, tiny_model_dir):
    """On one rank a stage-0 policy skips DeepSpeed's gradient all-reduce (a group of one): with gradient
    accumulation, its losses and gradient norms must still be those of ZeRO-2, whose reduction is its own."""
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "train_batch_size": "auto", "gradient_clipping": "auto",
                                 "zero_optimization": {"stage": 0}}))
    common = ("--max_steps", "4", "--save_steps", "none", "--ref_zero_stage", "0", "--ref_offload", "none",
              "--gradient_accumulation_steps", "2")
    runs = {}
    for name, config in (("zero0", zero0), ("zero2", ROOT / "ds_configs" / "zero2.json")):
        run_train(tmp_path, tiny_model_dir, "--deepspeed", str(config), *common, nprocs=1, out=name)
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert len(runs["zero0"]) == len(runs["zero2"]) == 4
    for a, b in zip(runs["zero0"], runs["zero2"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert runs["zero0"][-1]["loss"] < runs["zero0"][0]["loss"] - 0.05


@pytest.mark.slow
def test_bf16_stage0_checkpoint_resumes_on_stage0_and_refuses_zero3(tmp_path, tiny_model_dir):
    """bf16 at stage 0 uses DeepSpeed's own wrapper optimizer (flat fp32 copies): it saves and resumes at stage 0
    like before the stage-0 -> ZeRO converter existed, and a ZeRO-3 resume is refused with the reason."""
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                                 "zero_optimization": {"stage": 0}}))
    common = ("--bf16", "true", "--max_steps", "2", "--save_steps", "1", "--lr_scheduler_type", "linear")
    run_train(tmp_path, tiny_model_dir, "--deepspeed", str(zero0), *common, nprocs=1, out="full")
    full = latest_per_step(tmp_path / "full" / "metrics.jsonl")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", resumed / "checkpoint-1")
    run_train(tmp_path, tiny_model_dir, "--deepspeed", str(zero0), *common, "--resume_from_checkpoint",
              str(resumed / "checkpoint-1"), nprocs=1, out="resumed")
    assert latest_per_step(resumed / "metrics.jsonl") == pytest.approx({2: full[2]}, abs=1e-6)
    proc = subprocess.run(train_command(tmp_path, tiny_model_dir, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
                                        *common, "--resume_from_checkpoint", str(resumed / "checkpoint-1"),
                                        nprocs=1, out="zero3"),
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "stage-0 checkpoint of a bf16/fp16 run" in proc.stdout + proc.stderr
    assert not (resumed / "checkpoint-1" / "universal").exists()  # refused before any conversion began


def latest_per_step(path: Path) -> dict[int, float]:
    """step -> loss, the last line written for each step (a killed run may have logged a step twice)."""
    return {r["global_step"]: r["loss"] for r in read_metrics(path) if "loss" in r}


@pytest.mark.slow
def test_resume_after_kill_continues_exactly(tmp_path, tiny_model_dir):
    common = ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--max_steps", "6",
              "--gradient_accumulation_steps", "2", "--save_steps", "3"]
    run_train(tmp_path, tiny_model_dir, *common, out="full")
    # Same run, killed (SIGKILL to the whole launcher group) as soon as checkpoint-3 is complete.
    part = tmp_path / "part"
    proc = subprocess.Popen(train_command(tmp_path, tiny_model_dir, *common, out="part"), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (part / "checkpoint-3" / "COMPLETE").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (part / "checkpoint-3" / "COMPLETE").exists()
    assert not (part / "model.safetensors").exists(), "the run finished before it could be killed"
    run_train(tmp_path, tiny_model_dir, *common, "--resume_from_checkpoint", "auto", out="part")
    full, resumed = latest_per_step(tmp_path / "full" / "metrics.jsonl"), latest_per_step(part / "metrics.jsonl")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step

    # `dpo-ds export` of the last checkpoint (one process, no engine) gives the final export's weights.
    from safetensors.torch import load_file

    from dpo_ds.cli import main as dpo_ds_cli

    assert dpo_ds_cli(["export", str(tmp_path / "full" / "checkpoint-6"), str(tmp_path / "exported")]) == 0
    assert dpo_ds_cli(["export", str(tmp_path / "full"), str(tmp_path / "nowhere")]) == 1  # not a checkpoint
    ours = load_file(tmp_path / "exported" / "model.safetensors")
    final = load_file(tmp_path / "full" / "model.safetensors")
    assert ours.keys() == final.keys() and ours
    for name in final:
        torch.testing.assert_close(ours[name], final[name], rtol=0, atol=0)


@pytest.mark.slow
def test_export_loads_in_transformers_and_matches_engine(tmp_path, tiny_model_dir):
    """The model in output_dir loads with plain transformers and scores exactly like the trained engine; the
    ZeRO-3 checkpoint holds a model directory that `pipeline` loads and generates with."""
    run_train(tmp_path, tiny_model_dir, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
              "--max_steps", "3", "--save_steps", "2", "--gradient_checkpointing", "true",
              script=ROOT / "tests" / "scripts" / "export_probe.py")
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    probe = torch.load(tmp_path / "out" / "export_probe.pt")
    with torch.no_grad():
        logps = torch.log_softmax(model(probe["input_ids"]).logits[:, :-1].double(), -1)
    token_logps = logps.gather(-1, probe["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    assert token_logps.abs().min() > 0  # a real, trained model: nothing zeroed
    torch.testing.assert_close(token_logps.float(), probe["engine_logps"], atol=1e-4, rtol=1e-4)
    # The trained weights differ from the initial ones: training reached the export.
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(initial.lm_head.weight, model.lm_head.weight)

    # checkpoint-2: its model directory holds the weights of its DeepSpeed state (consolidated independently by
    # DeepSpeed's zero_to_fp32), and transformers' pipeline generates with it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "generation_config.json").exists()
    deepspeed_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    saved = load_file(ckpt / "model.safetensors")
    assert saved.keys() == {k[len("model."):] for k in deepspeed_state if k != "model.lm_head.weight"}
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, deepspeed_state["model." + name], rtol=0, atol=0)
    assert not torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight)  # step 2, not 3
    generate = pipeline("text-generation", model=str(ckpt))
    text = generate("Question about apple?", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Question about apple?") and len(text) > len("Question about apple?")


@pytest.mark.slow
def test_trl_api_positional_model_save_model_evaluate_push_and_resume(tmp_path, tiny_model_dir):
    """TRL's calls from Python, one process: `DPOTrainer("dir", train_dataset=...)`, `save_model()` into
    output_dir, `evaluate(eval_dataset=...)` (one dataset or a dict), `push_to_hub()` offline and
    `train(resume_from_checkpoint=True)`."""
    data = write_learnable_data(tmp_path / "prefs.jsonl", 22, seed=1)
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "trainer_api_probe.py"), tiny_model_dir,
                           str(data), str(out)], cwd=tmp_path, env={**ENV, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((out / "api_probe.json").read_text())
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    # push_to_hub offline: a clear error naming the repository (output_dir's name) and the local copy.
    assert got["push_error"].startswith("HubPushError: push_to_hub: uploading") and "'api'" in got["push_error"]
    assert f"the model is saved locally in {out}" in got["push_error"]
    assert got["losses"]["1"] == pytest.approx(math.log(2), abs=1e-6)
    # The same rows given to evaluate() score exactly as the eval split given at construction.
    assert got["eval_given"] == pytest.approx(got["eval"], abs=1e-6) and "eval_loss" in got["eval"]
    assert "test_small_loss" in got["eval_dict"] and got["eval_dict"]["test_small_loss"] != got["eval"]["eval_loss"]
    # resume_from_checkpoint=True: the newest checkpoint in output_dir (checkpoint-2), then step 3 exactly.
    assert list(got["resumed_losses"]) == ["3"]
    assert got["resumed_losses"]["3"] == pytest.approx(got["losses"]["3"], abs=1e-6)
