"""Stop cleanly when the cluster asks: save what there is, requeue under Slurm, exit with EXIT_PREEMPTED.

SIGTERM (preemption, `scancel`, the time limit) and SIGUSR1 (`sbatch --signal=USR1@120`)
are honoured from process start to exit, by what the process is doing (its phase):

- setup (data preparation, model loading): nothing to save yet: exit 75 at once (rank 0 requeues);
- train: only a flag, on whichever ranks receive them. Once per optimizer step the trainer
  calls `stop_if_requested`: the flag is all-reduced (MAX), so every rank stops after the
  same step, saves the same checkpoint, and exits with EXIT_PREEMPTED;
- precompute (reference log-probs): checked after every batch; the cache parts so far are saved;
- eval: checked before every batch; the evaluation stops there and the step's checkpoint is saved;
- export: deferred: the export finishes and writes its marker, and the run ends normally.

Under Slurm, rank 0 requeues the job (`scontrol requeue $SLURM_JOB_ID`); the new run resumes with
`--resume_from_checkpoint auto`. A signal arriving during a save only sets the flag
again: the save finishes, and an interrupted save never gets its COMPLETE marker.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Callable, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist

from .distributed import shutdown

EXIT_PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []
_phase = ["train"]
_ON_SIGNAL = {
    "train": "saving a checkpoint and stopping after the current optimizer step",
    "precompute": "saving the reference cache so far and stopping after the current batch",
    "eval": "stopping the evaluation at the next batch and saving a checkpoint",
    "export": "finishing the export first",
}


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint; uncaught, it exits with EXIT_PREEMPTED."""

    def __init__(self, step: Optional[int] = None):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """What a signal does while inside (see the module's docstring); the previous phase after."""
    before = _phase[0]
    _phase[0] = name
    try:
        yield
    finally:
        _phase[0] = before


def _handler(signum: int, frame) -> None:
    rank = os.environ.get("RANK", "0")
    name = signal.Signals(signum).name
    _received.append(signum)
    if _phase[0] == "setup":
        os.write(2, f"dpo_ds: rank {rank} got {name} before training started: nothing to save; exiting with "
                    f"code {EXIT_PREEMPTED}\n".encode())
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if rank == "0":
            requeue_slurm_job()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)  # no collective to leave cleanly: the peers got the signal too, or die with us
    if len(_received) == 1:
        os.write(2, f"dpo_ds: rank {rank} got {name}; {_ON_SIGNAL[_phase[0]]}\n".encode())


def install(in_phase: str = "train") -> bool:
    """Catch SIGTERM and SIGUSR1 from now on (main thread only), in phase `in_phase`; returns whether the
    handlers are in place. The entry point installs them in "setup" at start, training in "train"."""
    _phase[0] = in_phase
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        return False
    return True


def received() -> list[int]:
    """The signals this process has caught, in order."""
    return list(_received)


def requested(device: torch.device | str = "cpu") -> bool:
    """Collective: True on every rank when any rank has caught a signal."""
    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def requeue_slurm_job(env: dict | None = None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID`; False (with the reason on stderr) outside a batch job or on failure."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"dpo_ds: could not requeue Slurm job {job}: {err}", file=sys.stderr)
        return False
    if proc.returncode != 0:
        print(f"dpo_ds: could not requeue Slurm job {job}: {proc.stderr.strip()}", file=sys.stderr)
        return False
    print(f"dpo_ds: requeued Slurm job {job}; it resumes from the checkpoint", file=sys.stderr)
    return True


def stop_if_requested(step: int, save: Callable[[int], object], device: torch.device | str) -> None:
    """Collective, once per optimizer step: when any rank caught a signal, save, requeue and raise Preempted."""
    if not requested(device):
        return
    save(step)
    stop(f"stopped after step {step}, checkpoint saved", step)


def stop(what: str, step: Optional[int] = None) -> NoReturn:
    """Collective, once what there is to save is saved: requeue (rank 0), leave the group, raise Preempted."""
    # The stop is decided and saved: a late signal (a launcher reaping the ranks, the scheduler's second
    # SIGTERM) must not turn exit 75 into a kill. Python resets its own handlers to SIG_DFL while it
    # finalizes, but leaves SIG_IGN alone.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"dpo_ds: {what}, because a rank got SIGTERM or SIGUSR1 (exit code {EXIT_PREEMPTED})",
              file=sys.stderr)
        # Before the last barrier: no rank exits (and makes a launcher kill the others) until this is done.
        requeue_slurm_job()
    shutdown()
    raise Preempted(step)
