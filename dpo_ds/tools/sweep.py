"""`dpo-ds sweep`: the same short DPO job under several DeepSpeed configs (and `--set` values).

Each combination runs `launch/train.py` under the DeepSpeed launcher in its own process group,
one after the other; a failure, an out-of-memory or a timeout is recorded and the sweep goes on.
Measured per run: tokens/s and seconds per step (the mean over logged steps after the first,
which pays for warm-up), the step-1 and last losses, and peak memory:

- on GPU, `max_memory_allocated` from the run's metrics.jsonl (bytes, the max over ranks of
  `torch.cuda.max_memory_allocated()`), when the trainer logs it;
- otherwise the peak resident set size of the largest single process of the run (one rank),
  as the kernel records it: `wait4()` on the launcher returns the max RSS of every descendant
  it reaped, so nothing is sampled and no peak is missed. It includes the Python, torch and
  DeepSpeed runtime of the process (several hundred MiB), not only the training state.

The step-1 loss must not depend on the DeepSpeed config: runs with the same `--set` values are
compared with the first successful one, and a difference beyond `--loss_tolerance` is flagged.
`dpo-ds estimate` figures sit beside the measured peaks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import ConfigError, DPOConfig
from ..parser import parse_known

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"
MIB = 2**20
OOM_PATTERNS = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|return code = -9")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")

USAGE = """usage: dpo-ds sweep --deepspeed CONFIG.json [CONFIG.json ...] --out DIR [--steps N]
                    [--set KEY=V1,V2,...] [--num_gpus G] [--timeout SECONDS] [--loss_tolerance T]
                    [--config run.yaml] [--any_training_flag VALUE ...]

Run the same short DPO job under every DeepSpeed config x every combination of --set values, each
in its own process (one after the other; failures and out-of-memory are recorded, not fatal), and
write DIR/results.json, DIR/results.md (a table sorted by tokens/s) and DIR/results.png (tokens/s
against peak memory). Each run's output and log are in DIR/runs/NN-NAME/. Exits 0 when all runs are
recorded, 1 when a config changed the step-1 loss (compared across runs with the same --set values).

  --deepspeed FILES     DeepSpeed JSON configs to compare
  --set KEY=V1,V2       training key and the values to try (repeatable; combinations multiply)
  --steps N             optimizer steps per run (default 5; each step is logged)
  --out DIR             where results and run directories go
  --num_gpus G          ranks per run (default: the visible GPUs, or 1 without a GPU)
  --timeout SECONDS     limit per run (default 3600); a run past it is killed and recorded
  --loss_tolerance T    largest step-1 loss difference between configs not flagged (default 1e-3)
Other flags (and --config) are training flags, passed to every run."""


@dataclass(frozen=True)
class Combo:
    """One run of the sweep: a DeepSpeed config and the --set values it gets."""

    deepspeed: str
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return " ".join([Path(self.deepspeed).stem, *(f"{k}={v}" for k, v in self.overrides)])

    def flags(self) -> list[str]:
        return ["--deepspeed", self.deepspeed, *itertools.chain.from_iterable((f"--{k}", v) for k, v in self.overrides)]


@dataclass
class SweepOptions:
    """The sweep's own flags; `train_flags` are passed to every run."""

    deepspeed: list[str]
    out: Path
    steps: int = 5
    sets: list[tuple[str, list[str]]] = field(default_factory=list)
    num_gpus: Optional[int] = None
    timeout: float = 3600.0
    loss_tolerance: float = 1e-3
    train_flags: list[str] = field(default_factory=list)


def parse_sweep_args(argv: list[str]) -> Optional[SweepOptions]:
    """The sweep's flags; None for --help. Unknown flags are left for the training config to judge."""
    parser = argparse.ArgumentParser(prog="dpo-ds sweep", add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--deepspeed", nargs="+", action="extend", default=[])
    parser.add_argument("--set", nargs="+", action="extend", dest="sets", default=[], type=_set_type)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=_number("--steps", int, 1, False), default=5)
    parser.add_argument("--num_gpus", type=_number("--num_gpus", int, 1, False))
    parser.add_argument("--timeout", type=_number("--timeout", float, 0, True), default=3600.0)
    parser.add_argument("--loss_tolerance", type=_number("--loss_tolerance", float, 0, False), default=1e-3)
    try:
        own, train = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(str(err)) from None
    if own.help:
        return None
    if not own.deepspeed:
        raise ConfigError("dpo-ds sweep needs --deepspeed with at least one DeepSpeed config file")
    if own.out is None:
        raise ConfigError("dpo-ds sweep needs --out DIR (where the results go)")
    return SweepOptions(deepspeed=own.deepspeed, out=own.out, steps=own.steps, sets=own.sets,
                        num_gpus=own.num_gpus, timeout=own.timeout, loss_tolerance=own.loss_tolerance,
                        train_flags=train)


