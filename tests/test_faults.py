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
