"""Train briefly, then score a probe batch with the trained engine and export (run under a launcher).

Rank 0 writes OUTPUT_DIR/export_probe.pt with the probe ids and the engine's per-token log-probs,
so a test can compare them with the exported model loaded by plain transformers.
"""
import sys

import torch

from dpo_ds import distributed
from dpo_ds.parser import parse_args
from dpo_ds.trainer import DPOTrainer, _rank

args = parse_args(sys.argv[1:])
distributed.init()
trainer = DPOTrainer(args=args)
trainer.train()
probe = torch.tensor([trainer.train_data[i]["prompt_ids"][:6] + trainer.train_data[i]["chosen_ids"][:4]
                      for i in range(2)])
engine = trainer.engines.policy
engine.eval()
with torch.no_grad():
    out = engine(input_ids=probe, attention_mask=torch.ones_like(probe), completion_mask=torch.ones_like(probe),
                 with_stats=False)
out_dir = trainer.save_model()
if _rank() == 0:
    torch.save({"input_ids": probe, "engine_logps": out.logps.float()}, f"{args.output_dir}/export_probe.pt")
trainer.close()
distributed.shutdown()
