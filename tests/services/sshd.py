"""Two "nodes" on one machine: sshd listening on 127.0.0.1 and 127.0.0.2, reached as node1/node2.

The node names and the key live in a private ssh_config; an `ssh` wrapper that passes
`-F` to it is put first on PATH, so that DeepSpeed's ssh check, pdsh (`PDSH_RCMD_TYPE=ssh`)
and mpirun all reach the nodes as they would on a cluster, without touching ~/.ssh or /etc/hosts.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .common import free_port, require, stop, wait_until, which

ADDRESSES = {"node1": "127.0.0.1", "node2": "127.0.0.2"}


@dataclass
class SshNodes:
    root: Path
    port: int
    bin_dir: Path

    def env(self, base: dict) -> dict:
        """`base` with the ssh wrapper first on PATH."""
        return {**base, "PATH": f"{self.bin_dir}:{base.get('PATH', os.defpath)}"}

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ssh"), host, command], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def ssh_nodes(root: Path) -> Iterator[SshNodes]:
    require("sshd", "ssh", "ssh-keygen", package="openssh-server openssh-client")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "id"):
        subprocess.run([which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "id.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    port = free_port()
    listen = "".join(f"ListenAddress {addr}\n" for addr in ADDRESSES.values())
    (root / "sshd_config").write_text(
        f"Port {port}\n{listen}HostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
        f"PidFile {root / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n")
    hosts = "".join(f"Host {name}\n  HostName {addr}\n" for name, addr in ADDRESSES.items())
    (root / "ssh_config").write_text(
        f"{hosts}Host *\n  Port {port}\n  IdentityFile {root / 'id'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {which("ssh")} -F {root / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    # -D: stay in the foreground, so this process is the one we stop.
    proc = subprocess.Popen([which("sshd"), "-D", "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")])
    nodes = SshNodes(root, port, bin_dir)
    try:
        wait_until(lambda: proc.poll() is not None or nodes.ssh("node2", "true").returncode == 0, 30, "sshd")
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {(root / 'sshd.log').read_text()}")
        yield nodes
    finally:
        stop(proc)
