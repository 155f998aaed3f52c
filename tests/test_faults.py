"""Fault injection: real launchers, real processes, real files; each test breaks one thing and checks
what the run does about it."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import launcher_port, shm_buffers
from services.common import descendants
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_divergence_stops_with_the_step_quantity_rank_and_checkpoint(tmp_path, tiny_model_dir):
    """A learning rate of 1e30 blows the weights up after one update: the loss of step 2 is not finite."""
    proc = run_fault(tmp_path, tiny_model_dir, "--learning_rate", "1e30", "--max_steps", "5", "--save_steps", "1")
    assert proc.returncode == 1, proc.output[-4000:]
    # Under ZeRO-2 the huge weights overflow the gradients first (DeepSpeed's norm is over all ranks).
    assert "dpo_ds: non-finite gradient norm (the norm over all ranks) at step 2: stopped, nothing new saved; the " \
        f"last complete checkpoint is {tmp_path / 'out' / 'checkpoint-1'}" in proc.output, proc.output[-3000:]
    assert "Traceback" not in proc.output
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_divergence_skip_logs_skipped_steps_and_stops_after_max_in_a_row(tmp_path, tiny_model_dir):
    proc = run_fault(tmp_path, tiny_model_dir, "--learning_rate", "1e30", "--max_steps", "5", "--save_steps",
                     "none", "--on_nonfinite", "skip", "--max_skipped_steps", "3")
    assert proc.returncode == 1, proc.output[-4000:]
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    # Step 1 trains; every later step sees the blown-up weights: skipped, not counted, 3 in a row then stop.
    assert [r["global_step"] for r in rows if "loss" in r] == [1]
    assert [(r["global_step"], r["skipped_steps"]) for r in rows if "skipped_steps" in r] == [(2, 1), (2, 2)]
    assert "3 steps in a row skipped (max_skipped_steps=3), the last for a non-finite " in proc.output
    assert "nothing new saved; there is no complete checkpoint" in proc.output
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_refuses_non_finite_tensors_naming_them():
    import torch

    from dpo_ds.checkpoint import check_finite

    check_finite({"a": torch.ones(2), "steps": torch.tensor([3])})
    with pytest.raises(RuntimeError, match=r"non-finite weights: 2 tensor\(s\).*\['layer.0.weight', 'lm_head.bias'\]"):
        check_finite({"layer.0.weight": torch.tensor([1.0, float("nan")]), "ok": torch.zeros(3),
                      "lm_head.bias": torch.tensor([float("-inf")])})


def checkpoint_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("checkpoint-*"))


COMMON = ("--max_steps", "4", "--save_steps", "1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    """The reference run of the checkpoint tests: 2 ranks, ZeRO-2, 4 steps, a checkpoint after each."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    proc = run_fault(tmp_path, tiny_model_dir, *COMMON, out="full")
    assert proc.returncode == 0, proc.output[-4000:]
    return tmp_path / "full"


