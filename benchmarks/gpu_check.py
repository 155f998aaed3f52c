#!/usr/bin/env python
"""The GPU check: environment, builds, on-device correctness, kernel benchmark and training, in one command.

    bash scripts/gpu_check.sh [--out DIR] [--quick] [--dry-run]    # installs .whl/, then runs this

Made for one H200 lent for minutes, with no package registry: every step runs in its own process
under its own time limit, and a step that fails or runs out of time is recorded, not fatal, so
the rest still measures. `results.json` and `results.md` land in `--out` after every step, so an
interrupted run still leaves what it measured; each step's log is `log-STEP.txt` beside them.

1. environment: GPU, driver, torch/CUDA/triton/deepspeed versions; the measured HBM bandwidth
   (a device-to-device copy, bytes read + written) and bf16 matmul rate (8192^3 on random data):
   the ceilings the later percentages divide by.
2. build: the csrc/ CUDA extension (JIT, ninja) and the Triton kernels, timed.
3. correctness: every test marked `gpu` (the cuda and triton log-prob backends against float64,
   flash/varlen packing, QLoRA, CPU offload of a CUDA model).
4. kernels: benchmarks/logprobs.py at H=4096, V=151936, 16384 bf16 tokens, forward + backward.
5. training: random-initialized models built from config (no weights travel), synthetic data of
   a byte-level tokenizer (one token per byte, so lengths are exact): 20 steps of a
   SmolLM2-135M-shaped model, batch 8, length 1024, bf16, ZeRO-3, sdpa, packing, with the
   reference ZeRO-3 offloaded to CPU, on the GPU, and precomputed; TRL 1.16's DPOTrainer on the
   same job (benchmarks/step_vs_trl.py); a ~1.5B Llama-shaped model at length 2048 with the
   largest batch `dpo_ds.tools.estimate` fits (the MFU figure).
`--quick`: steps 1-3. `--dry-run`: the same script on a CPU at tiny shapes, the C++ backend
standing in for CUDA, TRL on CPU; every GPU figure reads "not measured (no GPU)".
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NO_GPU = "not measured (no GPU)"
STEPS = ("environment", "build", "correctness", "kernels", "training")
QUICK_STEPS = STEPS[:3]
# Seconds per step: the full run fits 8 minutes, the quick one 2 (each also stops at the overall deadline).
LIMITS = {"environment": 30, "build": 90, "correctness": 60, "kernels": 90, "training": 210}
TOTAL = {"full": 480, "quick": 120, "dry-run": 300}
VERSIONS = ("torch", "triton", "deepspeed", "transformers", "accelerate", "peft", "datasets", "trl", "liger-kernel",
            "flash-attn", "bitsandbytes")

# Model shapes (LlamaConfig keyword arguments). SMOLLM2 is SmolLM2-135M's; LLAMA_1B5 a Llama of 1.5B parameters.
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
               rope_theta=100000.0)
LLAMA_1B5 = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)
# Per mode: (model, batch, length, steps) of the SmolLM2 job and of the MFU job.
JOBS = {
    "gpu": {"smollm2": (SMOLLM2, 8, 1024, 20), "mfu": (LLAMA_1B5, None, 2048, 10)},
    "dry-run": {"smollm2": (TINY, 2, 64, 3), "mfu": (TINY, 2, 128, 2)},
}
WARMUP_STEPS = {"gpu": 5, "dry-run": 1}


# ----------------------------------------------------------------------------- helpers


def version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_present(dry_run: bool) -> bool:
    import torch

    return not dry_run and torch.cuda.is_available()


def run_logged(cmd: list[str], log: Path | str, timeout: float, env: Optional[dict] = None) -> int:
    """Run `cmd` in its own process group, appending its output to `log`; the group dies at `timeout`."""
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env or child_env(),
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            fh.write(f"\n[killed after {timeout:.0f} s]\n")
            raise


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                PYTHONUNBUFFERED="1")


def tail(path: Path | str, lines: int = 15) -> str:
    path = Path(path)
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ----------------------------------------------------------------------------- step 1: environment


def step_environment(ctx: dict) -> dict:
    import platform

    import torch

    from dpo_ds.metrics import peak_bf16_tflops

    out: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "versions": {name: version(name) for name in VERSIONS},
                           "torch_cuda": torch.version.cuda}
    if not gpu_present(ctx["dry_run"]):
        out.update(gpu=NO_GPU, driver=NO_GPU, hbm_gbs=NO_GPU, bf16_matmul_tflops=NO_GPU, datasheet_bf16_tflops=NO_GPU)
        return out
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    out.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
               multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
               driver=smi.stdout.strip() or smi.stderr.strip(),
               hbm_gbs=copy_bandwidth_gbs(), bf16_matmul_tflops=matmul_tflops(),
               datasheet_bf16_tflops=peak_bf16_tflops(props.name))
    return out


def _median_ms(fn: Callable[[], Any], warmup: int = 3, repeats: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(gib: int = 2) -> float:
    """Device-to-device copy of `gib` GiB (random data), counting bytes read plus written."""
    import torch

    src = torch.randn(gib * 2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms / 1e3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n x n x n products on random data (zeros run faster than real data)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _median_ms(lambda: a @ b)
    return 2 * n**3 / (ms / 1e3) / 1e12


# ----------------------------------------------------------------------------- step 2: build


def step_build(ctx: dict) -> dict:
    """Build (JIT) each fused backend the device uses, timed; the C++ one stands in for CUDA on a CPU."""
    from dpo_ds.ops.backends import Backend

    names = ("cuda", "triton") if gpu_present(ctx["dry_run"]) else ("cpp",)
    backends = {name: Backend(name) for name in names}
    out: dict[str, Any] = {} if backends.keys() != {"cpp"} else {"cuda": NO_GPU, "triton": NO_GPU}
    failed = []
    for name, backend in backends.items():
        start = time.perf_counter()
        try:
            backend.kernels()
            out[name] = {"seconds": time.perf_counter() - start}
        except Exception as err:  # recorded: the other backend still builds
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            failed.append(name)
    if failed:
        raise StepFailed(f"could not build {', '.join(failed)}", out)
    return out


class StepFailed(Exception):
    """A step that ran but whose outcome is a failure; `result` still holds what it measured."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------- step 3: correctness


