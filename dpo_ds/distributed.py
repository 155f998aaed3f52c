"""Process-group set-up for every launcher, in one place.

deepspeed / torchrun set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
Slurm's `srun` sets only SLURM_* variables: they are mapped here. mpirun
sets OMPI_*/PMI_* variables: DeepSpeed's MPI discovery (mpi4py) reads them.
A plain `python launch/train.py` becomes a world of one.
"""
from __future__ import annotations

import os
import socket
import subprocess

import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(nodelist: str) -> str:
    """The first host of a Slurm node list (`scontrol show hostnames` expands ranges like n[01-04])."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id (10000-19999)."""
    return 10000 + int(job_id) % 10000


def map_launcher_env(env: dict | None = None) -> str:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from the launcher's variables; returns the launcher's name."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("MASTER_ADDR", slurm_master_addr(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def init() -> str:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launcher = map_launcher_env()
    if get_accelerator().device_name() != "cpu" and "LOCAL_RANK" in os.environ:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(auto_mpi_discovery=launcher == "mpi")
    return launcher


def shutdown() -> None:
    """Destroy the process group (without it the deepspeed launcher reports exit code -6)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