@pytest.mark.slow
def test_corrupt_checkpoints_fall_back_and_older_resume_sets_newer_aside(tmp_path, tiny_model_dir, uninterrupted,
                                                                        capsys):
    """Truncated, bit-flipped and missing files in the three newest checkpoints: `verify` names each,
    `auto` skips them with a warning naming the file, resumes from checkpoint-1 and ends at max_steps with
    the uninterrupted run's losses. Resuming explicitly from checkpoint-1 with save_total_limit=1 keeps the
    checkpoint resumed from and this run's newest, and moves the old run's later ones aside."""
    from dpo_ds.cli import main as dpo_ds_cli

    common = COMMON
    full = latest_per_step(uninterrupted / "metrics.jsonl")
    assert dpo_ds_cli(["checkpoint", "verify", str(uninterrupted)]) == 0

    auto = tmp_path / "auto"
    shutil.copytree(uninterrupted, auto)
    (auto / "COMPLETE").unlink()  # the final export's marker: auto copies only checkpoints
    truncated = auto / "checkpoint-2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(truncated, truncated.stat().st_size - 100)
    flipped = auto / "checkpoint-3" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    missing = auto / "checkpoint-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    missing.unlink()
    capsys.readouterr()
    assert dpo_ds_cli(["checkpoint", "verify", str(auto)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ok   {auto / 'checkpoint-1'}"
    assert lines[1].startswith(f"BAD  {auto / 'checkpoint-2'}: {truncated} has ") and "truncated" in lines[1]
    assert lines[2].startswith(f"BAD  {auto / 'checkpoint-3'}: {flipped} does not match its checksum")
    assert lines[3] == f"BAD  {auto / 'checkpoint-4'}: {missing} is missing"
    # An explicit path that does not verify is refused, naming the file.
    assert dpo_ds_cli(["export", str(auto / "checkpoint-3"), str(tmp_path / "exported")]) == 1
    assert f"{flipped} does not match its checksum" in capsys.readouterr().err

    proc = run_fault(tmp_path, tiny_model_dir, *common, "--resume_from_checkpoint", "auto", out="auto")
    assert proc.returncode == 0, proc.output[-4000:]
    for path, why in ((missing, "is missing"), (flipped, "does not match its checksum"), (truncated, "has")):
        assert f"resume_from_checkpoint=auto: skipping {path.parent}: {path} {why}" in proc.output, why
    assert "resumed from " + str(auto / "checkpoint-1") + " at step 1" in proc.output
    resumed = latest_per_step(auto / "metrics.jsonl")
    assert resumed == pytest.approx(full, abs=1e-6) and sorted(resumed) == [1, 2, 3, 4]
    (aside,) = auto.glob("abandoned-*")
    assert checkpoint_names(aside) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert dpo_ds_cli(["checkpoint", "verify", str(auto)]) == 0  # this run's own checkpoint-2..4

    older = tmp_path / "older"
    shutil.copytree(uninterrupted, older)
    proc = run_fault(tmp_path, tiny_model_dir, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1",
                     "--resume_from_checkpoint", str(older / "checkpoint-1"), out="older")
    assert proc.returncode == 0, proc.output[-4000:]
    assert checkpoint_names(older) == ["checkpoint-1", "checkpoint-3"]  # resumed-from kept, then the newest
    (aside,) = older.glob("abandoned-*")
    assert checkpoint_names(aside) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    from dpo_ds.checkpoint import resolve_resume

    assert resolve_resume("auto", older) == older / "checkpoint-3"
    resumed = {s: loss for s, loss in latest_per_step(older / "metrics.jsonl").items() if s <= 3}  # 4: the old run's
    assert resumed == pytest.approx({s: full[s] for s in (1, 2, 3)}, abs=1e-6)


class CodeRunningPickle:
    """Unpickled, it runs a shell command: what a hostile checkpoint file does."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


def test_crafted_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path, tiny_model_dir, capsys):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dpo_ds.checkpoint import CheckpointError, _digests, checkpoint_files, safe_loading
    from dpo_ds.cli import main as dpo_ds_cli
    from dpo_ds.config import DPOConfig

    witness = tmp_path / "code-ran"
    crafted = tmp_path / "out" / "checkpoint-1"
    crafted.mkdir(parents=True)
    states = crafted / "mp_rank_00_model_states.pt"
    torch.save({"module": {"model.lm_head.weight": torch.zeros(2)}, "payload": CodeRunningPickle(witness)}, states)
    # A marker that verifies: checksums prove integrity, not who wrote the files.
    files = checkpoint_files(crafted)
    (crafted / "COMPLETE").write_text(json.dumps({"step": 1, "zero_stage": 0, "world_size": 1,
                                                  "files": _digests(crafted, files)}))
    DPOConfig(model_name_or_path=tiny_model_dir, output_dir=str(tmp_path / "out")).save(
        str(tmp_path / "out" / "config.yaml"))

    assert dpo_ds_cli(["export", str(crafted), str(tmp_path / "exported")]) == 1
    assert f"refusing to load {states}: it holds a Python object outside" in capsys.readouterr().err
    with safe_loading(), pytest.raises(CheckpointError, match="refusing to load"):
        TorchCheckpointEngine().load(str(states))  # DeepSpeed's own loader asks for weights_only=False
    assert not witness.exists()
    TorchCheckpointEngine().load(str(states))  # the same call without safe_loading runs the payload
    assert witness.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (one 25 MiB checkpoint of the tiny model fits, a second does not); needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_names_the_checkpoint_and_keeps_the_earlier_one(tmp_path, tiny_model_dir, small_disk):
    from dpo_ds.cli import main as dpo_ds_cli

    out = small_disk / "out"
    cmd, port = fault_command(tmp_path, tiny_model_dir, "--max_steps", "3", "--save_steps", "1")
    cmd[cmd.index("--output_dir") + 1] = str(out)
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("dpo_ds: rank ")]
    assert errors and all(f"saving checkpoint {out / 'checkpoint-2'} failed: no space left on device" in line
                          and f"the last complete checkpoint is {out / 'checkpoint-1'}" in line for line in errors), \
        output[-4000:]
    # (A rank whose own write succeeded may still print the collective's error when its peer exits.)
    assert dpo_ds_cli(["checkpoint", "verify", str(out / "checkpoint-1")]) == 0
    assert not (out / "checkpoint-2" / "COMPLETE").exists()
    assert shm_buffers(port) == []


@pytest.mark.slow
def test_data_report_is_logged_and_too_many_dropped_rows_stop_the_run(tmp_path, tiny_model_dir):
    """40 of 64 rows have identical completions (skipped with on_bad_row=skip), 4 more a prompt longer than
    max_length: 44/64 = 0.69 of the data lost, over the default max_dropped_fraction of 0.5."""
    with (tmp_path / "prefs.jsonl").open("w") as f:
        for i in range(64):
            prompt = "Question " + ("very long " * 40 if i >= 60 else "") + f"{i}?"
            rejected = " yes indeed." if i < 40 else " no."
            f.write(json.dumps({"prompt": prompt, "chosen": " yes indeed.", "rejected": rejected}) + "\n")
    proc = run_fault(tmp_path, tiny_model_dir, "--on_bad_row", "skip", "--max_prompt_length", "none",
                     "--max_steps", "1", nprocs=1)
    assert proc.returncode == 1, proc.output[-3000:]
    report = [line for line in proc.output.splitlines() if "data report, train split" in line]
    assert len(report) == 1 and report[0].endswith(
        "64 rows read, 20 kept; dropped: 40 identical_completions, 4 prompt_exceeds_max_length; truncated: "
        "0 prompt, 0 chosen, 0 rejected"), report
    assert "dpo_ds: data error: 44 of the 64 train rows were dropped in preparation (40 identical_completions, " \
        "4 prompt_exceeds_max_length), more than max_dropped_fraction=0.5" in proc.output, proc.output[-3000:]
    assert "Traceback" not in proc.output


@pytest.mark.slow
def test_kill_9_of_one_rank_during_a_save_ends_the_job_and_auto_resumes_exactly(tmp_path, tiny_model_dir,
                                                                               uninterrupted):
    """Rank 1 is SIGKILLed the moment checkpoint-3's directory appears (its save under way): the job ends
    within 60 s, checkpoint-3 has no marker, and `auto` skips it, resumes from checkpoint-2 and reproduces
    the uninterrupted run's losses."""
    out = tmp_path / "out"
    cmd, port = fault_command(tmp_path, tiny_model_dir, *COMMON)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-3").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rank1 = [pid for pid in descendants(proc.pid) if "--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(rank1) == 1, "rank 1 not found (the run ended before its third save)"
        os.kill(rank1[0], signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=90)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not (out / "checkpoint-3" / "COMPLETE").exists() and not (out / "model.safetensors").exists()
    assert shm_buffers(port) == []

    resumed = run_fault(tmp_path, tiny_model_dir, *COMMON, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"skipping {out / 'checkpoint-3'}: no COMPLETE marker in {out / 'checkpoint-3'} (an interrupted save)" \
        in resumed.output
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in resumed.output
    assert latest_per_step(out / "metrics.jsonl") == pytest.approx(latest_per_step(uninterrupted / "metrics.jsonl"),
                                                                   abs=1e-6)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from services.slurm import slurm_cluster

    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def task_pid(job: str, task: int) -> Optional[int]:
    """The pid of Slurm task `task` of `job` running launch/train.py (None while there is none)."""
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"launch/train.py" in cmdline and f"SLURM_JOB_ID={job}".encode() in environ \
                and f"SLURM_PROCID={task}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.slow
def test_slurm_crash_requeues_and_the_next_attempt_finishes(tmp_path, tiny_model_dir, slurm):
    """kill -9 of task 1 under real Slurm after checkpoint-2: srun ends the step, train.sbatch counts the crash
    and requeues; attempt 2 resumes from checkpoint-2 and the job COMPLETES."""
    from services.common import wait_until
    from test_launchers import TIMEOUT, sbatch_args, slurm_log

    out = tmp_path / "out"
    job = slurm.sbatch(sbatch_args(tmp_path, tiny_model_dir, *COMMON), ROOT, ENV)
    wait_until(lambda: (out / "checkpoint-2" / "COMPLETE").exists(), TIMEOUT, "checkpoint-2")
    pid = task_pid(job, 1)
    assert pid is not None and not (out / "model.safetensors").exists(), "the job ended before it could crash"
    os.kill(pid, signal.SIGKILL)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, TIMEOUT)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert f"dpo_ds: job {job} attempt 1 " in log and f"dpo_ds: job {job} attempt 2 " in log
    assert "requeueing, crash restart 1 of 3" in log
    assert (out / "logs" / "crash_restarts").read_text().strip() == "1"
    assert "resumed from " in log and (out / "model.safetensors").exists()


def signal_during(tmp_path: Path, model_dir: str, ready, *extra: str, rows: int = 64) -> tuple[int, str]:
    """One process (`python launch/train.py`, a world of one) on `rows` learnable pairs; SIGTERM as soon as
    `ready(output so far)` holds; returns the exit code and the output."""
    from test_trainer import write_learnable_data

    write_learnable_data(tmp_path / "prefs.jsonl", rows, seed=0)
    cmd = train_command(tmp_path, model_dir, "--deepspeed", ZERO2, *extra)
    cmd = [sys.executable, *cmd[cmd.index(str(ROOT / "launch" / "train.py")):]]
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not ready(log.read_text()) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before the signal:\n" + log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_sigterm_during_data_preparation_exits_75_with_nothing_saved(tmp_path, tiny_model_dir):
    code, output = signal_during(tmp_path, tiny_model_dir, lambda out: "started by single" in out,
                                 "--max_steps", "2")
    assert code == 75, output[-3000:]
    assert "got SIGTERM before training started: nothing to save; exiting with code 75" in output
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_sigterm_during_reference_precomputation_saves_the_parts_so_far(tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    started = []

    def some_rows_done(out: str) -> bool:  # 2 s into the pass: some batches done, far from all 1500 rows
        if not started and "precomputing reference log-probs" in out:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 2

    code, output = signal_during(tmp_path, tiny_model_dir, some_rows_done, "--max_steps", "2",
                                 "--precompute_ref_log_probs", "true", "--precompute_ref_batch_size", "1",
                                 "--ref_cache_dir", str(cache), rows=1500)
    assert code == 75, output[-3000:]
    assert "got SIGTERM; saving the reference cache so far and stopping after the current batch" in output
    assert "dpo_ds: stopped the reference precomputation into " in output
    import torch

    saved = [torch.load(p, weights_only=True)["row_index"] for p in cache.rglob("part-*.pt")]
    assert saved and 0 < sum(len(rows) for rows in saved) < 1500  # some rows, not all: stopped midway
    assert not list(cache.rglob(".part-*.tmp"))


@pytest.mark.slow
def test_sigterm_during_evaluation_stops_it_and_saves_the_step(tmp_path, tiny_model_dir):
    code, output = signal_during(tmp_path, tiny_model_dir, lambda out: "'global_step': 1," in out, "--max_steps", "1",
                                 "--eval_fraction", "0.9", "--per_device_eval_batch_size", "1", rows=1500)
    assert code == 75, output[-3000:]
    assert "got SIGTERM; stopping the evaluation at the next batch and saving a checkpoint" in output
    assert "dpo_ds: stopped after step 1, checkpoint saved" in output
    from dpo_ds.checkpoint import verify

    assert verify(tmp_path / "out" / "checkpoint-1") is None and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_sigterm_during_export_finishes_it_with_its_marker(tmp_path, tiny_model_dir):
    final = tmp_path / "out"  # TRL's layout: the final model in output_dir
    code, output = signal_during(tmp_path, tiny_model_dir, lambda log: "saving the model to" in log,
                                 "--max_steps", "1")
    assert code == 0, output[-3000:]
    assert "got SIGTERM; finishing the export first" in output
    from dpo_ds.checkpoint import verify

    assert verify(final) is None and (final / "model.safetensors").exists()


@pytest.mark.slow
def test_divergence_skip_on_a_stage0_torch_optimizer_discards_the_update(tmp_path, tiny_model_dir):
    """Stage 0 in fp32 runs a plain torch optimizer, which DeepSpeed never skips: the guard discards the
    update itself. Had the NaN update been applied, the next attempt's loss would be NaN; it is again the
    gradient norm of the blown-up (finite) weights."""
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "train_batch_size": "auto", "gradient_clipping": "auto",
                                 "zero_optimization": {"stage": 0}}))
    proc = run_fault(tmp_path, tiny_model_dir, "--deepspeed", str(zero0), "--ref_zero_stage", "0", "--ref_offload",
                     "none", "--learning_rate", "1e30", "--max_steps", "5", "--save_steps", "none",
                     "--on_nonfinite", "skip", "--max_skipped_steps", "2", nprocs=1)
    assert proc.returncode == 1, proc.output[-4000:]
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["global_step"] for r in rows if "loss" in r] == [1]
    assert [(r["global_step"], r["skipped_steps"]) for r in rows if "skipped_steps" in r] == [(2, 1)]
    assert "2 steps in a row skipped (max_skipped_steps=2), the last for a non-finite gradient norm on rank 0 " \
        "at step 2" in proc.output, proc.output[-3000:]