def step_correctness(ctx: dict) -> dict:
    """pytest on the device: every `gpu` test; on a CPU, the device ops tests with the C++ backend."""
    import xml.etree.ElementTree as ET

    junit = Path(ctx["work"]) / "correctness.xml"
    if gpu_present(ctx["dry_run"]):
        # Only the files that hold gpu tests: others import what the GPU image lacks (gguf, the built-in model).
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text() or "marks=gpu" in p.read_text())
        selection = ["-m", "gpu", *files]
    else:
        selection = ["-m", "not gpu", "tests/test_ops_device.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *selection]
    code = subprocess.run(cmd, cwd=REPO, env=child_env()).returncode
    if not junit.exists():
        raise StepFailed(f"pytest exited with code {code} before writing a report", {})
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    out = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
           "failing": failing, "selection": " ".join(selection)}
    if code != 0 or out["passed"] == 0:
        raise StepFailed(f"pytest exit code {code}: {len(failing)} failing, {out['passed']} passed", out)
    return out


# ----------------------------------------------------------------------------- step 4: kernels


def step_kernels(ctx: dict) -> dict:
    """benchmarks/logprobs.py, both variants, against the ceilings step 1 measured."""
    gpu = gpu_present(ctx["dry_run"])
    env_result = ctx["results"].get("environment", {}).get("result", {})
    ceilings = {"--bandwidth-gbs": env_result.get("hbm_gbs"), "--matmul-tflops": env_result.get("bf16_matmul_tflops")}
    base = [sys.executable, str(REPO / "benchmarks" / "logprobs.py"), "--repeats", "3" if gpu else "1"]
    base += [x for flag, value in ceilings.items() if isinstance(value, float) for x in (flag, str(value))]
    if gpu:
        shapes = {"linear": ["--device", "cuda", "--impls", "naive", "trl_chunked", "liger", "cuda", "triton"],
                  "logits": ["--device", "cuda", "--impls", "naive", "trl_chunked", "cuda", "triton"]}
    else:
        # TRL's head is left out here (importing trl in every worker costs the rehearsal more than it checks),
        # and the logits variant differs from the linear one by a flag only.
        shapes = {"linear": ["--device", "cpu", "--hidden", "64", "--vocab", "1000", "--tokens", "256", "--dtype",
                             "float32", "--impls", "naive", "cpp"]}
    out, errors = {}, []
    for variant, args in shapes.items():
        path = Path(ctx["work"]) / f"kernels_{variant}.json"
        code = subprocess.run(base + args + ["--variant", variant, "--json", str(path)], cwd=REPO,
                              env=child_env()).returncode
        if code != 0 or not path.exists():
            errors.append(f"{variant}: logprobs.py exit code {code}")
            continue
        rows = json.loads(path.read_text())
        for row in rows:
            if not gpu:
                row["roofline_pct"] = NO_GPU
        out[variant] = rows
        errors += [f"{variant} {r['name']}: {r['error']}" for r in rows if "error" in r and r["name"] != "liger"]
    if errors:
        raise StepFailed("; ".join(errors), out)
    return out