def _number(flag: str, kind: type, low: float, strict: bool) -> Callable[[str], Any]:
    """argparse type: a number of `kind` >= low (> low when strict); the error names the flag."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected {'an integer' if kind is int else 'a number'} "
                                             f"{'>' if strict else '>='} {low}")
        return value
    return parse


def _set_type(word: str) -> tuple[str, list[str]]:
    """argparse type of --set KEY=V1,V2 (the error keeps _parse_set's message)."""
    try:
        return _parse_set(word)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse_set(word: str) -> tuple[str, list[str]]:
    key, eq, values = word.partition("=")
    key = key.strip().replace("-", "_")
    options = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not key or not options:
        raise ConfigError(f"--set {word!r}: expected KEY=V1,V2,... (e.g. per_device_train_batch_size=1,2,4)")
    if key not in DPOConfig.__dataclass_fields__:
        raise ConfigError(f"--set {word!r}: {key!r} is not a training config key (see dpo-ds train --help)", key)
    return key, options


def combinations(deepspeed: list[str], sets: list[tuple[str, list[str]]]) -> list[Combo]:
    """Every DeepSpeed config x every combination of --set values, in the order given."""
    keys = [key for key, _ in sets]
    products = itertools.product(*(values for _, values in sets))
    choices = [tuple(zip(keys, values)) for values in products]
    return [Combo(ds, overrides) for ds in deepspeed for overrides in choices]


def run_flags(combo: Combo, opts: SweepOptions, run_dir: Path) -> list[str]:
    """Training flags of one run: the user's, the combination's, then what the sweep needs."""
    return [*opts.train_flags, *combo.flags(), "--max_steps", str(opts.steps), "--logging_steps", "1",
            "--save_steps", "none", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--output_dir", str(run_dir)]


@dataclass
class Outcome:
    """How one process tree ended: exit code, wall seconds, whether it was killed for time,
    and the largest peak RSS (bytes) among it and the descendants it reaped."""

    returncode: int
    seconds: float
    timed_out: bool
    peak_rss: int


# Runs the command as its child and records that child's peak RSS. Needed because a process forked
# straight from a big parent (pytest, a notebook) inherits the parent's RSS high-water mark across exec:
# wait4 on it would report the parent's size, not the run's.
_PEAK_TRAMPOLINE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], log_path: Path, timeout: float, env: Optional[dict] = None) -> Outcome:
    """Run `cmd` in its own session (so a timeout kills the whole tree), output into `log_path`.

    The peak is the largest RSS of the command's process tree as the kernel records it (ru_maxrss of the
    command and its waited-for descendants); 0 when the run was killed before it could be read.
    """
    start = time.perf_counter()
    peak_file = log_path.with_name(log_path.name + ".peak")
    peak_file.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_TRAMPOLINE, str(peak_file), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    timed_out = False
    try:
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    peak = int(peak_file.read_text()) if peak_file.exists() else 0
    return Outcome(proc.returncode, time.perf_counter() - start, timed_out, peak)


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(combo: Combo, outcome: Outcome, run_dir: Path, log_path: Path, steps: int) -> dict[str, Any]:
    """One run's record: status, throughput, losses and peak memory, read from its metrics.jsonl."""
    metrics_path = run_dir / "metrics.jsonl"
    rows = []
    if metrics_path.exists():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "global_step" in r]
    timed = [r for r in rows if r["global_step"] > 1] or rows
    gpu_peaks = [r["max_memory_allocated"] for r in rows if r.get("max_memory_allocated") is not None]
    log_text = log_path.read_text(errors="replace")
    if outcome.timed_out:
        status = "timeout"
    elif outcome.returncode == 0 and len({r["global_step"] for r in rows}) >= steps:
        status = "ok"
    elif OOM_PATTERNS.search(log_text):
        status = "oom"
    else:
        status = "failed"
    by_step = {r["global_step"]: r["loss"] for r in rows}
    record = {
        "name": combo.name,
        "deepspeed": combo.deepspeed,
        "set": dict(combo.overrides),
        "status": status,
        "returncode": outcome.returncode,
        "wall_seconds": outcome.seconds,
        "steps": len(by_step),
        "tokens_per_second": _mean([r["tokens_per_second"] for r in timed]),
        "seconds_per_step": _mean([r["step_time"] for r in timed]),
        "step1_loss": by_step.get(1),
        "last_loss": by_step[max(by_step)] if by_step else None,
        "peak_memory": max(gpu_peaks) if gpu_peaks else outcome.peak_rss,
        "peak_memory_kind": "gpu_max_allocated" if gpu_peaks else "cpu_peak_rss",
        "log": str(log_path),
    }
    if status != "ok":
        record["error"] = _error_line(log_text, status, outcome, len(by_step), steps)
    return record


