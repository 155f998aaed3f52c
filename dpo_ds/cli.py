"""The ``dpo-ds`` command: ``dpo-ds SUBCOMMAND [flags]``, one function per entry of ``COMMANDS``.

Each subcommand takes its argument list and returns the exit status; a
``DataError`` or ``ConfigError`` ends the command with its message on stderr
and status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from dpo_ds.config import ConfigError, DPOConfig
from dpo_ds.parser import parse_known
from dpo_ds.data import DataError, DataReport, PreferenceData, load_preference_data

BOUNDARY = "[[COMPLETION]]"
DATA_CHECK_USAGE = f"""usage: dpo-ds data-check --dataset SOURCE --model MODEL [--config run.yaml] [--json] [--show N]
                         [--any_training_flag VALUE ...]

Read and tokenize the whole dataset as training would, then report rows read and kept, rows dropped by
reason, the detected format, token-length percentiles and truncation counts. Exits 0 when the data is usable.

  --dataset SOURCE   alias of --dataset_name: builtin, a hub name, a save_to_disk directory or a data file
  --model MODEL      alias of --model_name_or_path (its tokenizer and chat template are used)
  --json             print one JSON object instead of text
  --show N           also print N tokenized examples, the prompt/completion boundary marked by
                     {BOUNDARY}"""


def data_check(argv: list[str]) -> int:
    """``dpo-ds data-check``: load, check and tokenize the dataset; print the report."""
    rest, as_json, show = _data_check_flags(argv)
    config = _run_config(rest, "data-check", DATA_CHECK_USAGE)
    if config is None:
        return 0
    from dpo_ds.vision import is_processor, load_processing_class

    try:
        processing = load_processing_class(config.model_name_or_path, config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {config.model_name_or_path!r}: {exc}") from exc
    tokenizer = processing.tokenizer if is_processor(processing) else processing
    data = load_preference_data(config, processing)
    examples = [_example(tokenizer, data.train[i]) for i in range(min(show, len(data.train)))]
    if as_json:
        out = _report_json(data.train_report)
        out["eval"] = _report_json(data.eval_report) if data.eval_report else None
        out["notes"] = data.notes
        out["examples"] = examples
        print(json.dumps(out, indent=2))
    else:
        print(f"dataset: {config.dataset_name}  model: {config.model_name_or_path}")
        for report in (data.train_report, data.eval_report):
            if report is not None:
                print(_report_text(report))
        for note in data.notes:
            print(f"note: {note}")
        for example in examples:
            print(f"\n--- example: row {example['row_index']} ---")
            print(f"{example['prompt']}{BOUNDARY}{example['chosen']}")
            print(f"--- same prompt, rejected ---\n{example['prompt']}{BOUNDARY}{example['rejected']}")
    return _verdict(data)


def _run_config(argv: list[str], command: str, usage: str) -> DPOConfig | None:
    """The training config a subcommand's flags give; None once `usage` is printed for -h/--help."""
    config, remaining = parse_known(argv)
    if "-h" in remaining or "--help" in remaining:
        print(usage)
        return None
    if remaining:
        raise ConfigError(f"unknown argument(s) {remaining}; see dpo-ds {command} --help")
    return config


