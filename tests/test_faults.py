"""Fault injection: real launchers, real processes, real files; each test breaks one thing and checks
what the run does about it."""
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import launcher_port, shm_buffers
from test_trainer import ENV, ROOT, latest_per_step, read_metrics, train_command

ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


def fault_command(tmp_path: Path, model_dir: str, *extra: str, nprocs: int = 2, out: str = "out") -> tuple[list, int]:
    """The test_trainer run on a port of its own (so its shm buffers can be told from other runs')."""
    cmd = train_command(tmp_path, model_dir, "--deepspeed", ZERO2, *extra, nprocs=nprocs, out=out)
    port = launcher_port()
    cmd[cmd.index("--master_port") + 1] = str(port)
    return cmd, port


def run_fault(tmp_path: Path, model_dir: str, *extra: str, timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    cmd, port = fault_command(tmp_path, model_dir, *extra, **kw)
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    assert shm_buffers(port) == [], "a rank left its DeepSpeed shm buffer"
    return proc


def test_two_rank_run_leaves_no_shm_buffer(tmp_path, tiny_model_dir):
    proc = run_fault(tmp_path, tiny_model_dir, "--max_steps", "1", "--save_steps", "none")
    assert proc.returncode == 0, proc.output[-4000:]


def test_stale_temp_parts_of_a_dead_writer_are_removed(tmp_path):
    """A pass killed mid-write leaves `.part-*.tmp`; the next pass on this host deletes it unless its writer
    still runs."""
    from dpo_ds.reference import _remove_stale_parts

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".part-000000000000.pt.{host}.{dead.pid}.tmp"
    live = tmp_path / f".part-000000000004.pt.{host}.{os.getpid()}.tmp"
    other_host = tmp_path / f".part-000000000008.pt.elsewhere.{dead.pid}.tmp"
    finished = tmp_path / "part-000000000012.pt"
    for path in (stale, live, other_host, finished):
        path.write_bytes(b"x")
    _remove_stale_parts(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, finished))


def test_divergence_stops_with_the_step_quantity_rank_and_checkpoint(tmp_path, tiny_model_dir):
    """A learning rate of 1e30 blows the weights up after one update: the loss of step 2 is not finite."""
    proc = run_fault(tmp_path, tiny_model_dir, "--learning_rate", "1e30", "--max_steps", "5", "--save_steps", "1")
    assert proc.returncode == 1, proc.output[-4000:]
    # Under ZeRO-2 the huge weights overflow the gradients first (DeepSpeed's norm is over all ranks).
    assert "dpo_ds: non-finite gradient norm (the norm over all ranks) at step 2: stopped, nothing new saved; the " \
        f"last complete checkpoint is {tmp_path / 'out' / 'checkpoint-1'}" in proc.output, proc.output[-3000:]
    assert "Traceback" not in proc.output
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / "out" / "final").exists()


def test_divergence_skip_logs_skipped_steps_and_stops_after_max_in_a_row(tmp_path, tiny_model_dir):
    proc = run_fault(tmp_path, tiny_model_dir, "--learning_rate", "1e30", "--max_steps", "5", "--save_steps",
                     "none", "--on_nonfinite", "skip", "--max_skipped_steps", "3")
    assert proc.returncode == 1, proc.output[-4000:]
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    # Step 1 trains; every later step sees the blown-up weights: skipped, not counted, 3 in a row then stop.
    assert [r["global_step"] for r in rows if "loss" in r] == [1]
    assert [(r["global_step"], r["skipped_steps"]) for r in rows if "skipped_steps" in r] == [(2, 1), (2, 2)]
    assert "3 steps in a row skipped (max_skipped_steps=3), the last for a non-finite " in proc.output
    assert "there is no complete checkpoint to resume from" in proc.output
    assert not (tmp_path / "out" / "final").exists()


def test_export_refuses_non_finite_tensors_naming_them():
    import torch

    from dpo_ds.checkpoint import check_finite

    check_finite({"a": torch.ones(2), "steps": torch.tensor([3])})
    with pytest.raises(RuntimeError, match=r"non-finite weights: 2 tensor\(s\).*\['layer.0.weight', 'lm_head.bias'\]"):
        check_finite({"layer.0.weight": torch.tensor([1.0, float("nan")]), "ok": torch.zeros(3),
                      "lm_head.bias": torch.tensor([float("-inf")])})
