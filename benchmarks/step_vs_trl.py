#!/usr/bin/env python
"""Seconds per step, peak memory and step-1 loss: TRL 1.16's DPOTrainer vs dpo_ds, same job.

    python benchmarks/step_vs_trl.py                        # CPU (and CUDA when present)
    python benchmarks/step_vs_trl.py --steps 10 --json out.json --markdown out.md
    python benchmarks/step_vs_trl.py --dpo_ds_deepspeed ds_configs/zero2.json
    python benchmarks/step_vs_trl.py --dpo_ds_features prefix_sharing   # one feature row only
    python benchmarks/step_vs_trl.py --device cuda --model DIR --data pairs.jsonl   # another model and data

The job: SmolLM2-135M-Instruct ("builtin"), sigmoid DPO with beta 0.1, the first
steps * batch_size standard-format rows of the built-in preference set (TRL
needs one format per dataset; both sides then see exactly the same rows, each
once), max_length 256, AdamW (lr 5e-6, betas 0.9/0.999, eps 1e-8, no weight
decay), linear schedule without warmup, gradient clipping at 1.0, dropout
off, an online reference model (no precomputed log-probs), log every step,
no evaluation, no checkpoints, no gradient checkpointing. fp32 on CPU; bf16
mixed precision on CUDA (TRL: autocast over fp32 weights; DeepSpeed: bf16
weights with fp32 master weights in the optimizer).

What each side runs, in its own fresh single-process subprocess (so peak
memory and thread pools never mix):
- trl: `trl.DPOTrainer` without DeepSpeed (accelerate, one process; `use_cpu`
  on CPU). This is how TRL runs on one device.
- dpo_ds default: `dpo_ds.trainer.DPOTrainer` with dpo_ds's defaults - what a
  user gets without flags. On one fp32 CPU process that is a ZeRO stage-0
  policy engine and a stage-0 reference engine (nothing to partition on one
  rank; on one GPU the reference stays ZeRO-3 offloaded to CPU).
- dpo_ds zero3: the same with `ds_configs/zero3.json` and a ZeRO-3 reference
  offloaded to CPU - what the default runs on each of several ranks. On one
  process ZeRO-3 shards nothing, so this row measures the partitioning
  machinery's overhead.
`--dpo_ds_deepspeed` (repeatable) replaces those two rows: `default`,
`zero3`, `zero0` (an explicit stage-0 JSON, stage-0 reference), or a
DeepSpeed JSON path (its reference: stage 0 for a policy below stage 3,
otherwise ZeRO-3 offloaded to CPU).
- dpo_ds SETTING + FEATURE: a setting with one of dpo_ds's step-saving
  features (`FEATURES`): `padding_free` (the batch's sequences packed into
  rows, no padding), `prefix_sharing` (each prompt run once for both
  completions), `precompute_ref` (reference log-probs computed once before
  training; no reference forward in the step) and the last two together.
  By default each on the default setting, and the combination on zero3 too;
  `--dpo_ds_features [SETTING:]FEATURE` (repeatable; `none` for no feature
  rows) picks others. The precomputation pass runs in a fresh cache
  directory, so its cost shows in the setup column (trainer construction,
  model loading included), not in the step time.

Seconds per step: the time between the ends of consecutive optimizer steps
(TRL: its `on_step_end` callback; dpo_ds: right after `engine.step()`, which
is one optimizer step here), median over the steps after `--warmup`, as wall
time and as the process's CPU time (all threads; steadier than wall time on a
shared machine). Both intervals hold the data loading, policy
forward/backward, reference forward, optimizer step and the previous step's
logging. Peak memory: the worker's own peak RSS
(`getrusage(RUSAGE_SELF)`) on CPU, `torch.cuda.max_memory_allocated` on
CUDA. On a shared or oversubscribed CPU, `--threads 1` keeps OpenMP threads
from spinning at barriers while their partner is descheduled, which otherwise
inflates every side's time by the number of parallel regions per step rather
than by its work. The step-1 loss is ln 2 = 0.6931 on both sides, since the policy equals
the reference. A benchmark: it measures and prints, it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A ZeRO stage-0 engine: plain data parallelism, DeepSpeed's optimizer wrapper, nothing partitioned.
ZERO0_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "steps_per_print": 1_000_000_000,
    "zero_optimization": {"stage": 0},
}


# dpo_ds's step-saving features, each measured on top of the default setting: name -> DPOConfig overrides.
FEATURES = {
    "padding_free": {"padding_free": True},
    "prefix_sharing": {"prefix_sharing": True},
    "precompute_ref": {"precompute_ref_log_probs": True},
    "prefix_sharing+precompute_ref": {"prefix_sharing": True, "precompute_ref_log_probs": True},
}
DEFAULT_FEATURE_ROWS = [f"default:{name}" for name in FEATURES] + ["zero3:prefix_sharing+precompute_ref"]


# ----------------------------------------------------------------------------- workers (one per subprocess)


def standard_rows(count: int, path: Optional[str] = None) -> list[dict]:
    """The first `count` rows of `path` (JSONL), default the built-in train split, whose prompt is plain text
    (standard format)."""
    from dpo_ds.builtin import dataset_files

    rows = []
    with open(path or dataset_files()["train"]) as fh:
        for line in fh:
            row = json.loads(line)
            if isinstance(row["prompt"], str):
                rows.append(row)
                if len(rows) == count:
                    return rows
    raise ValueError(f"{path or 'the built-in train split'} has only {len(rows)} standard-format rows; "
                     f"steps * batch_size = {count} needs that many")


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Clock:
    """Wall and process-CPU timestamps at the end of each optimizer step (the first one: training start)."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def intervals(self) -> dict:
        pairs = list(zip(self.marks, self.marks[1:]))
        return {"step_seconds": [b[0] - a[0] for a, b in pairs], "step_cpu_seconds": [b[1] - a[1] for a, b in pairs]}


