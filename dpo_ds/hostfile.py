"""Hostfiles (`HOST slots=N` per line) for the deepspeed and OpenMPI launchers.

`parse_hostfile` accepts and rejects exactly what DeepSpeed's launcher does
(`deepspeed.launcher.runner._parse_hostfile`), but reports every bad line by
number instead of DeepSpeed's one-line "bad entry", and warns about lines
DeepSpeed accepts that are probably not what was meant. The `dpo-ds hostfile`
command on top of these is `dpo_ds.tools.hostfile`.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Mapping, Optional

# The pattern DeepSpeed matches at the start of each stripped line.
_ENTRY = re.compile(r"^(\S+)\s+slots=(\d+)")
# Near misses: `node1:8`, `node1 8`, `node1 slots = 8`, `node1 slot=8`, `node1 slots:8`.
_SLOT_TYPOS = re.compile(r"^([^\s:]+)(?::|\s+(?:slots?\s*[:=]?\s*)?)(\d+)\s*$")


class HostfileError(ValueError):
    """A hostfile the launcher would refuse; the message lists each bad line."""


@dataclass
class Hostfile:
    hosts: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_slots(self) -> int:
        return sum(self.hosts.values())


def parse_hostfile(text: str, source: str = "hostfile") -> Hostfile:
    """Hosts and their slot counts, in file order; raises HostfileError naming each bad line."""
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    errors, warnings = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        match = _ENTRY.search(line)
        if not match:
            errors.append(f"{where}: {line!r} is not `HOST slots=N`{_hint(line)}")
            continue
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            errors.append(f"{where}: host {host!r} is already listed on line {first_line[host]} "
                          f"(one line per host; put all its slots there)")
            continue
        hosts[host], first_line[host] = slots, number
        rest = line[match.end():].strip()
        if rest and not rest.startswith("#"):
            warnings.append(f"{where}: {rest!r} after `slots={slots}` is ignored by the launcher")
        if slots == 0:
            warnings.append(f"{where}: host {host!r} has slots=0: no rank will run there")
    if not hosts and not errors:
        errors.append(f"{source}: no `HOST slots=N` line (the file is empty or all comments)")
    if errors:
        raise HostfileError("\n".join(errors))
    return Hostfile(hosts, warnings)


def _hint(line: str) -> str:
    typo = _SLOT_TYPOS.match(line)
    if typo:
        return f" (write `{typo.group(1)} slots={typo.group(2)}`)"
    if len(line.split()) == 1:
        return f" (the slot count is missing: `{line} slots=8` for 8 GPUs)"
    return ""


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list with `scontrol show hostnames`, else (no Slurm config here) in Python."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed node list (`gpu[01-03,07],login1`, `r[1-2]n[1-2]`) like `scontrol show hostnames`."""
    names: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)
        choices = []
        for i, part in enumerate(parts):
            choices.append(_expand_ranges(part, nodelist) if i % 2 else [part])
        names += ["".join(c) for c in itertools.product(*choices)]
    return names


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    out = []
    for rng in spec.split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise HostfileError(f"node list {nodelist!r}: bad range {rng!r} in [{spec}]")
        width = len(lo)
        out += [str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
    return out


def slots_per_node(env: Optional[Mapping[str, str]] = None) -> int:
    """GPUs (or tasks) per node of the current Slurm job, from the variables sbatch/srun set."""
    env = os.environ if env is None else env
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name)
        if value:
            # SLURM_GPUS_PER_NODE may be "a100:4"; SLURM_NTASKS_PER_NODE may be "4(x2)".
            found = re.search(r"(\d+)(?:\(x\d+\))?$", value.split(",")[0])
            if found:
                return int(found.group(1))
    raise HostfileError("cannot tell the slots per node: none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, "
                        "SLURM_NTASKS_PER_NODE is set; pass --slots N")


def from_slurm(env: Optional[Mapping[str, str]] = None, slots: Optional[int] = None) -> str:
    """A hostfile for the current Slurm job: one `HOST slots=N` line per node of SLURM_JOB_NODELIST."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("SLURM_JOB_NODELIST is not set: run this inside a Slurm job (sbatch/salloc/srun)")
    n = slots if slots is not None else slots_per_node(env)
    return "".join(f"{host} slots={n}\n" for host in slurm_hostnames(nodelist))
