"""TRL's DPOTrainer API in one process: positional model, save_model, evaluate(eval_dataset), train(resume).

Usage: python trainer_api_probe.py MODEL_DIR DATA_JSONL OUT_DIR. Writes OUT_DIR/api_probe.json.
"""
import json
import sys

from datasets import load_dataset

from dpo_ds import distributed
from dpo_ds.config import DPOConfig
from dpo_ds.trainer import DPOTrainer

model_dir, data, out = sys.argv[1:4]
rows = load_dataset("json", data_files=data, split="train")
train, held_out = rows.select(range(16)), rows.select(range(16, 22))


def config(**kw) -> DPOConfig:
    return DPOConfig(output_dir=out, per_device_train_batch_size=2, per_device_eval_batch_size=4, max_length=48,
                     max_prompt_length=32, learning_rate=3e-3, logging_steps=1, lr_scheduler_type="constant",
                     disable_tqdm=True, max_steps=3, save_steps=2, eval_strategy="no", dataset_num_proc=None, **kw)


distributed.init()
first = DPOTrainer(model_dir, args=config(), train_dataset=train, eval_dataset=held_out)
losses = {h["global_step"]: h["loss"] for h in first.train()["history"]}
first.save_model()
results = {"losses": losses, "eval": first.evaluate(),
           "eval_given": first.evaluate(eval_dataset=held_out),
           "eval_dict": first.evaluate(eval_dataset={"small": held_out.select(range(2))}, metric_key_prefix="test")}
try:  # HF_HUB_OFFLINE=1: the upload fails after the local save
    first.push_to_hub()
except Exception as exc:
    results["push_error"] = f"{type(exc).__name__}: {exc}"
second = DPOTrainer(model_dir, args=config(), train_dataset=train)
results["resumed_losses"] = {h["global_step"]: h["loss"] for h in second.train(resume_from_checkpoint=True)["history"]}
with open(f"{out}/api_probe.json", "w") as f:
    json.dump(results, f)
distributed.shutdown()