def run_trl(opts: argparse.Namespace, model_path: str, rows: list[dict], out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = Clock()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    bf16 = opts.device == "cuda"
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=opts.batch_size, max_steps=opts.steps,
        learning_rate=opts.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.1, loss_type="sigmoid", max_length=opts.max_length, disable_dropout=True,
        precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=bf16, fp16=False,
        use_cpu=opts.device == "cpu", model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=opts.seed,
    )
    start = time.perf_counter()
    trainer = DPOTrainer(model=model_path, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[StepClock()])
    setup_seconds = time.perf_counter() - start
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        **clock.intervals(),
        "losses": [h["loss"] for h in logs],
        "learning_rates": [h["learning_rate"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "tokens": logs[-1].get("num_tokens"),
        "threads": torch.get_num_threads(),
        "setup_seconds": setup_seconds,
    }


def run_dpo_ds(opts: argparse.Namespace, model_path: str, rows: list[dict], out_dir: str) -> dict:
    import torch
    from datasets import Dataset

    from dpo_ds import distributed
    from dpo_ds.config import DPOConfig
    from dpo_ds.trainer import DPOTrainer

    ds_path, ref_stage, ref_offload = dpo_ds_setting(opts.ds, out_dir)
    distributed.init()
    features = FEATURES[opts.features] if opts.features else {}
    if features.get("precompute_ref_log_probs"):
        features = {**features, "ref_cache_dir": os.path.join(out_dir, "ref_cache")}  # a fresh pass, timed
    args = DPOConfig(**{
        **dict(
            output_dir=out_dir, per_device_train_batch_size=opts.batch_size, max_steps=opts.steps,
            learning_rate=opts.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
            beta=0.1, loss_type="sigmoid", max_length=opts.max_length, disable_dropout=True,
            precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=opts.device == "cuda",
            model_init_kwargs={"dtype": "float32"}, attn_implementation="sdpa",
            logging_steps=1, eval_strategy="no", save_steps=None, report_to=[], disable_tqdm=True,
            seed=opts.seed, deepspeed=ds_path, ref_zero_stage=ref_stage, ref_offload=ref_offload,
        ),
        **features,
    })
    start = time.perf_counter()
    trainer = DPOTrainer(model=model_path, args=args, train_dataset=Dataset.from_list(rows))
    setup_seconds = time.perf_counter() - start
    clock, engine = Clock(), trainer.engines.policy
    engine_step = engine.step

    def timed_step(*a, **k):
        out = engine_step(*a, **k)
        clock.mark()
        return out

    engine.step = timed_step
    clock.mark()
    history = trainer.train()["history"]
    trainer.close()
    result = {
        **clock.intervals(),
        "losses": [h["loss"] for h in history],
        "learning_rates": [h["learning_rate"] for h in history],
        "grad_norms": [h["grad_norm"] if math.isfinite(h["grad_norm"]) else None for h in history],
        "tokens": history[-1]["num_tokens"],
        "threads": torch.get_num_threads(),
        "zero_stage": trainer.engines.ds_config["zero_optimization"].get("stage", 0),
        "ref_zero_stage": None if trainer.engines.ref_ds_config is None
        else trainer.engines.ref_ds_config["zero_optimization"]["stage"],
        "ref_offload": None if trainer.engines.ref_ds_config is None
        else trainer.engines.ref_ds_config["zero_optimization"].get("offload_param", {}).get("device", "none"),
        "setup_seconds": setup_seconds,
    }
    distributed.shutdown()
    return result


def dpo_ds_setting(ds: str, work_dir: str) -> tuple[Optional[str], int, str]:
    """(DeepSpeed JSON path or None for dpo_ds's default, reference ZeRO stage, reference offload); None and
    "auto" leave the reference to dpo_ds's defaults."""
    if ds == "default":
        return None, None, "auto"
    if ds == "zero3":
        return str(REPO / "ds_configs" / "zero3.json"), 3, "cpu"
    if ds == "zero0":
        path = os.path.join(work_dir, "zero0.json")
        Path(path).write_text(json.dumps(ZERO0_CONFIG))
        return path, 0, "none"
    if not os.path.isfile(ds):
        raise SystemExit(f"--dpo_ds_deepspeed {ds!r}: expected default, zero3, zero0 or an existing JSON file")
    stage = json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage", 0)
    return (ds, 3, "cpu") if stage == 3 else (ds, 0, "none")


def worker(opts: argparse.Namespace) -> None:
    """Run one trainer and write its measurements to `opts.result`."""
    import torch

    from dpo_ds.models import resolve_model_path

    if opts.threads:
        torch.set_num_threads(opts.threads)
    model_path = resolve_model_path(opts.model)
    load_before = os.getloadavg()[0]
    rows = standard_rows(opts.steps * opts.batch_size, opts.data)
    with tempfile.TemporaryDirectory(prefix="step_vs_trl_") as out_dir:
        run = run_trl if opts.side == "trl" else run_dpo_ds
        result = run(opts, model_path, rows, out_dir)
    result["peak_memory_mib"] = peak_memory_mib(opts.device)
    result["load_average"] = [load_before, os.getloadavg()[0]]
    Path(opts.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def run_worker(side: str, ds: Optional[str], device: str, opts: argparse.Namespace, log_dir: str,
               features: Optional[str] = None) -> dict:
    """Run one side in a fresh interpreter; returns its measurements (exits with its log tail on failure)."""
    name = f"{device}-{side}" + (f"-{Path(ds).stem}" if ds else "") + (f"-{features}" if features else "")
    result, log = os.path.join(log_dir, f"{name}.json"), os.path.join(log_dir, f"{name}.log")
    cmd = [sys.executable, __file__, "--_worker", side, "--_result", result, "--device", device,
           "--model", opts.model, *(["--data", opts.data] if opts.data else []), "--steps", str(opts.steps), "--batch_size", str(opts.batch_size), "--max_length", str(opts.max_length),
           "--learning_rate", str(opts.learning_rate), "--seed", str(opts.seed)]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    if ds:
        cmd += ["--_ds", ds]
    if features:
        cmd += ["--_features", features]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if opts.threads:
        env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    print(f"running {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0:
        tail = Path(log).read_text()[-4000:]
        raise SystemExit(f"{name} failed with exit code {code}; log {log}:\n{tail}")
    data = json.loads(Path(result).read_text())
    data["wall_seconds"] = time.perf_counter() - start
    return data


def revision() -> Optional[str]:
    """The checkout's commit, with "+dirty" when the library sources differ from it (None outside git)."""
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "dpo_ds", "csrc"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def summarize(label: str, data: dict, warmup: int) -> dict:
    return {
        "label": label,
        "seconds_per_step": statistics.median(data["step_seconds"][warmup:]),
        "cpu_seconds_per_step": statistics.median(data["step_cpu_seconds"][warmup:]),
        "timed_steps": len(data["step_seconds"][warmup:]),
        "step_seconds": data["step_seconds"],
        "step_cpu_seconds": data["step_cpu_seconds"],
        "peak_memory_mib": data["peak_memory_mib"],
        "step1_loss": data["losses"][0],
        "losses": data["losses"],
        "tokens_per_step": data["tokens"] / len(data["losses"]) if data.get("tokens") else None,
        "learning_rates": data["learning_rates"],
        "grad_norms": data["grad_norms"],
        "torch_threads": data["threads"],
        "load_average_1min": data["load_average"],
        "wall_seconds": data["wall_seconds"],
        "setup_seconds": data["setup_seconds"],
        **{k: data[k] for k in ("zero_stage", "ref_zero_stage", "ref_offload") if k in data},
    }


RATIOS = {"seconds_per_step": "seconds_per_step_ratio", "cpu_seconds_per_step": "cpu_seconds_per_step_ratio",
          "peak_memory_mib": "peak_memory_ratio"}


def table(device: str, rows: list[dict]) -> str:
    memory = "peak RSS MiB" if device == "cpu" else "max allocated MiB"
    lines = [f"| {device} | s/step | CPU s/step | {memory} | step-1 loss | tokens/step | setup s | "
             "s/step ratio | CPU s/step ratio | memory ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tokens = f"{r['tokens_per_step']:.0f}" if r["tokens_per_step"] else "-"
        ratios = " | ".join(f"{r.get(name, 1.0):.2f}" for name in RATIOS.values())
        lines.append(f"| {r['label']} | {r['seconds_per_step']:.3f} | {r['cpu_seconds_per_step']:.3f} | "
                     f"{r['peak_memory_mib']:.0f} | {r['step1_loss']:.4f} | {tokens} | {r['setup_seconds']:.1f} | "
                     f"{ratios} |")
    return "\n".join(lines)


def devices(choice: str) -> list[str]:
    if choice != "auto":
        return [choice]
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median (default 2)")
    p.add_argument("--model", default="builtin", help="model for both sides (default: builtin SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="JSONL of standard-format pairs (default: the built-in preference set)")
    p.add_argument("--batch_size", type=int, default=4, help="preference pairs per step (default 4)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch/OpenMP threads per trainer (default: torch's choice)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, and CUDA too when a GPU is visible")
    p.add_argument("--dpo_ds_deepspeed", action="append", metavar="default|zero3|zero0|PATH",
                   help="dpo_ds DeepSpeed setting(s) to measure (repeatable; default: default and zero3)")
    p.add_argument("--dpo_ds_features", action="append", metavar="none|[SETTING:]FEATURE",
                   help=f"a dpo_ds feature ({', '.join(FEATURES)}) to measure on a setting (default, zero3, zero0 "
                        "or a JSON path; default: default) (repeatable; default: "
                        f"{' '.join(DEFAULT_FEATURE_ROWS)})")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the printed tables to a Markdown file")
    p.add_argument("--_worker", choices=("trl", "dpo_ds"), dest="side", help=argparse.SUPPRESS)
    p.add_argument("--_result", dest="result", help=argparse.SUPPRESS)
    p.add_argument("--_ds", dest="ds", help=argparse.SUPPRESS)
    p.add_argument("--_features", dest="features", choices=tuple(FEATURES), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.side:
        worker(opts)
        return 0
    if opts.steps <= opts.warmup:
        p.error(f"--steps {opts.steps} must exceed --warmup {opts.warmup}: no step would be timed")

    settings = opts.dpo_ds_deepspeed or ["default", "zero3"]
    features = [f if ":" in f else f"default:{f}" for f in (opts.dpo_ds_features or DEFAULT_FEATURE_ROWS)
                if f != "none"]
    unknown = [f for f in features if f.rpartition(":")[2] not in FEATURES]
    if unknown:
        p.error(f"--dpo_ds_features {unknown}: expected none or [SETTING:]FEATURE with FEATURE one of "
                f"{list(FEATURES)}")
    report: dict[str, Any] = {
        "config": {k: getattr(opts, k) for k in ("model", "data", "steps", "warmup", "batch_size", "max_length", "learning_rate",
                                                   "seed", "threads")}
        | {"dpo_ds_deepspeed": settings, "dpo_ds_features": features},
        "dpo_ds_revision": revision(),
        "cpu_count": os.cpu_count(),
        "results": {},
    }
    tables = []
    with tempfile.TemporaryDirectory(prefix="step_vs_trl_logs_") as log_dir:
        for device in devices(opts.device):
            trl = summarize("trl", run_worker("trl", None, device, opts, log_dir), opts.warmup)
            rows = [trl]
            for ds in settings:
                row = summarize(f"dpo_ds {ds}", run_worker("dpo_ds", ds, device, opts, log_dir), opts.warmup)
                row.update({ratio: row[key] / trl[key] for key, ratio in RATIOS.items()})
                rows.append(row)
            for spec in features:
                ds, _, name = spec.rpartition(":")
                row = summarize(f"dpo_ds {ds} + {name}", run_worker("dpo_ds", ds, device, opts, log_dir,
                                                                     features=name), opts.warmup)
                row.update({ratio: row[key] / trl[key] for key, ratio in RATIOS.items()})
                rows.append(row)
            report["results"][device] = rows
            tables.append(table(device, rows))
    text = (f"model {opts.model}, steps {opts.steps} (median of the last {opts.steps - opts.warmup}), batch "
            f"{opts.batch_size}, max_length {opts.max_length}, threads {opts.threads or 'default'}, dpo_ds "
            f"{report['dpo_ds_revision']}; ratios are dpo_ds / trl; ln 2 = {math.log(2):.4f}\n\n"
            + "\n\n".join(tables))
    print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    if opts.markdown:
        Path(opts.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