def _data_check_flags(argv: list[str]) -> tuple[list[str], bool, int]:
    """Split off --json and --show N, and rename the --dataset/--model aliases; the rest are config flags."""
    parser = argparse.ArgumentParser(prog="dpo-ds data-check", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", type=int, default=0)
    parser.add_argument("--dataset")
    parser.add_argument("--model")
    try:
        own, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        if err.argument_name == "--show":
            raise ConfigError(f"--show needs a number of examples, got {err.message.rpartition(': ')[2]}",
                              "show") from None
        raise ConfigError(str(err)) from None
    for flag, value in (("--dataset_name", own.dataset), ("--model_name_or_path", own.model)):
        if value is not None:
            rest.append(f"{flag}={value}")
    return rest, own.json, own.show


def _example(tokenizer: Any, row: dict) -> dict:
    return {
        "row_index": row["row_index"],
        "prompt": tokenizer.decode(row["prompt_ids"]),
        "chosen": tokenizer.decode(row["chosen_ids"]),
        "rejected": tokenizer.decode(row["rejected_ids"]),
        # Scored label positions (the loss masks, the sequence's first token excluded), as the report counts them.
        "scored_tokens": {part: sum((row["prompt_loss_mask"] + row[f"{part}_loss_mask"])[1:])
                          for part in ("chosen", "rejected")},
    }


def _report_json(report: DataReport) -> dict:
    summary = report.summary()
    return {"rows": summary.pop("rows_read"), "kept": summary.pop("rows_kept"), **summary}


def _report_text(report: DataReport) -> str:
    dropped = sum(report.dropped.values())
    lines = [
        f"{report.split}: {report.rows_read} rows read, {report.rows_kept} kept, {dropped} dropped",
        f"  format: {report.format}",
    ]
    lines += [f"  dropped ({reason}): {count}" for reason, count in sorted(report.dropped.items())]
    lines.append(f"  prompt/completion boundary fixes: {report.boundary_fixes}")
    lines.append("  truncated rows: " + ", ".join(f"{part} {n}" for part, n in report.truncated.items()))
    lines.append(f"  {'tokens':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for part, stats in report.percentiles().items():
        lines.append(f"  {part:<10}" + "".join(f"{stats[k]:>8}" for k in ("p50", "p90", "p99", "max")))
    lines.append(f"  {'scored':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}   (tokens per row that the loss counts)")
    for part, stats in report.scored_percentiles().items():
        lines.append(f"  {part:<10}" + "".join(f"{stats[k]:>8}" for k in ("p50", "p90", "p99", "max")))
    lines += [f"  skipped {problem}" for problem in report.problems]
    return "\n".join(lines)


def _verdict(data: PreferenceData) -> int:
    """0 when every split that training uses keeps at least one row."""
    for report in (data.train_report, data.eval_report):
        if report is not None and report.rows_kept == 0:
            print(f"dpo-ds data-check: error: no usable row left in the {report.split} split", file=sys.stderr)
            return 1
    return 0


def train(argv: list[str]) -> int:
    """``dpo-ds train [--config X.yaml] [--key value ...]``: the same entry point as ``launch/train.py``."""
    from dpo_ds.trainer import main as train_main

    return train_main(argv)


EXPORT_USAGE = """usage: dpo-ds export CHECKPOINT_DIR OUT_DIR [--trust_remote_code]

Write a saved checkpoint (output_dir/checkpoint-<step>, any ZeRO stage and world size) as a Hugging Face
model directory (safetensors, config, tokenizer, chat template), in one process on CPU. The checkpoint
must verify against its COMPLETE marker. --trust_remote_code lets the model's own code run (the run's
config.yaml is not asked)."""


def export(argv: list[str]) -> int:
    """``dpo-ds export CHECKPOINT OUT [--trust_remote_code]``: consolidate a checkpoint into a HF directory."""
    parser = argparse.ArgumentParser(prog="dpo-ds export", usage=EXPORT_USAGE.split("\n\n")[0].removeprefix("usage: "),
                                     description=EXPORT_USAGE.split("\n\n", 1)[1])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let the model's own code run (never read from the checkpoint's config)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    from dpo_ds.checkpoint import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint_dir, args.out_dir, trust_remote_code=args.trust_remote_code)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"dpo-ds export: error: {exc}", file=sys.stderr)
        return 1
    print(f"dpo-ds export: wrote {out}")
    return 0


CHECKPOINT_USAGE = """usage: dpo-ds checkpoint verify DIR

Check a checkpoint (output_dir/checkpoint-<step>), or every checkpoint of an output_dir, against the sizes
and checksums its COMPLETE marker lists. Exits 0 when every one checked verifies."""


def checkpoint(argv: list[str]) -> int:
    """``dpo-ds checkpoint verify DIR``: one line per checkpoint, ok or what is wrong with which file."""
    parser = argparse.ArgumentParser(prog="dpo-ds checkpoint",
                                     usage=CHECKPOINT_USAGE.split("\n\n")[0].removeprefix("usage: "),
                                     description=CHECKPOINT_USAGE.split("\n\n", 1)[1])
    parser.add_argument("action", choices=["verify"])
    parser.add_argument("dir")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    from dpo_ds.checkpoint import checkpoint_dirs, verify

    target = Path(args.dir)
    # An output_dir: its checkpoints, and the final model's export (TRL's layout puts it in output_dir itself).
    found = [target] if target.name.startswith("checkpoint-") else \
        checkpoint_dirs(target) + ([target] if (target / "COMPLETE").exists() else [])
    if not found:
        print(f"dpo-ds checkpoint: error: no checkpoint in {target}", file=sys.stderr)
        return 1
    bad = 0
    for path in found:
        reason = verify(path)
        bad += reason is not None
        print(f"ok   {path}" if reason is None else f"BAD  {path}: {reason}")
    return 1 if bad else 0


