"""Every launch path, for real, on one machine: pdsh over sshd "nodes", OpenMPI, torchrun, Slurm.

Each test runs launch/train.py with two CPU ranks on the tiny model and the learnable data of
test_trainer, through the real launcher, and checks what the ranks reported and what the run
wrote. The services (sshd, munged, slurmctld, slurmd) are started by fixtures on loopback and
stopped afterwards, also when a test fails.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from services.common import descendants, free_port, require, stop, wait_until
from services.slurm import slurm_cluster
from services.sshd import ssh_nodes
from test_trainer import ENV, ROOT, read_metrics, train_command

from dpo_ds.checkpoint import COMPLETE, saved_layout
from dpo_ds.hostfile import expand_nodelist
from dpo_ds.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]
TRAIN = ROOT / "launch" / "train.py"
MPIRUN_ROOT = ["--allow-run-as-root"] if os.geteuid() == 0 else []
TIMEOUT = 600  # a safety net for hangs only: a run takes well under a minute on an idle 2-core machine


def train_args(tmp_path: Path, model_dir: str, *extra: str, out: str = "out") -> list[str]:
    """test_trainer's training flags (tiny model, learnable data, logging every step), launcher left out."""
    cmd = train_command(tmp_path, model_dir, *extra, out=out)
    return cmd[cmd.index(str(TRAIN)) + 1:]


