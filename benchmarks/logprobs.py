"""Time forward+backward and peak extra memory of per-token log-prob implementations.

Memory is measured in a fresh subprocess per (implementation, size), so one
run's memory never shows up in another's; time in one subprocess per size in
which the implementations take turns (median of `--repeats` rounds after a
warm-up each), so a machine whose load drifts slows each alike. Peak extra
memory is, on CPU, the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs once the inputs exist and the
implementation is imported, its extension loaded) minus its RSS at that point;
on CUDA, `torch.cuda.max_memory_allocated` minus the memory allocated then.
Both count the gradients an implementation returns. `max_abs_err` is the
largest |logp - logp_float64| over the tokens. Given the measured ceilings
(`--bandwidth-gbs`, `--matmul-tflops`), `roofline_pct` is the share of them a
pass reaches: for the logits variant the fewest bytes a forward + backward
moves (read the logits twice, write their gradient: 3 N V bytes/element) over
the bandwidth; for the linear variant its matmul FLOPs (logits, hidden and
weight gradients: 6 N V H) over the matmul rate.

    python benchmarks/logprobs.py                       # CPU: SmolLM2 head, 1024-4096 tokens
    python benchmarks/logprobs.py --device cuda         # H=4096, V=151936, 16384 bf16 tokens
    python benchmarks/logprobs.py --variant logits --json out.json
    python benchmarks/logprobs.py --device cuda --bandwidth-gbs 4300 --matmul-tflops 790   # + % of roofline

`liger` (CUDA only, when liger-kernel is installed) is Liger's fused linear
cross-entropy with `reduction="none"`: its per-token losses are -logp.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IGNORE = -100
CPU_DEFAULTS = dict(hidden=576, vocab=49152, tokens=[1024, 2048, 4096], dtype="float32")
GPU_DEFAULTS = dict(hidden=4096, vocab=151936, tokens=[16384], dtype="bfloat16")
IMPLS = {
    "cpu": ["naive", "trl_chunked", "torch_ref", "cpp"],
    "cuda": ["naive", "trl_chunked", "liger", "torch_ref", "triton", "cuda"],
}
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def make_inputs(args) -> dict:
    """Seeded inputs, identical in every worker: an LM head of realistic scale and its labels."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.n, args.hidden, args.vocab
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=gen)
    if args.ignore_frac:
        labels[: int(n * args.ignore_frac)] = IGNORE  # a prompt: the first tokens carry no label
    out = dict(hidden=hidden.to(args.device, dtype), weight=weight.to(args.device, dtype),
               labels=labels.to(args.device))
    if args.variant == "logits":
        out["logits"] = (out["hidden"] @ out["weight"].T).detach()
    return out


def reference_logps(inputs: dict, variant: str) -> torch.Tensor:
    """float64 log p(label), a chunk of rows at a time."""
    labels = inputs["labels"]
    out = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    for start in range(0, labels.shape[0], 256):
        rows = slice(start, start + 256)
        if variant == "logits":
            z = inputs["logits"][rows].double()
        else:
            z = inputs["hidden"][rows].double() @ inputs["weight"].double().T
        lab = labels[rows]
        logp = torch.log_softmax(z, -1).gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
        out[rows] = torch.where(lab != IGNORE, logp, 0.0)
    return out


def implementation(name: str, variant: str):
    """fn(inputs) -> per-token logps (differentiable), for one implementation."""
    if name == "naive":
        def naive(x):
            logits = x["logits"] if variant == "logits" else x["hidden"] @ x["weight"].T
            lab = x["labels"]
            logp = torch.log_softmax(logits.float(), -1).gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            return logp * (lab != IGNORE)
        return naive
    if name == "trl_chunked":
        if variant == "logits":
            from trl.trainer.utils import selective_log_softmax

            return lambda x: selective_log_softmax(x["logits"], x["labels"].clamp(min=0)) * (x["labels"] != IGNORE)
        from trl.kernels import ChunkedLogProbFunction

        def trl(x):
            mask = x["labels"] != IGNORE
            out = ChunkedLogProbFunction.apply(x["hidden"][mask], x["weight"], None, x["labels"][mask], 1.0,
                                               TRL_VOCAB_CHUNK, None, 1.0, ())[0]
            return x["hidden"].new_zeros(mask.shape, dtype=out.dtype).masked_scatter(mask, out)
        return trl
    if name == "liger":
        if variant == "logits":
            raise ValueError("liger has no logits variant (its fused head takes hidden states and the weight)")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda x: -liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none")
    from dpo_ds.ops import chunked
    from dpo_ds.ops.backends import Backend

    module = chunked if name == "torch_ref" else Backend(name)
    if name not in ("torch_ref",):
        module.kernels()  # build or load now, not inside the timed region
    if variant == "logits":
        return lambda x: module.logits_logprobs(x["logits"], x["labels"]).logps
    return lambda x: module.linear_logprobs(x["hidden"], x["weight"], x["labels"]).logps


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process, in MiB."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return _status_mb("VmRSS")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _setup(args) -> tuple[dict, list, torch.Tensor]:
    inputs = make_inputs(args)
    leaves = [inputs["logits"]] if args.variant == "logits" else [inputs["hidden"], inputs["weight"]]
    upstream = torch.randn(args.n, generator=torch.Generator().manual_seed(1)).to(args.device)
    return inputs, leaves, upstream


