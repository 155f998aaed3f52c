"""data_seed and dataloader_num_workers in one process: which rows the first step trains on.

Usage: python data_order_probe.py MODEL_DIR DATA_JSONL OUT_DIR. Writes OUT_DIR/data_order.json with the
first step's logps/chosen for each (seed, data_seed, dataloader_num_workers) run.
"""
import json
import sys

from datasets import load_dataset

from dpo_ds import distributed
from dpo_ds.config import DPOConfig
from dpo_ds.trainer import DPOTrainer

model_dir, data, out = sys.argv[1:4]
rows = load_dataset("json", data_files=data, split="train")
runs = {"seed1_data7": (1, 7, 0), "seed2_data7": (2, 7, 0), "seed1_data8": (1, 8, 0), "seed1_data7_workers2": (1, 7, 2)}
distributed.init()
results = {}
for name, (seed, data_seed, workers) in runs.items():
    args = DPOConfig(output_dir=f"{out}/{name}", per_device_train_batch_size=2, max_length=48, max_prompt_length=32,
                     logging_steps=1, max_steps=1, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
                     seed=seed, data_seed=data_seed, dataloader_num_workers=workers)
    history = DPOTrainer(model_dir, args=args, train_dataset=rows).train()["history"]
    results[name] = next(h["logps/chosen"] for h in history if "logps/chosen" in h)
with open(f"{out}/data_order.json", "w") as f:
    json.dump(results, f)
distributed.shutdown()