def hostfile(argv: list[str]) -> int:
    """``dpo-ds hostfile check H`` / ``dpo-ds hostfile from-slurm [--slots N] [--output F]``."""
    from dpo_ds.tools.hostfile import cli as hostfile_cli

    return hostfile_cli(argv)


def estimate(argv: list[str]) -> int:
    """``dpo-ds estimate``: memory per GPU and node for a run (see dpo_ds.tools.estimate)."""
    from dpo_ds.tools.estimate import estimate_main

    return estimate_main(argv)


def sweep(argv: list[str]) -> int:
    """``dpo-ds sweep``: the same short job under several DeepSpeed configs (see dpo_ds.tools.sweep)."""
    from dpo_ds.tools.sweep import sweep_main

    return sweep_main(argv)


PRECOMPUTE_REF_USAGE = """usage: dpo-ds precompute-ref [--config run.yaml] [--any_training_flag VALUE ...]

Run the reference model once over the train and eval sets of a training config and cache its sequence
log-probs where `precompute_ref_log_probs: true` training looks for them (ref_cache_dir). The cache key
covers the tokenized data, the reference's weights and every setting that changes the values, so a
training run reuses the cache exactly when it would compute the same numbers. An interrupted pass
resumes where it stopped. Several ranks: `deepspeed --module dpo_ds.cli precompute-ref ...`."""


def precompute_ref(argv: list[str]) -> int:
    """``dpo-ds precompute-ref``: cache the reference log-probs of a run's data."""
    config = _run_config(argv, "precompute-ref", PRECOMPUTE_REF_USAGE)
    if config is None:
        return 0
    from dpo_ds import distributed, preemption
    from dpo_ds.losses import needs_reference
    from dpo_ds.trainer import DPOTrainer

    if not needs_reference(config):
        raise ConfigError(f"loss_type={config.loss_type!r} (reference_free={config.reference_free}) uses no "
                          "reference model: there is nothing to precompute", "loss_type")

    config.precompute_ref_log_probs = True
    preemption.install("setup")
    distributed.init(config.ddp_timeout)
    try:
        directories = DPOTrainer.precompute_reference(config)
    finally:
        distributed.shutdown()
    for split, directory in directories.items():
        print(f"dpo-ds precompute-ref: {split} split cached in {directory}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "data-check": data_check,
    "train": train,
    "export": export,
    "checkpoint": checkpoint,
    "precompute-ref": precompute_ref,
    "hostfile": hostfile,
    "estimate": estimate,
    "sweep": sweep,
}


SUMMARIES = {
    "data-check": "read and tokenize a dataset as training would; report what is kept and dropped",
    "train": "train (the same as launch/train.py)",
    "export": "write a checkpoint as a Hugging Face model directory",
    "checkpoint": "verify a checkpoint, or every checkpoint of an output_dir, against its COMPLETE marker",
    "precompute-ref": "cache the reference model's log-probs of a run's data",
    "hostfile": "check a hostfile, or write one for the current Slurm job",
    "estimate": "estimate memory per GPU and node for a run",
    "sweep": "run the same job under several DeepSpeed configs and compare",
}


def _parser() -> argparse.ArgumentParser:
    """`dpo-ds SUBCOMMAND ...`: one argparse subparser per COMMANDS entry; each parses its own arguments."""
    parser = argparse.ArgumentParser(prog="dpo-ds", epilog="dpo-ds SUBCOMMAND --help for its flags",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, summary in SUMMARIES.items():
        commands.add_parser(name, add_help=False, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dpo-ds SUBCOMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"dpo-ds: error: unknown subcommand {argv[0]!r}; expected one of {list(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](rest)
    except (DataError, ConfigError) as exc:
        print(f"dpo-ds {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