# ----------------------------------------------------------------------------- step 5: training


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (one token per byte, no merges) saved to `path`: built here, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)


def make_model(path: Path, shape: dict, device: str) -> str:
    """A randomly initialized Llama of `shape` with the byte tokenizer, saved in bf16 to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(path)
    byte_tokenizer(path)
    return str(path)


def make_data(path: Path, rows: int, length: int, seed: int = 0) -> str:
    """Standard-format pairs of random words whose prompt + completion + EOS fit `length` bytes = tokens.

    Lengths vary (prompt 30-50% of `length`, completions 10-48%) so that packing has something to pack."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "omega", "sigma", "tango", "zulu"]

    def text(n: int) -> str:
        out = ""
        while len(out) < n:
            out += " " + rng.choice(words)
        return out[:n]

    with open(path, "w") as fh:
        for _ in range(rows):
            prompt = text(rng.randint(int(0.3 * length), int(0.5 * length)))
            chosen, rejected = (text(rng.randint(int(0.1 * length), int(0.48 * length))) for _ in range(2))
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return str(path)


def torch_device_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def largest_batch(model_dir: str, length: int, memory_bytes: int) -> int:
    """The largest micro-batch `dpo-ds estimate` fits in 90% of the GPU (precomputed reference, no checkpointing)."""
    from dpo_ds.config import DPOConfig
    from dpo_ds.tools.estimate import estimate, model_shape

    args = DPOConfig(model_name_or_path=model_dir, max_length=length, bf16=True, precompute_ref_log_probs=True,
                     deepspeed=str(REPO / "ds_configs" / "zero3.json"), padding_free=True)
    fits = estimate(args, model_shape(model_dir), gpu_memory=int(0.9 * memory_bytes))
    return max(1, int(fits["max_micro_batch"]["no_checkpointing"]))


# name -> DPOConfig overrides of a training run (all: bf16 on a GPU, ZeRO-3 policy, sdpa, packing).
RUNS = {
    "reference offloaded to CPU": {"ref_zero_stage": 3, "ref_offload": "cpu"},
    "reference on GPU": {"ref_zero_stage": 3, "ref_offload": "none"},
    "precomputed reference": {"precompute_ref_log_probs": True},
}
MFU_RUN = "MFU job, precomputed reference"


def train_worker(runs: list[dict], dry_run: bool) -> list[dict]:
    """Run each of `runs` as a DPOTrainer in this process, one after the other; a row per run."""
    import torch

    from dpo_ds import distributed
    from dpo_ds.config import DPOConfig
    from dpo_ds.trainer import DPOTrainer

    distributed.init()
    gpu = torch.cuda.is_available() and not dry_run
    rows = []
    for run in runs:
        out_dir = Path(run["work"])
        overrides = dict(run["overrides"])
        if overrides.get("precompute_ref_log_probs"):
            overrides["ref_cache_dir"] = str(out_dir / "ref_cache")
        args = DPOConfig(**{
            **dict(model_name_or_path=run["model"], dataset_name=run["data"], dataset_test_split=None,
                   output_dir=str(out_dir), per_device_train_batch_size=run["batch"], max_length=run["length"],
                   max_steps=run["steps"], logging_steps=1, save_steps=None, eval_strategy="no",
                   disable_tqdm=True, bf16=gpu, model_init_kwargs={"dtype": "float32"}, attn_implementation="sdpa",
                   padding_free=True, deepspeed=str(REPO / "ds_configs" / "zero3.json"), learning_rate=1e-5),
            **overrides,
        })
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer = DPOTrainer(args=args)
        history = trainer.train()["history"]
        trainer.close()
        rows.append(summarize_run(run, history, trainer, gpu))
        del trainer
        gc.collect()  # the engines hold reference cycles: free this run's memory before the next one starts
        if gpu:
            torch.cuda.empty_cache()
    distributed.shutdown()
    return rows


