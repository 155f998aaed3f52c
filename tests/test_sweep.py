"""`dpo-ds sweep`: a real 2-rank CPU sweep over ZeRO configs with an injected failing config, and
the parts it is made of (argument parsing, peak-RSS measurement, flagging, the table) on inputs
whose answer is known."""
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from dpo_ds.cli import main as cli_main
from dpo_ds.config import ConfigError
from dpo_ds.tools.sweep import (
    Combo, Outcome, SweepOptions, combinations, flag_step1_losses, parse_sweep_args, results_markdown,
    run_measured, summarize, sweep,
)
from test_trainer import write_learnable_data

ROOT = Path(__file__).resolve().parent.parent
DS = ROOT / "ds_configs"
MIB = 2**20


def test_combinations_multiply_configs_and_set_values():
    opts = parse_sweep_args(["--config", "run.yaml", "--deepspeed", "a/zero2.json", "b/zero3.json", "--steps", "3",
                             "--set", "per_device_train_batch_size=1,2", "--set", "gradient_checkpointing=true",
                             "--out", "o", "--beta", "0.2"])
    assert (opts.steps, opts.out, opts.train_flags) == (3, Path("o"), ["--config", "run.yaml", "--beta", "0.2"])
    combos = combinations(opts.deepspeed, opts.sets)
    assert [c.name for c in combos] == [
        "zero2 per_device_train_batch_size=1 gradient_checkpointing=true",
        "zero2 per_device_train_batch_size=2 gradient_checkpointing=true",
        "zero3 per_device_train_batch_size=1 gradient_checkpointing=true",
        "zero3 per_device_train_batch_size=2 gradient_checkpointing=true",
    ]
    assert combos[1].flags() == ["--deepspeed", "a/zero2.json", "--per_device_train_batch_size", "2",
                                 "--gradient_checkpointing", "true"]
    assert parse_sweep_args(["--help"]) is None


@pytest.mark.parametrize("argv,message", [
    (["--out", "o"], "needs --deepspeed"),
    (["--deepspeed", "z.json"], "needs --out"),
    (["--deepspeed", "z.json", "--out", "o", "--set", "per_device_batch=1,2"], "'per_device_batch' is not a training"),
    (["--deepspeed", "z.json", "--out", "o", "--set", "beta"], "expected KEY=V1,V2"),
    (["--deepspeed", "z.json", "--out", "o", "--steps", "0"], "--steps '0': expected an integer >= 1"),
    (["--deepspeed", "z.json", "--out", "o", "--timeout", "0"], "--timeout '0': expected a number > 0"),
])
def test_bad_sweep_arguments_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep_args(argv)


def test_bad_training_input_stops_before_any_run(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    argv = ["sweep", "--deepspeed", str(DS / "zero2.json"), str(missing), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 1
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown argument"):
        sweep(SweepOptions([str(DS / "zero2.json")], tmp_path / "out", train_flags=["--no_such_flag", "1"]))
    assert cli_main(["sweep", "--help"]) == 0 and "results.png" in capsys.readouterr().out


@pytest.mark.slow  # starts a subprocess
def test_run_measured_sees_a_grandchild_peak_and_kills_the_tree_on_timeout(tmp_path):
    # The grandchild touches 300 MiB; its parent stays small: the recorded peak is the grandchild's.
    grandchild = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    outcome = run_measured([sys.executable, "-c", code], tmp_path / "log.txt", timeout=120)
    assert (outcome.returncode, outcome.timed_out) == (0, False)
    assert 300 * MIB < outcome.peak_rss < 600 * MIB
    # A run past its timeout is killed with all its descendants.
    sleeper = "import os, time; open(os.environ['PIDFILE'], 'w').write(str(os.getpid())); time.sleep(600)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {sleeper!r}])"
    env = {**os.environ, "PIDFILE": str(tmp_path / "pid")}
    # 15 s: even on a loaded machine the grandchild has started and written its pid by then.
    outcome = run_measured([sys.executable, "-c", code], tmp_path / "log2.txt", timeout=15, env=env)
    assert outcome.timed_out and outcome.returncode != 0
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):  # the orphaned grandchild is reaped by init shortly after the kill
        if not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


def write_run(tmp_path: Path, losses: list[float], log: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"global_step": i + 1, "loss": loss, "tokens_per_second": 100.0 * (i + 1), "step_time": 1.0 / (i + 1)}
            for i, loss in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "log.txt").write_text(log)
    return run