def _error_line(log_text: str, status: str, outcome: Outcome, done: int, steps: int) -> str:
    """The most telling part of a failed run's log: an out-of-memory line, else the last Python
    exception with its message (which may span a few lines)."""
    if status == "timeout":
        return f"killed after {outcome.seconds:.0f} s (--timeout)"
    lines = log_text.splitlines()
    oom = [line.strip() for line in lines if OOM_PATTERNS.search(line)]
    if oom:
        return oom[-1][-400:]
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    if starts:
        message = [lines[starts[-1]]]
        for line in lines[starts[-1] + 1:starts[-1] + 4]:
            if not line.strip() or line.startswith(("[", "Traceback", "  File")):
                break
            message.append(line.strip())
        return " ".join(message)[-400:]
    if outcome.returncode == 0:
        return f"exited 0 after logging {done} of {steps} steps"
    last = [line.strip() for line in lines if line.strip()]
    return f"exit code {outcome.returncode}: " + (last[-1][-400:] if last else "no output")


def flag_step1_losses(records: list[dict], tolerance: float) -> None:
    """Mark runs whose step-1 loss differs from the first successful run with the same --set values."""
    first: dict[str, float] = {}
    for record in records:
        if record["status"] != "ok" or record["step1_loss"] is None:
            continue
        key = json.dumps(record["set"], sort_keys=True)
        reference = first.setdefault(key, record["step1_loss"])
        delta = record["step1_loss"] - reference
        record["step1_loss_delta"] = delta
        record["loss_flag"] = not abs(delta) <= tolerance


def _estimate(args: DPOConfig, shape: Any, gpus: int) -> dict[str, Any]:
    from .estimate import estimate

    try:
        result = estimate(args, shape, nodes=1, gpus_per_node=gpus)
    except ConfigError as exc:
        return {"error": str(exc)}
    return {"gpu": result["total"]["gpu"], "cpu": result["total"]["cpu"]}


def _mib(n: Optional[float]) -> str:
    return "" if n is None else f"{n / MIB:,.0f}"