def summarize_run(run: dict, history: list[dict], trainer: Any, gpu: bool) -> dict:
    import torch

    timed = history[run["warmup"]:] or history

    def median(key: str) -> Any:
        values = [h[key] for h in timed if key in h]
        return statistics.median(values) if values else (None if gpu else NO_GPU)

    return {"run": run["name"], "batch": run["batch"], "length": run["length"], "steps": len(history),
            "timed_steps": len(timed), "step_seconds": median("step_time"),
            "tokens_per_second_per_device": median("tokens_per_second_per_device"), "mfu": median("mfu"),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else NO_GPU,
            "step1_loss": history[0]["loss"], "zero_stage": trainer.engines.ds_config["zero_optimization"]["stage"]}


def job_runs(work: Path, job: str, mode: str, device: str, names: dict[str, dict], batch: Optional[int] = None,
             seed: int = 0) -> list[dict]:
    """A model and data for `JOBS[mode][job]` (`batch` overrides its batch), and one run spec per name."""
    shape, default_batch, length, steps = JOBS[mode][job]
    batch = batch or default_batch
    model = work / job
    if not model.exists():  # the MFU job's model is made before its batch is estimated
        make_model(model, shape, device)
    data = make_data(work / f"{job}_{batch}.jsonl", batch * steps, length, seed)
    warmup = min(WARMUP_STEPS[mode], steps - 1)
    return [dict(name=name, model=str(model), data=data, batch=batch, length=length, steps=steps, warmup=warmup,
                 overrides=overrides, work=str(work / "runs" / f"{job}_{batch}_{i}"))
            for i, (name, overrides) in enumerate(names.items())]


