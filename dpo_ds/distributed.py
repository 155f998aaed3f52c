"""Process-group set-up for every launcher, in one place.

Which launcher started this process is told by its variables, checked in this order:

- deepspeed / torchrun: RANK, WORLD_SIZE (+ LOCAL_RANK, MASTER_ADDR/PORT) are already set.
- mpirun (OpenMPI): OMPI_COMM_WORLD_*; checked before Slurm because mpirun inside an
  allocation starts its daemons with `srun`, whose SLURM_* variables describe the daemons.
- srun: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS in every task (SLURM_STEP_ID marks
  a task of a step, not the batch shell); master = first host of the node list, port
  derived from the job id, so every task computes the same pair without talking.
- other MPIs (MPICH, Intel MPI, srun --mpi=pmi2): PMI_RANK / PMIX_RANK, through mpi4py.
- none of these: a world of one on 127.0.0.1.

For MPI, rank 0 picks the address and a free port and broadcasts them through mpi4py.
DeepSpeed's own `auto_mpi_discovery` takes the first word of `hostname -I` (often a
docker bridge or an address the other nodes cannot reach) and the fixed port 29500.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import time
from datetime import timedelta
from pathlib import Path
from typing import MutableMapping, Optional

import torch.distributed as dist

from .hostfile import slurm_hostnames

logger = logging.getLogger(__name__)
IFNAME_VARIABLES = ("DPO_DS_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def interface_address(spec: str) -> str:
    """The IPv4 address of the interface named like NCCL_SOCKET_IFNAME does: `=ib0` exactly, `ib` any ib*."""
    names = [name for _, name in socket.if_nameindex()]
    wanted = [spec[1:]] if spec.startswith("=") else [spec] + sorted(n for n in names if n.startswith(spec))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in wanted:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            return socket.inet_ntoa(packed[20:24])
    raise RuntimeError(f"no network interface matching {spec!r} has an IPv4 address on {socket.gethostname()} "
                       f"(interfaces: {names})")


def route_source_address(peer_host: str) -> Optional[str]:
    """This host's address on the route to `peer_host`: the address that peer can reach us at."""
    try:
        peer = socket.getaddrinfo(peer_host, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]
    except OSError:
        return None


def master_address(peer_hosts: list[str], env: Optional[MutableMapping[str, str]] = None) -> str:
    """The address rank 0 listens on, as the other ranks should dial it.

    MASTER_ADDR wins; then the interface named by DPO_DS_IFNAME, GLOO_SOCKET_IFNAME or
    NCCL_SOCKET_IFNAME (the network the cluster talks over); then, when every rank is on this
    host, 127.0.0.1; else this host's address on the route to the first other host.
    """
    env = os.environ if env is None else env
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    for name in IFNAME_VARIABLES:
        spec = env.get(name, "")
        if spec and not spec.startswith("^"):  # "^docker0,lo" lists interfaces to avoid
            return interface_address(spec.split(",")[0])
    here = socket.gethostname()
    others = [h for h in peer_hosts if h != here]
    if not others:
        return "127.0.0.1"
    found = route_source_address(others[0])
    if found is None:
        raise RuntimeError(f"cannot find an address of {here} that {others[0]} can reach; "
                           f"set MASTER_ADDR or DPO_DS_IFNAME (e.g. ib0)")
    return found


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id (20000-29999)."""
    return 20000 + int(job_id) % 10000


def _mpi_env(env: MutableMapping[str, str]) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from MPI: rank 0 chooses, mpi4py broadcasts."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError("launched by an MPI launcher (OMPI_COMM_WORLD_RANK/PMI_RANK set) but mpi4py is not "
                           "installed: `pip install mpi4py`, or pass RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                           "and MASTER_PORT to every rank (mpirun -x NAME=VALUE)") from err
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    master = None
    if rank == 0:
        addr = master_address(hosts, env)
        master = (addr, env.get("MASTER_PORT") or str(free_port(addr)))
    addr, port = comm.bcast(master, root=0)
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID") or \
        str(sum(h == hosts[rank] for h in hosts[:rank]))
    env.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": local,
                "MASTER_ADDR": addr, "MASTER_PORT": port})


def map_launcher_env(env: Optional[MutableMapping[str, str]] = None) -> str:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; returns the launcher's name.

    One of "torch" (deepspeed, torchrun), "mpi", "slurm", "single".
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "torch"
    if "OMPI_COMM_WORLD_RANK" in env:
        _mpi_env(env)
        return "mpi"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        if not env.get("MASTER_ADDR"):
            env["MASTER_ADDR"] = slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])[0]
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        return "slurm"
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        _mpi_env(env)
        return "mpi"
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "single"


def set_group_timeout(seconds: float) -> timedelta:
    """Make `seconds` the timeout of every process group created from now on, DeepSpeed's ZeRO groups
    included (torch gives a group created without one its backend's default, not the world's)."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def init(timeout_s: float = 1800) -> str:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); returns the launcher.

    `timeout_s` (the config's ddp_timeout) bounds every collective of every process group."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launcher = map_launcher_env()
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and accelerator.device_count() > 0:
        # With --gpus-per-task (or a restricted CUDA_VISIBLE_DEVICES) a rank may see fewer devices.
        accelerator.set_device(int(os.environ["LOCAL_RANK"]) % accelerator.device_count())
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=set_group_timeout(timeout_s))
    release_shm_buffer()
    e = os.environ
    logger.info("rank %s/%s (local rank %s) on %s, started by %s, rendezvous %s:%s", e["RANK"], e["WORLD_SIZE"],
                e["LOCAL_RANK"], socket.gethostname(), launcher, e["MASTER_ADDR"], e["MASTER_PORT"])
    return launcher


def shm_buffer_path(env: Optional[MutableMapping[str, str]] = None) -> str:
    """This rank's DeepSpeed CPU all-reduce buffer: shm.cpp names it
    `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`."""
    env = os.environ if env is None else env
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shm buffer once every rank has mapped the others' (after init).

    DeepSpeed never unlinks it: about 66 MiB of RAM per rank and port stays in /dev/shm until reboot.
    The mappings outlive the name, so unlinking right after the barrier that ends init frees the memory
    on every exit path, `kill -9` included, while the all-reduce keeps working.
    """
    barrier()  # no rank unlinks before the others have opened its buffer
    try:
        os.unlink(shm_buffer_path())
    except FileNotFoundError:  # not every launch uses the shm all-reduce (it needs LOCAL_SIZE == WORLD_SIZE)
        pass


def on_cpu() -> bool:
    """Whether DeepSpeed runs on the CPU (no accelerator, or DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def wait_for_rank0(marker: Path, what: str, poll_s: float = 0.5, log_every_s: float = 60.0) -> None:
    """On the ranks other than 0: wait, without a collective and so without its timeout, until rank 0's
    long work (`what`) writes `marker`, logging every `log_every_s` seconds. Rank 0 returns at once.

    If rank 0 dies instead, its launcher ends this process."""
    if rank() == 0:
        return
    start = last = time.monotonic()
    while not Path(marker).exists():
        time.sleep(poll_s)
        if time.monotonic() - last >= log_every_s:
            last = time.monotonic()
            logger.info("rank %d: waiting for rank 0 to finish %s (%.0f s so far)", rank(), what, last - start)


def shutdown() -> None:
    """Destroy the process group (without it the deepspeed launcher reports exit code -6)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