def test_summarize_excludes_step_one_and_classifies_failures(tmp_path):
    run = write_run(tmp_path, [0.7, 0.6, 0.5], "fine\n")
    ok = summarize(Combo("x/zero2.json"), Outcome(0, 10.0, False, 700 * MIB), run, run / "log.txt", steps=3)
    assert ok["status"] == "ok" and ok["steps"] == 3
    assert ok["tokens_per_second"] == pytest.approx((200 + 300) / 2)  # steps 2 and 3
    assert ok["seconds_per_step"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert (ok["step1_loss"], ok["last_loss"]) == (0.7, 0.5)
    assert (ok["peak_memory"], ok["peak_memory_kind"]) == (700 * MIB, "cpu_peak_rss")
    short = summarize(Combo("zero2.json"), Outcome(0, 1.0, False, 1), run, run / "log.txt", steps=5)
    assert short["status"] == "failed" and short["error"] == "exited 0 after logging 3 of 5 steps"
    (run / "log.txt").write_text("Traceback (most recent call last):\n  File \"x.py\"\n"
                                 "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    oom = summarize(Combo("zero2.json"), Outcome(1, 1.0, False, 1), run, run / "log.txt", steps=3)
    assert oom["status"] == "oom" and "Tried to allocate 2.00 GiB" in oom["error"]
    (run / "log.txt").write_text("[launch] x\nValueError: bad thing\n  - detail one\n[launch] exiting\n")
    failed = summarize(Combo("zero2.json"), Outcome(1, 1.0, False, 1), run, run / "log.txt", steps=3)
    assert failed["status"] == "failed" and failed["error"] == "ValueError: bad thing - detail one"
    timeout = summarize(Combo("zero2.json"), Outcome(-9, 50.0, True, 1), run, run / "log.txt", steps=3)
    assert timeout["status"] == "timeout"


def record(name: str, status: str, tokens: float, loss: float, **set_values) -> dict:
    return {"name": name, "status": status, "tokens_per_second": tokens, "seconds_per_step": 1.0,
            "step1_loss": loss, "last_loss": loss, "peak_memory": 100 * MIB, "peak_memory_kind": "cpu_peak_rss",
            "set": set_values, "estimate": {"gpu": 10 * MIB, "cpu": 20 * MIB}}


def test_step1_loss_flag_compares_runs_with_the_same_set_values():
    runs = [record("zero2 b=1", "ok", 5, 0.70, b="1"), record("zero3 b=1", "ok", 6, 0.7004, b="1"),
            record("zero2 b=2", "ok", 7, 0.65, b="2"), record("zero3 b=2", "ok", 8, 0.6502, b="2"),
            record("bad b=2", "failed", None, None, b="2")]
    flag_step1_losses(runs, tolerance=3e-4)
    assert [r.get("loss_flag") for r in runs] == [False, True, False, False, None]
    assert runs[1]["step1_loss_delta"] == pytest.approx(4e-4)


def test_markdown_table_is_sorted_by_tokens_per_second_failures_last():
    runs = [record("slow", "ok", 5.0, 0.69), record("broken", "failed", None, None),
            record("fast", "ok", 9.0, 0.69)]
    runs[1]["error"] = "ValueError: a|b"
    runs[2].update(loss_flag=True, step1_loss_delta=0.01)
    table = results_markdown(runs, {"steps": 3, "num_gpus": 2, "runtime_baseline_rss": 500 * MIB})
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["fast", "slow", "broken"]
    assert "changes the math" in rows[0] and "ValueError: a\\|b" in rows[2]
    assert "| 100 (peak RSS of one rank) | 10 | 20 |" in rows[1]
    assert "500 MiB in a process that only imports them" in table


@pytest.fixture
def prefs(tmp_path) -> Path:
    return write_learnable_data(tmp_path / "prefs.jsonl", 32, seed=0)


@pytest.mark.slow
def test_two_rank_sweep_over_zero_configs_records_an_injected_failure(tmp_path, tiny_model_dir, prefs):
    bad = json.loads((DS / "zero2.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 3  # contradicts per_device_train_batch_size=2: fails at start-up
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = tmp_path / "sweep"
    argv = ["sweep", "--deepspeed", *(str(DS / f"{n}.json") for n in ("zero2", "zero3", "zero3_offload_param")),
            str(tmp_path / "bad.json"), "--steps", "2", "--num_gpus", "2", "--out", str(out),
            "--config", str(ROOT / "examples" / "default.yaml"), "--model_name_or_path", tiny_model_dir,
            "--dataset_name", str(prefs), "--dataset_test_split", "none", "--per_device_train_batch_size", "2",
            "--max_length", "48", "--max_prompt_length", "32", "--dataset_num_proc", "none"]
    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["zero2", "zero3", "zero3_offload_param", "bad"]
    assert runs["bad"]["status"] == "failed"
    assert "contradicts the run config" in runs["bad"]["error"]
    assert "train_micro_batch_size_per_gpu=3" in runs["bad"]["error"]
    assert "error" in runs["bad"]["estimate"]
    baseline = results["runtime_baseline_rss"]
    assert baseline > 100 * MIB
    for name in ("zero2", "zero3", "zero3_offload_param"):
        r = runs[name]
        assert r["status"] == "ok" and r["steps"] == 2, r
        assert r["tokens_per_second"] > 0 and r["seconds_per_step"] > 0
        # Policy == reference at step 1: every config gives exactly log 2.
        assert r["step1_loss"] == pytest.approx(math.log(2), abs=1e-6) and r["loss_flag"] is False
        assert r["peak_memory_kind"] == "cpu_peak_rss" and r["peak_memory"] > baseline
        assert r["estimate"]["gpu"] > 0 and r["estimate"]["cpu"] > 0
        assert (out / r["log"]).is_file() and not (out / r["log"]).parent.joinpath("model.safetensors").exists()
    rows = [line for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| config")]
    names = [row.split(" | ")[0][2:] for row in rows]
    ok_names = sorted(("zero2", "zero3", "zero3_offload_param"), key=lambda n: -runs[n]["tokens_per_second"])
    assert names == [*ok_names, "bad"]
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

