"""One DPO step of a tiny Mixtral with router_aux_loss_coef, in one process.

Usage: python moe_probe.py MODEL_DIR DATA_JSONL OUT_DIR. Writes OUT_DIR/moe_probe.json with the logged step-1
metrics and the aux loss the untrained model's own forward gives on the step's whole batch (every row once).
"""
import json
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM

from dpo_ds import distributed
from dpo_ds.config import DPOConfig
from dpo_ds.trainer import DPOTrainer

model_dir, data, out = sys.argv[1:4]
rows = load_dataset("json", data_files=data, split="train").select(range(4))
distributed.init()
args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_length=48, max_prompt_length=32, max_steps=1,
                 logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True, dataset_num_proc=None,
                 router_aux_loss_coef=0.5)
trainer = DPOTrainer(model_dir, args=args, train_dataset=rows)
batch = trainer.collator([trainer.train_data[i] for i in range(4)])
with torch.no_grad():
    own = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"],
                                                         output_router_logits=True).aux_loss.item()
logged = trainer.train()["history"][0]
with open(f"{out}/moe_probe.json", "w") as f:
    json.dump({"logged": logged, "own_aux_loss": own}, f)
distributed.shutdown()