def _pass(fn, inputs: dict, leaves: list, upstream: torch.Tensor, device: str) -> tuple[float, torch.Tensor]:
    """One forward+backward: (seconds, logps)."""
    for leaf in leaves:
        leaf.requires_grad_(True)
        leaf.grad = None
    _sync(device)
    start = time.perf_counter()
    logps = fn(inputs)
    (logps * upstream).sum().backward()
    _sync(device)
    return time.perf_counter() - start, logps.detach()


def memory_worker(args) -> dict:
    """Own process, one implementation: peak extra memory over two forward+backward passes, and the error."""
    inputs, leaves, upstream = _setup(args)
    fn = implementation(args.worker_memory, args.variant)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    for _ in range(2):
        _, logps = _pass(fn, inputs, leaves, upstream, args.device)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mb("VmHWM") - base
    err = (logps.double() - reference_logps(inputs, args.variant)).abs().max().item()
    return dict(peak_mb=peak, max_abs_err=err)


def time_worker(args) -> dict:
    """Own process, all implementations taking turns: median ms of each after one warm-up pass each."""
    inputs, leaves, upstream = _setup(args)
    fns, failed = {}, {}
    for name in args.worker_time.split(","):
        try:  # one implementation that cannot load (liger not installed, say) must not cost the others' timings
            fns[name] = implementation(name, args.variant)
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {err}"
    times = {name: [] for name in fns}
    for round_ in range(args.repeats + 1):
        for name, fn in fns.items():
            seconds, _ = _pass(fn, inputs, leaves, upstream, args.device)
            if round_:
                times[name].append(seconds)
    return {**{name: 1000 * statistics.median(t) for name, t in times.items()}, **failed}


def _run_worker(args, mode: str, names: str, n: int):
    """A worker's JSON result, or its last error line."""
    cmd = [sys.executable, __file__, f"--worker-{mode}", names, "--n", str(n), "--device", args.device, "--variant",
           args.variant, "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--ignore-frac", str(args.ignore_frac)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {run.returncode}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(args, names: list[str], n: int) -> list[dict]:
    timed = _run_worker(args, "time", ",".join(names), n)
    rows = []
    for name in names:
        row = dict(name=name, variant=args.variant, tokens=n, dtype=args.dtype, device=args.device,
                   ignore_frac=args.ignore_frac)
        mem = _run_worker(args, "memory", name, n)
        failure = next((r for r in (timed, mem, timed.get(name) if isinstance(timed, dict) else None)
                        if isinstance(r, str)), None)
        if failure:
            row["error"] = failure
        else:
            row.update(ms=timed[name], **mem)
            pct = roofline_pct(args, n, row["ms"])
            if pct is not None:
                row["roofline_pct"] = pct
        rows.append(row)
        print_row(row, rows)
    return rows


def roofline_pct(args, n: int, ms: float) -> float | None:
    """% of the measured ceiling one forward + backward reaches (see the module docstring); None without it."""
    seconds = ms / 1e3
    if args.variant == "logits" and args.bandwidth_gbs:
        element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        return 100 * 3 * n * args.vocab * element / seconds / (args.bandwidth_gbs * 1e9)
    if args.variant == "linear" and args.matmul_tflops:
        return 100 * 6 * n * args.vocab * args.hidden / seconds / (args.matmul_tflops * 1e12)
    return None


def print_row(row: dict, rows: list[dict]) -> None:
    if "error" in row:
        print(f"{row['name']:<12} {row['tokens']:>6}  failed: {row['error']}", flush=True)
        return
    base = next((r for r in rows if r["name"] == "naive" and "ms" in r), None)
    ratio = f"{base['ms'] / row['ms']:6.2f}x {row['peak_mb'] / base['peak_mb']:8.3f}" if base else ""
    roofline = f"  {row['roofline_pct']:.1f}% of roofline" if "roofline_pct" in row else ""
    print(f"{row['name']:<12} {row['tokens']:>6} {row['ms']:>10.1f} {row['peak_mb']:>9.1f} "
          f"{row['max_abs_err']:>9.2e}  {ratio}{roofline}", flush=True)


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", default="linear", choices=["linear", "logits"])
    parser.add_argument("--impls", nargs="+", help="default: every implementation for the device")
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of tokens with an ignored label")
    parser.add_argument("--bandwidth-gbs", type=float, help="measured memory bandwidth: logits-variant roofline")
    parser.add_argument("--matmul-tflops", type=float, help="measured matmul rate: linear-variant roofline")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker-time", help=argparse.SUPPRESS)
    parser.add_argument("--worker-memory", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = CPU_DEFAULTS if args.device == "cpu" else GPU_DEFAULTS
    for key in ("hidden", "vocab", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.worker_memory:
        print(json.dumps(memory_worker(args)))
        return
    if args.worker_time:
        print(json.dumps(time_worker(args)))
        return
    print(f"{args.variant} variant on {args.device}: H={args.hidden} V={args.vocab} {args.dtype}, "
          f"{torch.get_num_threads()} threads, ignored fraction {args.ignore_frac}")
    print(f"{'impl':<12} {'tokens':>6} {'ms':>10} {'peak MB':>9} {'max|err|':>9}  vs naive: speed, memory")
    rows = []
    for n in args.tokens or defaults["tokens"]:
        rows += measure(args, args.impls or IMPLS[args.device], n)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
