"""Helpers shared by the service fixtures: free ports, waiting, stopping processes we started."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require(*programs: str, package: str) -> None:
    """Skip the test, naming the Debian package, when a program is missing."""
    missing = [p for p in programs if shutil.which(p) is None and not shutil.which(p, path="/usr/sbin:/sbin")]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install {package})")


def which(program: str) -> str:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin") or program


def wait_until(ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first-level first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM (SIGKILL if it lingers), then SIGKILL whatever it started that is still running."""
    left = descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
