"""A one-node Slurm cluster on loopback: munged, slurmctld and slurmd with a private config.

Everything (key, sockets, state, logs) lives under the given directory; clients find the
cluster through SLURM_CONF, so a system Slurm, if any, is neither used nor disturbed.
Short scheduler intervals make a requeued job start again within seconds.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .common import free_port, require, stop, wait_until, which


@dataclass
class SlurmCluster:
    root: Path
    conf: Path

    def env(self, base: dict) -> dict:
        return {**base, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([which(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60,
                              env=self.env(dict(os.environ)))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, args: list[str], cwd: Path, env: dict) -> str:
        """Submit; returns the job id."""
        proc = subprocess.run([which("sbatch"), "--parsable", *args], cwd=cwd, env=self.env(env),
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in states

        wait_until(reached, timeout, f"job {job_id} to reach {sorted(states)} (last: {info.get('JobState')})", 1)
        return info


def _node_line(name: str) -> str:
    """This machine as slurmd sees it (`slurmd -C`), with half its memory offered to jobs."""
    detected = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = detected.splitlines()[0]
    memory = int(re.search(r"RealMemory=(\d+)", line).group(1))
    line = re.sub(r"RealMemory=\d+", f"RealMemory={max(memory // 2, 1)}", line)
    return re.sub(r"^NodeName=\S+", f"NodeName={name} NodeAddr=127.0.0.1", line)


def _config(root: Path, munge_socket: Path, name: str, user: str) -> str:
    return f"""ClusterName=dpods
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
MailProg=/bin/true
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
{_node_line(name)} State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    require("munged", "munge", package="munge")
    require("slurmctld", "slurmd", "sbatch", "scontrol", package="slurm-wlm")
    root.mkdir(parents=True, exist_ok=True)
    # munged wants every directory above its socket open to all (pytest's tmp_path is not).
    socket_dir = Path(tempfile.mkdtemp(prefix="dpo_ds-munge-"))
    socket_dir.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    name = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_config(root, socket_dir / "munge.socket", name, getpass.getuser()))
    cluster = SlurmCluster(root, conf)
    env = cluster.env(dict(os.environ))
    procs: list[subprocess.Popen] = []

    def start(*cmd: str) -> None:
        # Foreground (-F/-D), so these processes are the ones we stop; output into root/<daemon>.out.
        with open(root / f"{cmd[0]}.out", "w") as out:
            procs.append(subprocess.Popen([which(cmd[0]), *cmd[1:]], env=env, stdout=out, stderr=out))

    def check_alive() -> None:
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead:
            logs = "".join(f"\n--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(root.glob("*.out")))
            raise RuntimeError(f"{dead} exited while starting the Slurm cluster:{logs}")

    try:
        start("munged", "-F", f"--key-file={key}", f"--socket={socket_dir / 'munge.socket'}",
              f"--pid-file={socket_dir / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
              f"--seed-file={root / 'munged.seed'}")
        wait_until(lambda: check_alive() or (socket_dir / "munge.socket").exists(), 30, "munged")
        start("slurmctld", "-D", "-i")  # -i: ignore any saved state
        start("slurmd", "-D")

        def idle() -> bool:
            check_alive()
            return "idle" in cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout

        wait_until(idle, 60, "the Slurm node to become idle", 0.5)
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:
            cluster.run("scancel", "--user", getpass.getuser(), check=False)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(), 60,
                           "cancelled jobs to end", 0.5)
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(socket_dir, ignore_errors=True)
