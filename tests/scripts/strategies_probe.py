"""transformers' evaluation/saving/logging strategies through DPOTrainer, one process, three short runs.

Usage: python strategies_probe.py MODEL_DIR DATA_JSONL OUT_DIR. Each run writes OUT_DIR/<run>/metrics.jsonl;
OUT_DIR/probe.json holds what the runs returned and the error a save_only_model resume raises.
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


def run(name: str, **kw) -> dict:
    kw.setdefault("lr_scheduler_type", "constant")
    args = DPOConfig(output_dir=f"{out}/{name}", per_device_train_batch_size=2, per_device_eval_batch_size=6,
                     max_length=48, max_prompt_length=32, learning_rate=3e-3, disable_tqdm=True,
                     dataset_num_proc=None, **kw)
    trainer = DPOTrainer(model_dir, args=args, train_dataset=train, eval_dataset=held_out)
    result = trainer.train()
    trainer.save_model()
    trainer.close()
    return {"eval": result["eval"], "state": {k: v for k, v in trainer.state.items() if k.startswith("best")}}


distributed.init()
results = {
    # The best by "highest eval loss" is the first checkpoint (the loss falls): kept beside the newest.
    "best": run("best", max_steps=6, eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=1,
                logging_steps=4, logging_first_step=True, eval_on_start=True, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True),
    "epoch": run("epoch", num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch",
                 logging_strategy="epoch", save_only_model=True, data_seed=7),
    "plateau": run("plateau", max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="no", logging_steps=1,
                   lr_scheduler_type="reduce_lr_on_plateau",
                   lr_scheduler_kwargs={"mode": "max", "patience": 0, "factor": 0.5}),
}
try:
    DPOTrainer(model_dir, args=DPOConfig(output_dir=f"{out}/epoch", max_length=48, dataset_num_proc=None,
                                         per_device_train_batch_size=2, disable_tqdm=True),
               train_dataset=train).train(resume_from_checkpoint=True)
except ValueError as exc:
    results["model_only_resume_error"] = str(exc)
with open(f"{out}/probe.json", "w") as f:
    json.dump(results, f)
distributed.shutdown()