def step_training(ctx: dict) -> dict:
    """The SmolLM2-shaped runs, TRL's DPOTrainer on the same job, and the 1.5B MFU run.

    On a GPU the MFU run gets its own process (a fresh CUDA memory pool; the batch `dpo-ds estimate`
    fits, halved once if that fails); the dry run trains all four in one process, which saves starts."""
    gpu = gpu_present(ctx["dry_run"])
    mode, device = ("gpu", "cuda") if gpu else ("dry-run", "cpu")
    work = Path(ctx["work"])
    out: dict[str, Any] = {}
    errors: list[str] = []

    def remaining() -> float:
        return ctx["deadline"] - time.time()

    smollm2 = job_runs(work, "smollm2", mode, device, RUNS)
    shape, batch, length, _ = JOBS[mode]["mfu"]
    make_model(work / "mfu", shape, device)
    # The dry run estimates for a pretend 8 GiB card, to rehearse the estimate, and keeps its tiny batch.
    memory = torch_device_memory() if gpu else 8 * 2**30
    out["mfu_batch_estimate"] = largest_batch(str(work / "mfu"), length, memory)
    mfu = job_runs(work, "mfu", mode, device, {MFU_RUN: RUNS["precomputed reference"]},
                   out["mfu_batch_estimate"] if gpu else batch, seed=1)
    rows = run_train_worker(smollm2 if gpu else smollm2 + mfu, ctx, work / "train_smollm2.json",
                            remaining() * (0.4 if gpu else 0.6), errors)
    out["dpo_ds"] = [r for r in rows or [] if r["run"] != MFU_RUN]

    first = smollm2[0]
    trl_json = work / "step_vs_trl.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_vs_trl.py"), "--device", device, "--model", first["model"],
           "--data", first["data"], "--steps", str(first["steps"]), "--warmup", str(first["warmup"]),
           "--batch_size", str(first["batch"]), "--max_length", str(first["length"]), "--dpo_ds_deepspeed", "zero3",
           "--dpo_ds_features", "none", "--json", str(trl_json)]
    try:
        code = run_logged(cmd, ctx["log"], remaining() * (0.4 if gpu else 0.95))
        if code == 0:
            out["trl"] = [{k: row.get(k) for k in ("label", "seconds_per_step", "peak_memory_mib", "step1_loss",
                                                    "tokens_per_step", "seconds_per_step_ratio")}
                          for row in json.loads(trl_json.read_text())["results"][device]]
        else:
            errors.append(f"step_vs_trl.py exit code {code}")
    except subprocess.TimeoutExpired:
        errors.append("step_vs_trl.py ran out of time")

    if gpu:
        for _ in range(2):
            rows = run_train_worker(mfu, ctx, work / f"train_mfu_{mfu[0]['batch']}.json", remaining() - 5, errors)
            if rows or mfu[0]["batch"] == 1:
                break
            mfu = job_runs(work, "mfu", mode, device, {MFU_RUN: RUNS["precomputed reference"]},
                           max(1, mfu[0]["batch"] // 2), seed=1)
    out["mfu"] = [r for r in rows or [] if r["run"] == MFU_RUN]
    if errors:
        raise StepFailed("; ".join(errors), out)
    return out


def run_train_worker(runs: list[dict], ctx: dict, result: Path, timeout: float, errors: list[str]) -> Optional[list]:
    """`train_worker(runs)` in a fresh process (its own DeepSpeed and CUDA state): its rows, or None and an error."""
    spec = result.with_suffix(".spec.json")
    spec.write_text(json.dumps({"runs": runs, "dry_run": ctx["dry_run"]}))
    cmd = [sys.executable, __file__, "--_train", str(spec), "--_result", str(result)]
    what = f"{[r['name'] for r in runs]} (batch {runs[0]['batch']})"
    try:
        code = run_logged(cmd, ctx["log"], timeout)
    except subprocess.TimeoutExpired:
        errors.append(f"{what} ran out of time")
        return None
    if code != 0 or not result.exists():
        errors.append(f"{what} exit code {code}: {tail(ctx['log'], 3)}")
        return None
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- driver


STEP_FUNCTIONS = {"environment": step_environment, "build": step_build, "correctness": step_correctness,
                  "kernels": step_kernels, "training": step_training}


def run_step_here(name: str, ctx: dict, result_path: Path) -> None:
    """Child process: run one step and write {status, result, error}."""
    try:
        record = {"status": "ok", "result": STEP_FUNCTIONS[name](ctx)}
    except StepFailed as err:
        record = {"status": "failed", "result": err.result, "error": str(err)}
    except Exception as err:
        record = {"status": "failed", "result": {}, "error": f"{type(err).__name__}: {err}"}
    result_path.write_text(json.dumps(record, indent=2, default=str))


def clear_build_batons() -> None:
    """Remove torch's extension-build locks, which a step killed mid-build leaves behind (and at which every
    later build would wait forever). Only on the GPU machine: the check is the only builder there."""
    from torch.utils.cpp_extension import get_default_build_root

    roots = [Path(get_default_build_root())]
    if os.environ.get("DPO_DS_CACHE"):
        roots.append(Path(os.environ["DPO_DS_CACHE"]) / "torch_extensions")
    for root in roots:
        for baton in root.glob("*/lock"):
            baton.unlink(missing_ok=True)


def run_step(name: str, ctx: dict, out_dir: Path, limit: float) -> dict:
    """One step in a child process under `limit` seconds; a crash or timeout becomes the step's record."""
    if not ctx["dry_run"]:
        clear_build_batons()
    log = out_dir / f"log-{name}.txt"
    log.write_text("")
    result_path = Path(ctx["work"]) / f"{name}.result.json"
    ctx = {**ctx, "log": str(log), "deadline": time.time() + limit - 3}
    ctx_path = Path(ctx["work"]) / f"{name}.ctx.json"
    ctx_path.write_text(json.dumps(ctx, default=str))
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--_step", name, "--_ctx", str(ctx_path), "--_result", str(result_path)]
    try:
        code = run_logged(cmd, log, limit)
        record = json.loads(result_path.read_text()) if result_path.exists() else {
            "status": "failed", "result": {}, "error": f"exit code {code}: {tail(log, 5)}"}
    except subprocess.TimeoutExpired:
        record = {"status": "timeout", "result": {}, "error": f"stopped after its {limit:.0f} s"}
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["limit_seconds"] = round(limit)
    return record


def revision() -> Optional[str]:
    run = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "gpu_results")
    p.add_argument("--quick", action="store_true", help="steps 1-3 only (environment, build, correctness)")
    p.add_argument("--dry-run", action="store_true", help="rehearse on a CPU: tiny shapes, no GPU figures")
    p.add_argument("--wheels", default="", help="what scripts/gpu_check.sh did with .whl/ (recorded)")
    p.add_argument("--_step", help=argparse.SUPPRESS)
    p.add_argument("--_ctx", help=argparse.SUPPRESS)
    p.add_argument("--_train", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts._step:
        run_step_here(opts._step, json.loads(Path(opts._ctx).read_text()), Path(opts._result))
        return 0
    if opts._train:
        spec = json.loads(Path(opts._train).read_text())
        Path(opts._result).write_text(json.dumps(train_worker(spec["runs"], spec["dry_run"])))
        return 0

    mode = "dry-run" if opts.dry_run else "quick" if opts.quick else "full"
    steps = QUICK_STEPS if opts.quick else STEPS
    opts.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + TOTAL[mode]
    report: dict[str, Any] = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "revision": revision(), "wheels": opts.wheels, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in steps:
            limit = min(LIMITS[name] * (3 if opts.dry_run else 1), deadline - time.time())
            if limit < 5:
                report["steps"][name] = {"status": "skipped", "result": {}, "error": "no time left"}
                continue
            ctx = {"dry_run": opts.dry_run, "work": work, "results": report["steps"]}
            print(f"gpu_check: {name} (up to {limit:.0f} s) ...", flush=True)
            report["steps"][name] = run_step(name, ctx, opts.out, limit)
            print(f"gpu_check: {name}: {report['steps'][name]['status']} in {report['steps'][name]['seconds']} s",
                  flush=True)
            write_report(report, opts.out)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_report(report, opts.out)
    print((opts.out / "results.md").read_text())
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


# ----------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def mfu_vs_measured(mfu: Any, env: dict) -> Any:
    """MFU rescaled from the datasheet peak to the matmul rate step 1 measured (the card's real ceiling)."""
    peak, measured = env.get("datasheet_bf16_tflops"), env.get("bf16_matmul_tflops")
    if all(isinstance(v, float) for v in (mfu, peak, measured)):
        return mfu * peak / measured
    return NO_GPU if isinstance(mfu, str) else None


def targets(report: dict) -> list[dict]:
    """Issue 15's targets against what this run measured: met, missed, or not measured."""
    steps = report["steps"]
    kernels = steps.get("kernels", {}).get("result", {})
    training = steps.get("training", {}).get("result", {})

    def ours(variant: str) -> list[dict]:
        return [r for r in kernels.get(variant, []) if r["name"] in ("cuda", "triton") and "ms" in r]

    def rows(variant: str, name: str) -> Optional[dict]:
        return next((r for r in kernels.get(variant, []) if r["name"] == name and "ms" in r), None)

    logits = [r["roofline_pct"] for r in ours("logits") if isinstance(r.get("roofline_pct"), float)]
    trl, best = rows("linear", "trl_chunked"), min(ours("linear"), key=lambda r: r["ms"], default=None)
    mfu = next((r["mfu"] for r in training.get("mfu", []) if isinstance(r.get("mfu"), float)), None)
    step = next((r["seconds_per_step_ratio"] for r in training.get("trl", [])
                 if r["label"] != "trl" and isinstance(r.get("seconds_per_step_ratio"), float)), None)
    out = [
        ("logits variant >= 80% of the measured HBM bandwidth", max(logits) if logits else None,
         lambda v: v >= 80, "{:.1f}%"),
        ("fused linear >= 1.2x TRL's head at no more peak memory",
         trl["ms"] / best["ms"] if trl and best else None,
         lambda v: v >= 1.2 and best["peak_mb"] <= trl["peak_mb"], "{:.2f}x"),
        ("1.5B with precomputed reference >= 45% MFU", mfu, lambda v: v >= 0.45, "{:.3f}"),
        ("dpo_ds step >= 1.5x TRL's at the SmolLM2 shape", 1 / step if step else None, lambda v: v >= 1.5,
         "{:.2f}x"),
    ]
    gpu = isinstance(steps.get("environment", {}).get("result", {}).get("bf16_matmul_tflops"), float)
    return [{"target": name, "measured": fmt_.format(v) if v is not None and gpu else NO_GPU if not gpu else None,
             "met": bool(check(v)) if v is not None and gpu else None} for name, v, check, fmt_ in out] + [
        {"target": "1.5B with the offloaded online reference >= 35% MFU", "measured": "not run by this check",
         "met": None}]


def write_report(report: dict, out: Path) -> None:
    report["targets"] = targets(report)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    steps = report["steps"]
    lines = [f"# GPU check ({report['mode']}), {report['started']}, dpo_ds {report['revision']}", "",
             f"wheels: {report['wheels'] or '-'}", "", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {fmt(t['measured'])} | {fmt(t['met'])} |" for t in report.get("targets", [])]
    lines += ["", "| step | status | seconds | limit s | error |", "|---|---|---:|---:|---|"]
    for name, s in steps.items():
        error = (s.get("error") or "").replace("\n", " ").replace("|", "/")[:300]
        lines.append(f"| {name} | {s['status']} | {fmt(s.get('seconds'))} | {fmt(s.get('limit_seconds'))} | {error} |")
    env = steps.get("environment", {}).get("result", {})
    if env:
        lines += ["", "## Environment", "", f"GPU {env.get('gpu')}, driver {env.get('driver')}, Python "
                  f"{env.get('python')}, CUDA {env.get('torch_cuda')}; measured: HBM copy {fmt(env.get('hbm_gbs'))} "
                  f"GB/s, bf16 matmul {fmt(env.get('bf16_matmul_tflops'))} TFLOP/s", "",
                  ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())]
    build = steps.get("build", {}).get("result", {})
    if build:
        lines += ["", "## Build", "", ", ".join(f"{k}: {fmt(v.get('seconds')) + ' s' if isinstance(v, dict) and 'seconds' in v else v}"
                                                 for k, v in build.items())]
    tests = steps.get("correctness", {}).get("result", {})
    if tests:
        lines += ["", "## Correctness", "", f"`pytest {tests.get('selection')}`: {tests.get('passed')} passed, "
                  f"{tests.get('failures')} failed, {tests.get('errors')} errors, {tests.get('skipped')} skipped"]
        lines += [f"- failing: {name}" for name in tests.get("failing", [])]
    kernels = steps.get("kernels", {}).get("result", {})
    for variant, rows in kernels.items():
        lines += ["", f"## Kernels: {variant} variant", "", "| impl | tokens | dtype | ms | peak MiB | max err | "
                  "% of roofline |", "|---|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['tokens']} | {r['dtype']} | {fmt(r.get('ms'))} | {fmt(r.get('peak_mb'))} | "
                         f"{fmt(r.get('max_abs_err'))} | {fmt(r.get('roofline_pct', r.get('error')))} |")
    training = steps.get("training", {}).get("result", {})
    runs = training.get("dpo_ds", []) + training.get("mfu", [])
    if runs:
        lines += ["", "## Training (dpo_ds)", "", f"MFU over the datasheet peak ({fmt(env.get('datasheet_bf16_tflops'))} "
                  f"TFLOP/s) and over the measured matmul rate; the MFU job's estimated batch: "
                  f"{fmt(training.get('mfu_batch_estimate'))}", "",
                  "| run | batch | length | s/step | tokens/s/device | MFU | MFU vs measured | peak GiB | step-1 loss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            lines.append(f"| {r['run']} | {r['batch']} | {r['length']} | {fmt(r['step_seconds'])} | "
                         f"{fmt(r['tokens_per_second_per_device'])} | {fmt(r['mfu'])} | "
                         f"{fmt(mfu_vs_measured(r['mfu'], env))} | {fmt(r['peak_memory_gib'])} | "
                         f"{fmt(r['step1_loss'], 5)} |")
    if training.get("trl"):
        lines += ["", "## TRL 1.16 vs dpo_ds (benchmarks/step_vs_trl.py)", "", "| side | s/step | peak MiB | "
                  "step-1 loss | tokens/step | s/step vs TRL |", "|---|---:|---:|---:|---:|---:|"]
        for r in training["trl"]:
            lines.append(f"| {r['label']} | {fmt(r['seconds_per_step'])} | {fmt(r['peak_memory_mib'])} | "
                         f"{fmt(r['step1_loss'], 5)} | {fmt(r['tokens_per_step'])} | {fmt(r['seconds_per_step_ratio'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
