"""`dpo-ds hostfile`: check a hostfile, or write one for the current Slurm job (see `dpo_ds.hostfile`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..hostfile import HostfileError, from_slurm, parse_hostfile

USAGE = """usage: dpo-ds hostfile check HOSTFILE
       dpo-ds hostfile from-slurm [--slots N] [--output FILE]

check        validate HOSTFILE as the deepspeed launcher parses it; print each bad line; exit 1 if any
from-slurm   write a hostfile for this Slurm job (SLURM_JOB_NODELIST); slots per node from --slots,
             else SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE / SLURM_NTASKS_PER_NODE"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-ds hostfile", usage=USAGE.split("\n\n")[0].removeprefix("usage: "),
                                     description=USAGE.split("\n\n", 1)[1], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("check").add_argument("hostfile")
    slurm = actions.add_parser("from-slurm")
    slurm.add_argument("--slots", type=int, help="slots per node (default: from the Slurm variables)")
    slurm.add_argument("--output", help="file to write (default: stdout)")
    return parser


def cli(argv: list[str]) -> int:
    """`dpo-ds hostfile check H` / `dpo-ds hostfile from-slurm [--slots N] [--output F]`."""
    parser = _parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    try:
        if args.action == "check":
            return _check(args.hostfile)
        return _from_slurm(args.slots, args.output)
    except HostfileError as err:
        print(f"dpo-ds hostfile {args.action}: error: {err}", file=sys.stderr)
        return 1


def _check(path: str) -> int:
    try:
        text = open(path).read()
    except OSError as err:
        raise HostfileError(f"cannot read {path}: {err.strerror}") from err
    parsed = parse_hostfile(text, path)
    for warning in parsed.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    hosts = ", ".join(f"{h} ({n})" for h, n in parsed.hosts.items())
    print(f"{path}: ok, {len(parsed.hosts)} hosts, {parsed.total_slots} slots: {hosts}")
    return 0


def _from_slurm(slots: Optional[int], output: Optional[str]) -> int:
    text = from_slurm(slots=slots)
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