def run(cmd: list[str], cwd: Path, env: dict = ENV, expect: int = 0) -> str:
    """Run a launcher to the end; its output. On a hang, the whole process group goes (ranks included)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        raise AssertionError(f"no exit after {TIMEOUT} s:\n{output[-6000:]}") from None
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{output[-6000:]}"
    return output


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss, the last line written for each step."""
    return {r["global_step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def logged_steps(metrics: Path) -> int:
    """Whole lines with a loss so far (the trainer may be writing the next one)."""
    if not metrics.exists():
        return 0
    return sum('"loss"' in line for line in metrics.read_text().split("\n")[:-1])


def assert_two_rank_run(out_dir: Path, steps: int) -> None:
    """The trainer saw a world of 2: 64 rows, 2 pairs per rank -> 16 steps per epoch."""
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]
    assert [r["global_step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert r["epoch"] == pytest.approx(r["global_step"] / 16)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out_dir / "model.safetensors").exists()


@pytest.fixture
def nodes(tmp_path_factory):
    with ssh_nodes(tmp_path_factory.mktemp("ssh")) as n:
        yield n


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_deepspeed_pdsh_two_nodes(tmp_path, tiny_model_dir, nodes):
    """`deepspeed --hostfile H --master_addr A`: pdsh runs one rank per "node" over ssh."""
    require("pdsh", package="pdsh")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one rank each\nnode1 slots=1\nnode2 slots=1\n")
    # The launcher hands remote ranks only what .deepspeed_env (in the working directory) lists.
    (tmp_path / ".deepspeed_env").write_text(f"DS_ACCELERATOR=cpu\nPYTHONPATH={ROOT}\n")
    env = nodes.env({k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"})
    out = run([*RUNNER, "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(TRAIN), *train_args(tmp_path, tiny_model_dir, "--max_steps", "2",
                                                         "--save_steps", "none")], tmp_path, env)
    # pdsh prefixes each remote line with its node; each node ran one rank of two.
    assert any(line.startswith("node1:") and "rank 0/2" in line for line in out.splitlines()), out[-3000:]
    assert any(line.startswith("node2:") and "rank 1/2" in line for line in out.splitlines()), out[-3000:]
    assert_two_rank_run(tmp_path / "out", 2)


def test_mpirun_two_ranks(tmp_path, tiny_model_dir):
    """launch/mpi/train.sh (plain mpirun -np 2): ranks from OpenMPI, address and port through mpi4py."""
    require("mpirun", package="openmpi-bin")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py)")
    args = train_args(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none")
    env = {**ENV, "NP": "2", "MPIRUN_ARGS": " ".join([*MPIRUN_ROOT, "--oversubscribe"])}
    out = run([str(ROOT / "launch" / "mpi" / "train.sh"), *args[1:]], tmp_path, env)
    for rank in (0, 1):
        assert f"rank {rank}/2 (local rank {rank})" in out and "started by mpi, rendezvous 127.0.0.1:" in out
    assert_two_rank_run(tmp_path / "out", 2)


def test_deepspeed_openmpi_launcher(tmp_path, tiny_model_dir):
    """`deepspeed --launcher openmpi --hostfile H`: DeepSpeed builds the mpirun line; ranks find each other."""
    require("mpirun", package="openmpi-bin")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    launcher_args = " ".join([*MPIRUN_ROOT, "--oversubscribe", "--mca", "btl_tcp_if_include", "lo"])
    # --force_multi: a one-host hostfile would otherwise fall back to the local launcher.
    out = run([*RUNNER, "--launcher", "openmpi", "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check",
               "--master_addr", "127.0.0.1", "--launcher_args", launcher_args, str(TRAIN),
               *train_args(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none")], tmp_path)
    assert "rank 0/2" in out and "rank 1/2" in out and "started by mpi" in out
    assert_two_rank_run(tmp_path / "out", 2)


def test_torchrun_two_nodes_rendezvous(tmp_path, tiny_model_dir):
    """Two torchrun "nodes" (--nnodes 2, one rank each) meeting at a c10d --rdzv_endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = train_args(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "test", str(TRAIN), *args]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    text = "".join(outputs)
    assert "rank 0/2" in text and "rank 1/2" in text and "started by torch" in text
    assert_two_rank_run(tmp_path / "out", 2)


def sbatch_args(tmp_path: Path, model_dir: str, *extra: str, tasks: int = 2) -> list[str]:
    """The batch script and its arguments, sized for this machine: one node, two CPUs, no GPU."""
    args = train_args(tmp_path, model_dir, *extra)
    assert args[0] == "--config"
    return [f"--ntasks-per-node={tasks}", "--gpus-per-node=0", f"--cpus-per-task={2 // tasks}", "--time=30",
            f"--output={tmp_path}/slurm-%j.out", str(ROOT / "launch" / "slurm" / "train.sbatch"), *args[1:]]


def slurm_log(tmp_path: Path, job: str) -> str:
    out = tmp_path / f"slurm-{job}.out"
    log = tmp_path / "out" / "logs" / f"slurm-{job}.log"
    return "".join(f"--- {p.name}\n{p.read_text()}\n" for p in (out, log) if p.exists())


def test_slurm_sbatch_runs_to_completion(tmp_path, tiny_model_dir, slurm):
    """`sbatch launch/slurm/train.sbatch CONFIG ...`: srun starts one rank per task; the job COMPLETES."""
    assert slurm.run("scontrol", "show", "hostnames", "n[08-10],r[1-2]n[1-2],login1").stdout.split() == \
        expand_nodelist("n[08-10],r[1-2]n[1-2],login1")
    job = slurm.sbatch(sbatch_args(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none"),
                       ROOT, ENV)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, TIMEOUT)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-6000:]
    # srun --label: each line starts with the task number, here the rank.
    lines = log.splitlines()
    for rank in (0, 1):
        assert any(line.startswith(f"{rank}: ") and f"rank {rank}/2 (local rank {rank})" in line
                   and "started by slurm" in line for line in lines), log[-6000:]
    assert_two_rank_run(tmp_path / "out", 2)


def test_slurm_sbatch_torchrun_per_node(tmp_path, tiny_model_dir, slurm):
    """DPO_DS_LAUNCH=torchrun: one srun task on the node runs torchrun, which starts both ranks."""
    env = {**ENV, "DPO_DS_LAUNCH": "torchrun", "DPO_DS_NPROC_PER_NODE": "2"}
    job = slurm.sbatch(sbatch_args(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none", tasks=1),
                       ROOT, env)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, TIMEOUT)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-6000:]
    lines = log.splitlines()
    for rank in (0, 1):  # both ranks print through the one task 0
        assert any(line.startswith("0: ") and f"rank {rank}/2 (local rank {rank})" in line
                   and "started by torch" in line for line in lines), log[-6000:]
    assert_two_rank_run(tmp_path / "out", 2)


def test_slurm_usr1_saves_requeues_and_resumes(tmp_path, tiny_model_dir, slurm):
    """SIGUSR1 to the batch shell mid-run: checkpoint, `scontrol requeue`, the requeued job resumes and finishes."""
    steps = 12
    out_dir = tmp_path / "out"
    job = slurm.sbatch(sbatch_args(tmp_path, tiny_model_dir, "--max_steps", str(steps), "--save_steps", "none"),
                       ROOT, ENV)
    metrics = out_dir / "metrics.jsonl"
    wait_until(lambda: logged_steps(metrics) >= 2, TIMEOUT, "two logged steps before signalling")
    # --batch: only the batch shell gets it; train.sbatch passes it on to the ranks through srun.
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, TIMEOUT)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    saved = [p for p in out_dir.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    assert len(saved) == 1, log[-6000:]
    stopped_at = int(saved[0].name.split("-")[1])
    assert 2 <= stopped_at < steps
    assert f"dpo_ds: stopped after step {stopped_at}, checkpoint saved" in log
    assert f"requeued Slurm job {job}" in log
    assert f"resumed from {saved[0]} at step {stopped_at}" in log
    # The second run starts after the checkpoint: every step logged, each after the first once.
    rows = [r["global_step"] for r in read_metrics(metrics) if "loss" in r]
    assert sorted(set(rows)) == list(range(1, steps + 1))
    assert rows[-(steps - stopped_at):] == list(range(stopped_at + 1, steps + 1))
    assert (out_dir / "model.safetensors").exists()


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_model_dir):
    """SIGUSR1 to rank 1 alone, then SIGTERM to both until they exit: one complete checkpoint, exit 75."""
    out_dir = tmp_path / "out"
    cmd = [*RUNNER, "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN),
           *train_args(tmp_path, tiny_model_dir, "--max_steps", "100", "--save_steps", "none")]
    log = tmp_path / "launcher.log"  # a file, not a pipe: nobody reads while the test keeps signalling
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: (out_dir / "metrics.jsonl").exists() or proc.poll() is not None, TIMEOUT,
                   "the first step")
        ranks = {}
        for pid in descendants(proc.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for rank in (0, 1):
                if f"--local_rank={rank}".encode() in cmdline:
                    ranks[rank] = pid
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGUSR1)
        wait_until(lambda: any(out_dir.glob("checkpoint-*")) or proc.poll() is not None, TIMEOUT, "the save")
        # SIGTERM again and again until the launcher is gone: during the save, the requeue and the ranks'
        # interpreter shutdown, none of them may turn exit 75 into a kill.
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in ranks.values():
                with contextlib.suppress(ProcessLookupError):  # a rank may have exited already
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.05)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, output[-5000:]
    saved = sorted(out_dir.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists(), output[-5000:]
    step = int(saved[0].name.split("-")[1])
    assert max(losses(out_dir)) == step  # stopped right after the step it last logged
    assert (out_dir / "latest").read_text() == saved[0].name
    assert len(list(saved[0].glob("*optim_states.pt"))) == 2  # both ranks' shards, same step
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(out_dir), tag=saved[0].name)
    assert weights and all(v.isfinite().all() for v in weights.values())
    assert not (out_dir / "model.safetensors").exists()


def local_run(tmp_path: Path, nprocs: int, args: list[str]) -> str:
    return run([*RUNNER, "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(TRAIN), *args], tmp_path)


def test_universal_checkpoint_two_ranks_to_one_and_back(tmp_path, tiny_model_dir):
    """Saved by 2 ranks, resumed on 1 (GA 2: same global batch), saved, resumed on 2: loss and schedule continue.

    The built-in default is ZeRO-3 on 2 ranks and stage 0 on 1 (fp32), so this crosses stages too: ZeRO-3 shards
    -> DeepSpeed's universal format -> a replicated engine, and a replicated checkpoint -> universal -> ZeRO-3.
    """
    common = ["--max_steps", "3", "--lr_scheduler_type", "linear", "--save_steps", "1"]
    local_run(tmp_path, 2, train_args(tmp_path, tiny_model_dir, *common, out="ref"))  # 2 ranks, steps 1-3
    ref = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-1", moved / "checkpoint-1")
    # 2 -> 1: steps 2-3 on one rank from the 2-rank checkpoint of step 1 (converted to universal).
    out = local_run(tmp_path, 1, train_args(tmp_path, tiny_model_dir, *common, "--gradient_accumulation_steps", "2",
                                            "--resume_from_checkpoint", str(moved / "checkpoint-1"), out="moved"))
    assert f"resumed from {moved / 'checkpoint-1'} at step 1" in out
    assert (moved / "checkpoint-1" / "universal" / COMPLETE).exists()
    # 1 -> 2: step 3 on two ranks from the 1-rank checkpoint of step 2.
    shutil.rmtree(moved / "checkpoint-3")
    out = local_run(tmp_path, 2, train_args(tmp_path, tiny_model_dir, *common,
                                            "--resume_from_checkpoint", str(moved / "checkpoint-2"), out="moved"))
    assert f"resumed from {moved / 'checkpoint-2'} at step 2" in out
    assert (moved / "checkpoint-2" / "universal" / COMPLETE).exists()
    assert saved_layout(moved / "checkpoint-1") == (3, 2)
    assert saved_layout(moved / "checkpoint-2") == (0, 1) and not list((moved / "checkpoint-2").glob("*optim_states.pt"))
    assert saved_layout(moved / "checkpoint-3") == (3, 2)
    resumed = [r for r in read_metrics(moved / "metrics.jsonl") if "loss" in r]
    assert [r["global_step"] for r in resumed] == [2, 3, 3]
    for r in resumed:
        expected = ref[r["global_step"] - 1]
        assert r["loss"] == pytest.approx(expected["loss"], abs=1e-5), r
        assert r["learning_rate"] == pytest.approx(expected["learning_rate"], rel=1e-9), r
    assert resumed[0]["loss"] < math.log(2) - 0.01  # continued, not restarted from the initial weights
    # `dpo-ds export` of the replicated 1-rank checkpoint holds the weights the 2-rank ZeRO-3 run had at step 2.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from dpo_ds.cli import main as dpo_ds_cli

    assert dpo_ds_cli(["export", str(moved / "checkpoint-2"), str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    zero3 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ref"), tag="checkpoint-2")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert exported.keys() <= {k[len("model."):] for k in zero3}
    for name, weight in exported.items():
        torch.testing.assert_close(weight, zero3["model." + name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(exported[k], initial[k]) for k in exported if k in initial)


def test_one_rank_default_checkpoint_resumes_under_zero2_on_two_ranks(tmp_path, tiny_model_dir):
    """A replicated checkpoint of the one-rank default (stage 0) continues under an explicit ZeRO-2 config on
    2 ranks, through dpo_ds's stage-0 -> universal converter: weights and Adam states carry over."""
    common = ["--max_steps", "3", "--lr_scheduler_type", "linear", "--save_steps", "1"]
    local_run(tmp_path, 1, train_args(tmp_path, tiny_model_dir, *common, "--gradient_accumulation_steps", "2",
                                      out="one"))
    ref = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert saved_layout(tmp_path / "one" / "checkpoint-1") == (0, 1)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-1", moved / "checkpoint-1")
    out = local_run(tmp_path, 2, train_args(tmp_path, tiny_model_dir, *common, "--deepspeed",
                                            str(ROOT / "ds_configs" / "zero2.json"), "--resume_from_checkpoint",
                                            str(moved / "checkpoint-1"), out="moved"))
    assert f"resumed from {moved / 'checkpoint-1'} at step 1" in out
    assert saved_layout(moved / "checkpoint-3") == (2, 2)
    resumed = [r for r in read_metrics(moved / "metrics.jsonl") if "loss" in r]
    assert [r["global_step"] for r in resumed] == [2, 3]
    for r in resumed:  # step 3's loss depends on the Adam moments carried over from step 1
        expected = ref[r["global_step"] - 1]
        assert r["loss"] == pytest.approx(expected["loss"], abs=1e-5), r
        assert r["learning_rate"] == pytest.approx(expected["learning_rate"], rel=1e-9), r
    assert resumed[0]["loss"] < math.log(2) - 0.01
