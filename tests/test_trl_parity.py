"""Step 1 of `launch/train.py --model_name_or_path X --dataset_name Y` equals TRL 1.16's DPOTrainer step 1.

Outside-style rows: prompts of several hundred tokens, implicit prompt (the prompt is the common
prefix of chosen and rejected), a tiny Llama built from config. With DPOConfig's defaults being
TRL's, nothing is truncated and the sequence log-probs must agree to 1e-5 relative.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def long_implicit_rows(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    rows = []
    for i in range(count):
        text = " ".join(words[j] for j in torch.randint(0, len(words), (300 + 40 * i,), generator=g).tolist())
        prompt = f"Human: summarize this log, case {i}: {text}\n\nAssistant:"
        rows.append({"chosen": prompt + " It lists the call signs in order.",
                     "rejected": prompt + " No idea."})
    return rows


@pytest.mark.slow
def test_step1_logps_match_trl_on_long_implicit_prompts(tmp_path, tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = long_implicit_rows(4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert min(len(AutoTokenizer.from_pretrained(tiny_model_dir)(r["chosen"]).input_ids) for r in rows) > 300

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "dpo_ds"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--model_name_or_path", tiny_model_dir,
         "--dataset_name", str(data), "--per_device_train_batch_size", "4", "--max_steps", "1",
         "--logging_steps", "1", "--output_dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ours = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if "logps/chosen" in line)

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    theirs = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    for key in ("logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
