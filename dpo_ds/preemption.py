"""Stop cleanly when the cluster asks: save, requeue under Slurm, exit with EXIT_PREEMPTED.

SIGTERM (preemption, `scancel`, the time limit) and SIGUSR1 (`sbatch --signal=USR1@120`)
only set a flag, on whichever ranks receive them. Once per optimizer step the trainer
calls `stop_if_requested`: the flag is all-reduced (MAX), so every rank stops after the
same step, saves the same checkpoint, and exits with EXIT_PREEMPTED. Under Slurm, rank 0
then requeues the job (`scontrol requeue $SLURM_JOB_ID`); the new run resumes with
`--resume_from_checkpoint auto`. A signal arriving during the save only sets the flag
again: the save finishes, and an interrupted save never gets its COMPLETE marker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import shutdown

EXIT_PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint; uncaught, it exits with EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


def _handler(signum: int, frame) -> None:
    if not _received:
        rank = os.environ.get("RANK", "?")
        os.write(2, f"dpo_ds: rank {rank} got {signal.Signals(signum).name}; saving a checkpoint and stopping "
                    f"after the current optimizer step\n".encode())
    _received.append(signum)


def install() -> bool:
    """Catch SIGTERM and SIGUSR1 from now on (main thread only); returns whether the handlers are in place."""
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
    # The stop is decided and saved: a late signal (a launcher reaping the ranks, the scheduler's second
    # SIGTERM) must not turn exit 75 into a kill. Python resets its own handlers to SIG_DFL while it
    # finalizes, but leaves SIG_IGN alone.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"dpo_ds: stopped after step {step}, checkpoint saved, because a rank got SIGTERM or SIGUSR1 "
              f"(exit code {EXIT_PREEMPTED})", file=sys.stderr)
        # Before the last barrier: no rank exits (and makes a launcher kill the others) until this is done.
        requeue_slurm_job()
    shutdown()
    raise Preempted(step)