def _num(x: Optional[float], fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _sort_key(record: dict) -> tuple:
    return (record["status"] != "ok", -(record["tokens_per_second"] or 0.0))


def results_markdown(records: list[dict], meta: dict) -> str:
    """The table of DIR/results.md, fastest first; failed runs last with their error."""
    kind = {"gpu_max_allocated": "GPU max allocated", "cpu_peak_rss": "peak RSS of one rank"}
    lines = [
        f"{meta['steps']} steps per run, {meta['num_gpus']} rank(s); tokens/s and s/step exclude step 1. "
        "Estimates: `dpo-ds estimate` per GPU and host per node (MiB). A peak RSS includes the Python, "
        f"torch and DeepSpeed runtime: {_mib(meta['runtime_baseline_rss'])} MiB in a process that only "
        "imports them.",
        "",
        "| config | status | tokens/s | s/step | peak memory (MiB) | est. per GPU | est. host/node "
        "| step-1 loss | last loss | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(records, key=_sort_key):
        est = r.get("estimate", {})
        note = r.get("error", "")
        if r.get("loss_flag"):
            note = f"step-1 loss differs by {r['step1_loss_delta']:+.2e}: this config changes the math"
        peak = f"{_mib(r['peak_memory'])} ({kind[r['peak_memory_kind']]})" if r["peak_memory"] else ""
        cells = [r["name"], r["status"], _num(r["tokens_per_second"], ".1f"), _num(r["seconds_per_step"], ".3f"),
                 peak, _mib(est.get("gpu")), _mib(est.get("cpu")), _num(r["step1_loss"], ".6f"),
                 _num(r["last_loss"], ".6f"), note.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_plot(records: list[dict], path: Path, num_gpus: int, runtime_rss: int = 0) -> None:
    """Tokens/s against peak memory, one labelled point per successful run; hollow markers at the
    estimated memory of one rank. Against a peak RSS (a CPU run) that is the GPU part plus the
    rank's share of the host part plus the runtime's own RSS (`runtime_baseline`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ok = [r for r in records if r["status"] == "ok" and r["tokens_per_second"]]
    for i, r in enumerate(ok):
        x, y = r["peak_memory"] / MIB, r["tokens_per_second"]
        ax.scatter([x], [y], color=f"C{i}", zorder=3, label="measured" if i == 0 else None)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        est = r.get("estimate", {})
        if "gpu" in est:
            on_cpu = r["peak_memory_kind"] == "cpu_peak_rss"
            rank = est["gpu"] + (est["cpu"] / num_gpus + runtime_rss if on_cpu else 0)
            ax.scatter([rank / MIB], [y], facecolors="none", edgecolors=f"C{i}", zorder=3,
                       label="estimated (dpo-ds estimate, + runtime on CPU)" if i == 0 else None)
            ax.plot([rank / MIB, x], [y, y], color=f"C{i}", linestyle=":", linewidth=1)
    kinds = {r["peak_memory_kind"] for r in ok}
    ax.set_xlabel("peak memory per rank (MiB): " + ", ".join(sorted(kinds)))
    ax.set_ylabel("tokens/s")
    failed = [r["name"] for r in records if r["status"] != "ok"]
    title = "dpo-ds sweep"
    if failed:
        title += f" (not shown, failed: {', '.join(failed)})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.1)  # room for the labels
    if ok:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def runtime_baseline(out: Path, env: dict) -> int:
    """Peak RSS of a process that only imports what a rank imports (torch, DeepSpeed, transformers,
    dpo_ds): the part of a rank's measured RSS that is not training state."""
    outcome = run_measured([sys.executable, "-c", "import dpo_ds.trainer"], out / "runtime_baseline.log", 600, env)
    return outcome.peak_rss if outcome.returncode == 0 else 0


def _default_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def sweep(opts: SweepOptions) -> list[dict]:
    """Run every combination and write DIR/results.{json,md,png}; returns the run records."""
    if not TRAIN_SCRIPT.is_file():
        raise ConfigError(f"{TRAIN_SCRIPT} not found: dpo-ds sweep runs launch/train.py of a source checkout")
    gpus = opts.num_gpus or _default_gpus()
    combos = combinations(opts.deepspeed, opts.sets)
    configs = []
    for combo in combos:  # every run's config is checked before the first one starts
        args, remaining = parse_known(run_flags(combo, opts, opts.out))
        if remaining:
            raise ConfigError(f"unknown argument(s) {remaining}; see dpo-ds sweep --help")
        configs.append(args)
    from ..distributed import free_port  # torch.distributed: only when a sweep runs
    from .estimate import model_shape

    shapes = {(a.model_name_or_path, a.trust_remote_code): None for a in configs}  # --set may vary the model
    shapes = {key: model_shape(*key) for key in shapes}
    opts.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    baseline = runtime_baseline(opts.out, env)
    records = []
    for index, (combo, args) in enumerate(zip(combos, configs), start=1):
        run_dir = opts.out / "runs" / f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', combo.name)}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus),
               "--master_port", str(free_port()), str(TRAIN_SCRIPT), *run_flags(combo, opts, run_dir)]
        print(f"[{index}/{len(combos)}] {combo.name}", flush=True)
        outcome = run_measured(cmd, run_dir / "log.txt", opts.timeout, env)
        record = summarize(combo, outcome, run_dir, run_dir / "log.txt", opts.steps)
        record["estimate"] = _estimate(args, shapes[args.model_name_or_path, args.trust_remote_code], gpus)
        record["log"] = os.path.relpath(record["log"], opts.out)
        for weights in run_dir.glob("model*.safetensors*"):  # the saved model is not needed
            weights.unlink()
        print(f"    {record['status']}: " + (f"{record['tokens_per_second']:.1f} tokens/s"
                                             if record["status"] == "ok" else record.get("error", "")), flush=True)
        records.append(record)
    flag_step1_losses(records, opts.loss_tolerance)
    meta = {"steps": opts.steps, "num_gpus": gpus, "train_flags": opts.train_flags,
            "loss_tolerance": opts.loss_tolerance, "runtime_baseline_rss": baseline}
    (opts.out / "results.json").write_text(json.dumps({**meta, "runs": records}, indent=2) + "\n")
    (opts.out / "results.md").write_text(results_markdown(records, meta))
    results_plot(records, opts.out / "results.png", gpus, baseline)
    return records


def sweep_main(argv: list[str]) -> int:
    """`dpo-ds sweep ...`: 0 once every run is done and recorded (a failed or out-of-memory run is a
    result), 1 when a config changed the step-1 loss."""
    opts = parse_sweep_args(list(argv))
    if opts is None:
        print(USAGE)
        return 0
    records = sweep(opts)
    print(f"results: {opts.out / 'results.md'}")
    print((opts.out / "results.md").read_text())
    flagged = [r["name"] for r in records if r.get("loss_flag")]
    if flagged:
        print(f"dpo-ds sweep: error: the step-1 loss differs under {', '.join(flagged)}", file=sys.stderr)
    return 1 if flagged else 0

