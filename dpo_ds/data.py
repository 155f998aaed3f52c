"""Preference data: load a source, check every row, tokenize, truncate, report.

A row is ``{prompt?, chosen, rejected, tools?, chat_template_kwargs?}`` in one of
the formats TRL accepts:

- standard: ``prompt``/``chosen``/``rejected`` are strings;
- conversational: they are lists of ``{"role", "content"}`` messages, rendered
  with the tokenizer's chat template (``tools`` and per-row
  ``chat_template_kwargs`` are passed to it);
- explicit prompt (a ``prompt`` of the same kind as ``chosen``) or implicit
  prompt (none, or one of the other kind, which TRL ignores too: the prompt
  is the common prefix of ``chosen`` and ``rejected``, see
  ``_split_common_prefix``).

The format is decided per row, so one file may mix standard and
conversational rows (the built-in set does); the report counts rows per
format. Local JSON/JSONL files are read row by row as JSON text to keep every
value's type (see ``_json_dataset``); other sources go through ``datasets``.

Each row becomes ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and
``row_index`` (its position in the source split, blank JSONL lines not
counted, for error messages and the precomputed-reference cache). The prompt is tokenized once and the completion
ids start exactly where the prompt ids end (see ``_tokenize_standard`` and
``_tokenize_conversation`` for the boundary cases).

Truncation, in this order (``None`` disables a limit):

1. ``max_prompt_length``: a longer prompt keeps its last tokens (the end of the
   prompt, next to the completion, holds the generation prompt), whatever the
   ``truncation_mode``.
2. ``max_completion_length``: a longer completion keeps its first tokens.
3. ``max_length`` bounds prompt + completion, for chosen and rejected alike:

   - ``keep_start`` (TRL's default: keep the start of the sequence, cut its
     end): each completion is cut to ``max_length - len(prompt)`` tokens. A row
     whose prompt alone has ``max_length`` tokens or more would keep no
     completion token and is dropped (``prompt_exceeds_max_length``), as TRL
     does.
   - ``keep_end`` (keep the end of the sequence, cut its start): the prompt
     loses its first tokens until the longer completion fits; chosen and
     rejected keep the same prompt so that their log-ratios share one context
     (TRL cuts each sequence on its own). A row whose longer completion leaves
     no room for any prompt token is dropped (``completion_exceeds_max_length``).

Each part also gets a loss mask (``prompt_loss_mask``, ``chosen_loss_mask``,
``rejected_loss_mask``: 1 on the tokens whose log-prob counts), cut along with
the ids: the completion (``completion_only_loss``, TRL's default) or the prompt
too; with ``assistant_only_loss`` only the chat template's ``{% generation %}``
ranges; never a ``user`` or ``tool`` message inside a completion (see
``_conversation_masks``).

Rows with images (an ``images`` or ``image`` column, see ``dpo_ds.vision``) need the model's processor
in place of the tokenizer: the prompt's image placeholders expand into image tokens, which no truncation
cuts (a row whose image tokens would be cut is a bad row, ``image_tokens_truncated``), and the row keeps
its images, encoded, in ``images``.

Bad rows (wrong types, empty or identical completions, malformed messages,
unknown roles, invalid ``tools`` JSON, templates that fail, images that do not decode) raise one
``DataError`` listing them when ``on_bad_row="error"``, or are dropped and
counted when ``on_bad_row="skip"``.
"""
from __future__ import annotations

import codecs
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

from . import vision

ROLES = ("system", "developer", "user", "assistant", "tool")
REQUIRED_COLUMNS = ("chosen", "rejected")
OPTIONAL_COLUMNS = ("prompt", "tools", "chat_template_kwargs", *vision.IMAGE_COLUMNS)
# apply_chat_template arguments that this module sets itself.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tools", "add_generation_prompt", "continue_final_message", "tokenize", "return_dict"}
)
LENGTH_REASONS = ("prompt_exceeds_max_length", "completion_exceeds_max_length")
MAX_LISTED_ROWS = 10
# A ChatML template with {% generation %} tags that ships with dpo_ds (for assistant_only_loss).
GENERATION_TEMPLATE = Path(__file__).resolve().parent / "templates" / "chatml_generation.jinja"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Roles whose tokens a completion never scores: text the model did not write.
UNSCORED_ROLES = ("user", "tool")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
JSON_COLUMN = "_json"  # the one column of a local JSON file: each row as JSON text
_HELPER_COLUMNS = (
    "_format", "_drop", "_drop_column", "_drop_detail", "_boundary_fix", "_cut_prompt", "_cut_chosen", "_cut_rejected"
)
_FEATURES = Features(
    {
        "row_index": Value("int64"),
        "prompt_ids": List(Value("int32")),
        "chosen_ids": List(Value("int32")),
        "rejected_ids": List(Value("int32")),
        "prompt_loss_mask": List(Value("int8")),
        "chosen_loss_mask": List(Value("int8")),
        "rejected_loss_mask": List(Value("int8")),
        "images": List(Value("binary")),
        "_format": Value("string"),
        "_drop": Value("string"),
        "_drop_column": Value("string"),
        "_drop_detail": Value("string"),
        "_boundary_fix": Value("bool"),
        "_cut_prompt": Value("bool"),
        "_cut_chosen": Value("bool"),
        "_cut_rejected": Value("bool"),
    }
)


class DataError(ValueError):
    """The dataset cannot be used as given; the message says where and why."""


@dataclass
class DataReport:
    """What preprocessing did to one split (rows, drops, format, lengths)."""

    split: str
    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    boundary_fixes: int
    truncated: dict[str, int]
    prompt_lengths: list[int] = field(repr=False)
    chosen_lengths: list[int] = field(repr=False)
    rejected_lengths: list[int] = field(repr=False)
    problems: list[str] = field(default_factory=list)
    # Per kept row, the tokens whose log-prob counts (loss masks, next-token labels) in prompt + chosen/rejected.
    chosen_scored_lengths: list[int] = field(default_factory=list, repr=False)
    rejected_scored_lengths: list[int] = field(default_factory=list, repr=False)

    def percentiles(self) -> dict[str, dict[str, int]]:
        """p50/p90/p99/max token lengths of kept rows (nearest-rank), per part."""
        parts = {"prompt": self.prompt_lengths, "chosen": self.chosen_lengths, "rejected": self.rejected_lengths}
        return {name: _percentiles(lengths) for name, lengths in parts.items()}

    def scored_percentiles(self) -> dict[str, dict[str, int]]:
        """p50/p90/p99/max scored tokens per kept row (what completion_only_loss/assistant_only_loss leave)."""
        return {"chosen": _percentiles(self.chosen_scored_lengths),
                "rejected": _percentiles(self.rejected_scored_lengths)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts and percentiles, without the per-row length lists."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_lengths")}
        out["lengths"] = self.percentiles()
        out["scored_tokens"] = self.scored_percentiles()
        return out


@dataclass
class PreferenceData:
    """Tokenized train (and optional eval) splits with their reports."""

    train: Dataset
    train_report: DataReport
    eval: Dataset | None = None
    eval_report: DataReport | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Spec:
    """Everything the per-row function needs besides the tokenizer (hashed into the cache fingerprint)."""

    eos_token: str | None
    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str
    completion_only_loss: bool = True
    assistant_only_loss: bool = False


class _BadRow(Exception):
    def __init__(self, reason: str, column: str, detail: str):
        super().__init__(detail)
        self.reason, self.column, self.detail = reason, column, detail


def load_preference_data(args: Any, tokenizer: Any) -> PreferenceData:
    """Load ``args.dataset_name``, tokenize train/eval as configured, fail on bad rows or drop them."""
    train_raw, eval_raw, notes = load_raw_splits(args)
    parts = {name: _process(ds, tokenizer, args, name)
             for name, ds in (("train", train_raw), ("eval", eval_raw)) if ds is not None}
    _check_bad_rows(parts, args.on_bad_row)
    if "eval" not in parts and args.eval_fraction:
        try:
            split = parts["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        except ValueError as exc:
            raise DataError(f"cannot hold out eval_fraction={args.eval_fraction} of the train split: {exc}") from exc
        parts = {"train": split["train"], "eval": split["test"]}
    done = {name: _finish(ds, name) for name, ds in parts.items()}
    train, train_report = done["train"]
    eval_ds, eval_report = done.get("eval", (None, None))
    return PreferenceData(train, train_report, eval_ds, eval_report, notes)


def prepare_dataset(dataset: Dataset, tokenizer: Any, args: Any, split: str = "train") -> tuple[Dataset, DataReport]:
    """Tokenize an already loaded split (e.g. a ``Dataset`` handed to the trainer)."""
    processed = _process(dataset, tokenizer, args, split)
    _check_bad_rows({split: processed}, args.on_bad_row)
    return _finish(processed, split)


def load_raw_splits(args: Any) -> tuple[Dataset, Dataset | None, list[str]]:
    """The raw train split, the raw eval split, and notes for the user.

    The eval split is ``dataset_test_split`` when training evaluates
    (``eval_strategy != "no"``) and ``eval_fraction`` is 0; otherwise ``None``
    (``eval_fraction`` is then held out of train after tokenization). A source
    without split names (one data file, a saved ``Dataset``) is the train
    split and has no eval split, which the notes say.
    """
    data = _load_mixture(args.datasets) if args.datasets else _load_source(args.dataset_name, args.dataset_config)
    test_split = args.dataset_test_split if args.eval_strategy != "no" and not args.eval_fraction else None
    if isinstance(data, Dataset):
        source = "the datasets mixture" if args.datasets else args.dataset_name
        notes = [f"{source} is a single split, with no {test_split!r} split to evaluate on "
                 "(set eval_fraction to hold out part of it)"] if test_split else []
        return data, None, notes
    train = _pick_split(data, args.dataset_train_split, args.dataset_name)
    return train, (_pick_split(data, test_split, args.dataset_name) if test_split else None), []


def _check_columns(dataset: Dataset) -> None:
    """Fail unless the dataset (or the first row of a local JSON file) has the columns every row needs."""
    columns = dataset.column_names
    if columns == [JSON_COLUMN]:
        first = next((row for row in map(_parse_json, dataset[:100][JSON_COLUMN]) if isinstance(row, dict)), {})
        columns = list(first)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"the dataset has no column {', '.join(map(repr, missing))}: it has columns {columns}; "
            f"expected {list(REQUIRED_COLUMNS)} and optionally {list(OPTIONAL_COLUMNS)}"
        )


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _load_source(name: str, config: str | None) -> Dataset | DatasetDict:
    """Dispatch on the source kind: builtin, data file, ``save_to_disk`` directory, else hub name / data dir."""
    if name == "builtin":
        from dpo_ds.builtin import dataset_files

        return DatasetDict({split: _json_dataset(path) for split, path in dataset_files().items()})
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in _FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset file {name} does not exist")
        if suffix in (".json", ".jsonl"):
            return _json_dataset(str(path))
        if suffix == ".csv":
            _check_utf8(str(path))
        return _guarded_load(name, lambda: load_dataset(suffix[1:], data_files=str(path), split="train"))
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _guarded_load(name, lambda: load_from_disk(str(path)))
    if path.is_dir():
        for data_file in sorted(p for p in path.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES):
            _check_utf8(str(data_file))
    return _guarded_load(name, lambda: load_dataset(name, config))


def _load_mixture(entries: list[dict]) -> Dataset:
    """TRL's dataset mixture as one train split: each entry loaded with `load_dataset`, cut to its
    `columns`; with fractions (shares, normalized), the first round(share * N) rows of each entry, N
    the largest mixture size that oversamples no entry (TRL's rule); then concatenated in order."""
    parts = []
    for i, entry in enumerate(entries):
        where = f"datasets[{i}] ({entry['path']})"
        part = _guarded_load(where, lambda e=entry: load_dataset(
            e["path"], e.get("name"), data_dir=e.get("data_dir"), data_files=e.get("data_files"),
            split=e.get("split", "train")))
        if entry.get("columns") is not None:
            missing = [c for c in entry["columns"] if c not in part.column_names]
            if missing:
                raise DataError(f"{where}: no column {missing[0]!r} to select; it has {part.column_names}")
            part = part.select_columns(entry["columns"])
        parts.append(part)
    if entries[0].get("fraction") is not None:
        shares = [e["fraction"] / sum(e["fraction"] for e in entries) for e in entries]
        size = min(len(part) / share for part, share in zip(parts, shares))
        parts = [part.select(range(round(share * size))) for part, share in zip(parts, shares)]
    return _guarded_load("the datasets mixture", lambda: concatenate_datasets(parts))


def _guarded_load(name: str, load: Any) -> Dataset | DatasetDict:
    """Run a datasets loader; turn its failure into a DataError naming the source."""
    try:
        return load()
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetGenerationError, ...)
        raise DataError(f"cannot load dataset {name!r}: {type(exc).__name__}: {exc}") from exc


def _json_dataset(path: str) -> Dataset:
    """A local JSON Lines file or JSON array as one JSON-text column, decoded row by row in ``_process_row``.

    datasets' own JSON loader stores a column that mixes strings and lists
    (standard and conversational rows in one file) with its ``Json`` type,
    which reads back strings that look like JSON as numbers (" 84." -> 84.0).
    The file's size and mtime are generator arguments so that the cache
    follows the file's content.
    """
    _check_utf8(path)
    stat = os.stat(path)
    return _guarded_load(path, lambda: Dataset.from_generator(
        _json_records,
        features=Features({JSON_COLUMN: Value("string")}),
        gen_kwargs={"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    ))


def _json_records(path: str, size: int, mtime_ns: int) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        if handle.read(4096).lstrip().startswith("["):
            handle.seek(0)
            for record in json.load(handle):
                yield {JSON_COLUMN: json.dumps(record)}
            return
        handle.seek(0)
        for line in handle:
            if line.strip():
                yield {JSON_COLUMN: line}


def _check_utf8(path: str) -> None:
    offset = 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"dataset file {path} is not UTF-8 text (invalid byte at offset {offset + exc.start})"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _pick_split(data: DatasetDict, split: str, name: str) -> Dataset:
    if split not in data:
        raise DataError(
            f"dataset {name!r} has no split {split!r}; it has splits {list(data)}. Set dataset_train_split / "
            "dataset_test_split to one of them (dataset_test_split none: no evaluation), or eval_fraction "
            "to hold out part of the train split"
        )
    return data[split]


def _process(dataset: Dataset, tokenizer: Any, args: Any, split: str) -> Dataset:
    """Check and tokenize every row (one cached ``map``); bad and too-long rows are kept, marked in ``_drop``."""
    _check_columns(dataset)
    if args.truncation_mode not in ("keep_start", "keep_end"):
        raise DataError(f"truncation_mode must be 'keep_start' or 'keep_end', got {args.truncation_mode!r}")
    processor = tokenizer if vision.is_processor(tokenizer) else None
    tokenizer = processor.tokenizer if processor is not None else tokenizer
    spec = _Spec(
        eos_token=tokenizer.eos_token,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation_mode=args.truncation_mode,
        completion_only_loss=args.completion_only_loss,
        assistant_only_loss=args.assistant_only_loss,
    )
    if spec.assistant_only_loss:
        _check_generation_template(tokenizer)
    return _undecoded_images(dataset).map(
        _process_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "spec": spec, "processor": processor},
        remove_columns=dataset.column_names,
        features=_FEATURES,
        num_proc=args.dataset_num_proc,
        desc=f"Tokenizing {split} split",
    )


def _undecoded_images(dataset: Dataset) -> Dataset:
    """Image columns read as ``{bytes, path}``: a corrupt image must be a bad row, not a decoding crash."""
    for column in vision.IMAGE_COLUMNS:
        feature = dataset.features.get(column) if dataset.features else None
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def _check_bad_rows(parts: dict[str, Dataset], on_bad_row: str) -> None:
    """With ``on_bad_row="error"``, raise one DataError listing the first bad rows of all splits."""
    if on_bad_row == "skip":
        return
    if on_bad_row != "error":
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    problems, total = [], 0
    for split, ds in parts.items():
        found, count = _bad_rows(ds, split)
        problems += found
        total += count
    if total:
        listed = "\n".join(f"  {line}" for line in problems[:MAX_LISTED_ROWS])
        raise DataError(
            f"{total} bad row(s) in the dataset (first {min(total, MAX_LISTED_ROWS)} below); fix them, "
            f"or set on_bad_row=skip to drop them:\n{listed}"
        )


def _bad_rows(ds: Dataset, split: str) -> tuple[list[str], int]:
    """(first descriptions, total count) of rows dropped for a data problem, not for length."""
    table = ds.select_columns(["row_index", "_drop", "_drop_column", "_drop_detail"]).with_format("arrow")[:]
    problems, count = [], 0
    for row_index, reason, column, detail in zip(*(table[c].to_pylist() for c in table.column_names)):
        if reason and reason not in LENGTH_REASONS:
            count += 1
            if len(problems) < MAX_LISTED_ROWS:
                problems.append(f"{split} row {row_index}, column {column!r}: {reason}: {detail}")
    return problems, count


def _finish(ds: Dataset, split: str) -> tuple[Dataset, DataReport]:
    """Report on the processed split, then keep the usable rows and the output columns."""
    report = _report(ds, split)
    kept = ds.filter(_is_kept, input_columns="_drop", batched=True, desc=f"Dropping unusable {split} rows")
    kept = kept.remove_columns(list(_HELPER_COLUMNS))
    images = kept.select_columns(["images"]).with_format("arrow")[:]["images"]
    if not pc.sum(pc.list_value_length(images)).as_py():  # a text split keeps its text-only columns
        kept = kept.remove_columns("images")
    return kept, report


def _is_kept(drops: list[str]) -> list[bool]:
    return [not reason for reason in drops]


def _report(ds: Dataset, split: str) -> DataReport:
    table = ds.select_columns(list(_FEATURES)).with_format("arrow")[:]
    col = {name: table[name].to_pylist() for name in _HELPER_COLUMNS}
    kept = [not reason for reason in col["_drop"]]
    dropped: dict[str, int] = {}
    for reason in col["_drop"]:
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1

    def lengths(name: str) -> list[int]:
        return [len(ids) for ids, keep in zip(table[name].to_pylist(), kept) if keep]

    def scored(part: str) -> list[int]:
        """Scored label positions: the sequence's first token has no label, whatever its mask says."""
        prompts, masks = table["prompt_loss_mask"].to_pylist(), table[f"{part}_loss_mask"].to_pylist()
        return [sum((p + m)[1:]) for p, m, keep in zip(prompts, masks, kept) if keep]

    return DataReport(
        split=split,
        format=_describe_formats(col["_format"]),
        rows_read=len(kept),
        rows_kept=sum(kept),
        dropped=dropped,
        boundary_fixes=sum(col["_boundary_fix"]),
        truncated={part: sum(col[f"_cut_{part}"]) for part in ("prompt", "chosen", "rejected")},
        prompt_lengths=lengths("prompt_ids"),
        chosen_lengths=lengths("chosen_ids"),
        rejected_lengths=lengths("rejected_ids"),
        problems=_bad_rows(ds, split)[0],
        chosen_scored_lengths=scored("chosen"),
        rejected_scored_lengths=scored("rejected"),
    )


def _describe_formats(formats: list[str]) -> str:
    """"standard, explicit prompt" for a uniform split; each format with its row count for a mixed one."""
    counts: dict[str, int] = {}
    for fmt in formats:
        if fmt:
            counts[fmt] = counts.get(fmt, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "none")
    return "; ".join(f"{fmt} ({n} rows)" for fmt, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _percentiles(lengths: list[int]) -> dict[str, int]:
    ordered = sorted(lengths)
    if not ordered:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    rank = {p: ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1] for p in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": ordered[-1]}


def _process_row(row: dict, index: int, tokenizer: Any, spec: _Spec, processor: Any = None) -> dict:
    out = {"row_index": index, "prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_loss_mask": [],
           "chosen_loss_mask": [], "rejected_loss_mask": [], "images": [], "_format": "", "_drop": "",
           "_drop_column": "", "_drop_detail": "", "_boundary_fix": False,
           "_cut_prompt": False, "_cut_chosen": False, "_cut_rejected": False}
    try:
        if JSON_COLUMN in row:
            row = _json_row(row[JSON_COLUMN])
        conversational = _is_conversational(row)
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise _BadRow("wrong_type", "prompt", f"expected text or a list of messages, got {_type_name(prompt)}")
        explicit = isinstance(prompt, list if conversational else str)
        tools = _tools(row.get("tools"))
        kwargs = _template_kwargs(row.get("chat_template_kwargs"))
        images = _images(row, conversational, processor)
        pictures = _Pictures(processor, images) if images else None
        if conversational:
            tokenized = _tokenize_conversation(row, explicit, tools, kwargs, tokenizer, spec, pictures)
        elif tools or kwargs:
            column = "tools" if tools else "chat_template_kwargs"
            raise _BadRow("wrong_type", column, "needs conversational rows (lists of messages), not plain text")
        else:
            tokenized = _tokenize_standard(row, explicit, tokenizer, spec)
        prompt_ids, chosen_ids, rejected_ids, fixed, masks = tokenized
        out["_format"] = _format_name(conversational, explicit, prompt is not None, bool(tools), bool(kwargs))
        if images:
            out["_format"] += ", images"
        out["_boundary_fix"] = fixed
        out["images"] = images
        out.update(_truncate(prompt_ids, chosen_ids, rejected_ids, spec, pictures.start if pictures else None))
        out.update(_cut_loss_masks(masks, out))
    except _BadRow as bad:
        out.update(_drop=bad.reason, _drop_column=bad.column, _drop_detail=bad.detail)
    return out


def _images(row: dict, conversational: bool, processor: Any) -> list[bytes]:
    """The row's images, encoded and checked; a row with images needs messages and a vision processor."""
    try:
        column, images = vision.row_images(row)
    except vision.ImageError as bad:
        raise _BadRow("bad_image", bad.column, str(bad)) from None
    if images and not conversational:
        raise _BadRow("wrong_type", column, "images need conversational rows (lists of messages), not plain text")
    if images and processor is None:
        raise _BadRow("wrong_type", column, "the row has images, but the model has no image processor: "
                                            "train a vision-language model (its AutoProcessor is used)")
    return images


@dataclass
class _Pictures:
    """A row's images, and (once the prompt is tokenized) the position of the first token they added."""

    processor: Any
    images: list[bytes]
    start: int | None = None

    def expand(self, prompt_text: str, text_ids: list[int]) -> list[int]:
        """The prompt's ids with each image placeholder expanded into the image's tokens."""
        try:
            ids = vision.prompt_ids(self.processor, prompt_text, self.images)
        except vision.ImageError as bad:
            raise _BadRow("bad_image", bad.column, str(bad)) from None
        self.start = next((i for i, (a, b) in enumerate(zip(ids, text_ids)) if a != b), len(text_ids))
        return ids


def _json_row(text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRow("invalid_json", "(row)", f"is not valid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise _BadRow("wrong_type", "(row)", f"expected a JSON object, got {_type_name(row)}")
    return row


def _is_conversational(row: dict) -> bool:
    """A row is conversational when chosen and rejected are message lists, standard when they are texts."""
    for column in ("chosen", "rejected"):
        if column not in row:
            raise _BadRow("missing_value", column, f"is missing: the row has keys {sorted(row)}")
        if row[column] is None:
            raise _BadRow("missing_value", column, "is missing (null)")
        if not isinstance(row[column], (str, list)):
            raise _BadRow("wrong_type", column, f"expected text or a list of messages, got {_type_name(row[column])}")
    if type(row["chosen"]) is not type(row["rejected"]):
        kinds = _type_name(row["rejected"]), _type_name(row["chosen"])
        raise _BadRow("wrong_type", "rejected", "is {} but chosen is {}".format(*kinds))
    return isinstance(row["chosen"], list)


def _format_name(conversational: bool, explicit: bool, has_prompt: bool, tools: bool, kwargs: bool) -> str:
    words = ["conversational" if conversational else "standard", "explicit prompt" if explicit else "implicit prompt"]
    if has_prompt and not explicit:
        words.append("prompt column ignored (its type differs from chosen)")
    words += [name for name, present in (("tools", tools), ("chat_template_kwargs", kwargs)) if present]
    return ", ".join(words)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _split_common_prefix(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's implicit prompt: the longest common prefix (characters or messages) of chosen and rejected.

    As in ``trl.extract_prompt``: a space just before the first difference goes
    to the completions, and when one sequence is a prefix of the other the last
    shared element stays in the completions, so neither becomes empty.
    """
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), shortest - 1)
    if cut > 0 and isinstance(chosen, str) and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _encode(tokenizer: Any, text: str, special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


_Masks = tuple[list[int], list[int], list[int]]  # 1 on the scored tokens of prompt, chosen, rejected
_Tokenized = tuple[list[int], list[int], list[int], bool, _Masks]  # prompt, chosen, rejected ids; boundary fixed


def _tokenize_standard(row: dict, explicit: bool, tokenizer: Any, spec: _Spec) -> _Tokenized:
    """Plain text: EOS appended to completions; prompt ids are exactly ``tokenize(prompt)``.

    When ``tokenize(prompt + completion)`` does not start with the prompt ids
    (BPE merged across the boundary), the completion is tokenized on its own.
    """
    chosen, rejected = row["chosen"], row["rejected"]
    eos_token = spec.eos_token
    for column, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _BadRow("empty_completion", column, "is empty or whitespace-only")
    if chosen == rejected:
        raise _BadRow("identical_completions", "chosen", "chosen and rejected are identical")
    if explicit:
        prompt = row["prompt"]
    else:
        prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
    prompt_ids = _encode(tokenizer, prompt, special_tokens=True)
    completions, fixed = [], False
    for text in (chosen, rejected):
        if eos_token and not text.endswith(eos_token):
            text += eos_token
        full = _encode(tokenizer, prompt + text, special_tokens=True)
        if full[: len(prompt_ids)] == prompt_ids:
            completions.append(full[len(prompt_ids):])
        else:
            completions.append(_encode(tokenizer, text, special_tokens=False))
            fixed = True
    return prompt_ids, completions[0], completions[1], fixed, _text_masks(prompt_ids, *completions, spec)


def _text_masks(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], spec: _Spec) -> _Masks:
    """Plain text has no assistant turns to pick: the completions are scored, the prompt too unless completion-only."""
    if spec.assistant_only_loss:
        raise _BadRow("wrong_type", "chosen", "assistant_only_loss needs conversational rows (lists of messages), "
                                              "not plain text")
    return [0 if spec.completion_only_loss else 1] * len(prompt_ids), [1] * len(chosen_ids), [1] * len(rejected_ids)


def _cut_loss_masks(masks: _Masks, out: dict) -> dict:
    """The masks cut as ``_truncate`` cut the ids: a prompt keeps its end, a completion its start."""
    prompt, chosen, rejected = masks
    return {"prompt_loss_mask": prompt[len(prompt) - len(out["prompt_ids"]):],
            "chosen_loss_mask": chosen[:len(out["chosen_ids"])],
            "rejected_loss_mask": rejected[:len(out["rejected_ids"])]}


def _tokenize_conversation(
    row: dict, explicit: bool, tools: list[dict] | None, kwargs: dict, tokenizer: Any, spec: _Spec,
    pictures: Any = None
) -> _Tokenized:
    """Messages: prompt rendered with the generation prompt, completion = full render minus prompt render.

    When the full conversation does not start with the prompt render (the
    template's generation prompt differs from the start of its assistant turn),
    the completion text starts where the two renders diverge; when the render
    starts with it but the ids do not (BPE merge), the completion text is
    tokenized on its own. Either way the prompt ids are exactly the prompt's. With ``pictures`` (the row's
    images), message contents stay lists of parts, and the prompt's image placeholders are expanded last.
    """
    chosen = _messages(row["chosen"], "chosen", pictures is not None)
    rejected = _messages(row["rejected"], "rejected", pictures is not None)
    for column, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(_text(m.get("content")).strip() or m.get("tool_calls") for m in messages):
            raise _BadRow("empty_completion", column, "has no message with non-empty content")
    if chosen == rejected:
        raise _BadRow("identical_completions", "chosen", "chosen and rejected are identical")
    if explicit:
        prompt = _messages(row["prompt"], "prompt", pictures is not None)
    else:
        prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
    if pictures is not None:
        prompt = _with_image_parts(prompt, chosen, rejected, len(pictures.images))
    if not prompt:
        raise _BadRow("empty_prompt", "prompt", "the conversation has no prompt message before the completions")
    if not getattr(tokenizer, "chat_template", None):
        raise _BadRow("chat_template_error", "prompt", "the tokenizer has no chat template; set chat_template_path")

    def render(messages: list[dict], column: str, generation_prompt: bool) -> str:
        return _render(tokenizer, messages, tools, kwargs, column, generation_prompt)

    prompt_text = render(prompt, "prompt", generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text, special_tokens=False)
    completions, spans, fixed = [], [], False
    for column, messages in (("chosen", chosen), ("rejected", rejected)):
        full = render(prompt + messages, column, generation_prompt=False)
        if full.startswith(prompt_text):
            full_ids = _encode(tokenizer, full, special_tokens=False)
            if full_ids[: len(prompt_ids)] == prompt_ids:
                completion_ids, start, separate = full_ids[len(prompt_ids):], len(prompt_text), False
            else:
                start, separate = len(prompt_text), True
                completion_ids, fixed = _encode(tokenizer, full[start:], special_tokens=False), True
        else:
            if not full.startswith(render(prompt, "prompt", generation_prompt=False)):
                raise _BadRow(
                    "chat_template_error", column,
                    "the chat template renders the prompt messages differently when a completion follows, "
                    "so the completion cannot be located",
                )
            start = next((i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b), len(full))
            completion_ids, fixed, separate = _encode(tokenizer, full[start:], special_tokens=False), True, True
        if not completion_ids:
            raise _BadRow("empty_completion", column, "renders to no text after the prompt")
        completions.append(completion_ids)
        spans.append(_Rendered(column, messages, full, start, separate))
    masks = _conversation_masks(tokenizer, prompt, prompt_text, prompt_ids, completions, spans, render, tools, kwargs,
                                spec)
    if pictures is not None:
        prompt_ids, masks = _expand_images(pictures, prompt_text, prompt_ids, masks)
    return prompt_ids, completions[0], completions[1], fixed, masks


def _expand_images(pictures: Any, prompt_text: str, prompt_ids: list[int], masks: _Masks) -> tuple[list[int], _Masks]:
    """The prompt's ids with its image placeholders expanded (last: the masks were found on the text's ids).

    Image tokens are never scored; a prompt that scores any token (completion_only_loss=false) cannot keep
    its mask aligned through the expansion, so such a row is refused rather than scored wrongly.
    """
    prompt_mask, chosen_mask, rejected_mask = masks
    if any(prompt_mask):
        raise _BadRow("prompt_loss_with_images", "prompt",
                      "scoring prompt tokens (completion_only_loss=false) is not supported for rows with images")
    expanded = pictures.expand(prompt_text, prompt_ids)
    return expanded, ([0] * len(expanded), chosen_mask, rejected_mask)


def _render(tokenizer: Any, messages: list[dict], tools: list[dict] | None, kwargs: dict, column: str,
            generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
        )
    except Exception as exc:  # templates raise anything: jinja errors, raise_exception(), TypeError on bad values
        raise _BadRow("chat_template_error", column, f"{type(exc).__name__}: {exc}") from None


@dataclass
class _Rendered:
    """One completion as rendered: its messages, the full conversation text, where the completion's text starts
    in it, and whether its ids were encoded from there on their own (else they continue the full text's ids)."""

    column: str
    messages: list[dict]
    full: str
    start: int
    separate: bool


def _check_generation_template(tokenizer: Any) -> None:
    """assistant_only_loss reads the template's {% generation %} mask: refuse a template without one up front."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and not _GENERATION_TAG.search(template):
        raise DataError(
            "assistant_only_loss=true needs a chat template that marks the assistant's output with "
            "{% generation %} ... {% endgeneration %}, and the tokenizer's template has no generation tags. "
            f"Set chat_template_path to a template that has them, e.g. {GENERATION_TEMPLATE} "
            "(ChatML with tool calls, the built-in model's format)"
        )


def _conversation_masks(tokenizer: Any, prompt: list[dict], prompt_text: str, prompt_ids: list[int],
                        completions: list[list[int]], rendered: list[_Rendered], render: Any,
                        tools: list[dict] | None, kwargs: dict, spec: _Spec) -> _Masks:
    """Which tokens a conversational row scores, from character ranges of its rendered text.

    A completion scores its tokens outside ``user``/``tool`` messages (text the
    model did not write), and with ``assistant_only_loss`` only those inside
    the template's ``{% generation %}`` ranges. The prompt scores nothing with
    ``completion_only_loss``; otherwise all of it, or with
    ``assistant_only_loss`` its assistant turns. A token counts when any of its
    characters does (transformers' rule for ``return_assistant_tokens_mask``).
    The common case (completion-only, no user/tool message in a completion)
    needs no character work at all.
    """
    def plain(messages: list[dict]) -> bool:
        return not spec.assistant_only_loss and not any(m["role"] in UNSCORED_ROLES for m in messages)

    masks: list[list[int]] = []
    generation: dict[str, list[bool]] = {}
    for ids, done in zip(completions, rendered):
        if plain(done.messages):
            masks.append([1] * len(ids))
            continue
        scored = _message_chars(done, prompt, render)
        if spec.assistant_only_loss:
            generation[done.column] = _generation_chars(tokenizer, prompt + done.messages, tools, kwargs, done)
            scored = [s and g for s, g in zip(scored, generation[done.column])]
        if done.separate:
            offsets = _offsets(tokenizer, done.full[done.start:], done.start)
        else:
            offsets = _offsets(tokenizer, done.full, 0)[len(prompt_ids):]
        masks.append(_token_mask(offsets, scored))
    if spec.completion_only_loss:
        prompt_mask = [0] * len(prompt_ids)
    elif not spec.assistant_only_loss:
        prompt_mask = [1] * len(prompt_ids)
    else:
        # The prompt's text agrees with the chosen render up to the completion's start (after it: a generation
        # prompt that the full render lacks, never an assistant turn).
        in_turn = generation["chosen"][:rendered[0].start]
        prompt_mask = _token_mask(_offsets(tokenizer, prompt_text, 0),
                                  in_turn + [False] * (len(prompt_text) - len(in_turn)))
    return prompt_mask, masks[0], masks[1]


def _message_chars(done: _Rendered, prompt: list[dict], render: Any) -> list[bool]:
    """Per character of the full text: True inside the completion but outside its user/tool messages.

    Message k ends where the render of the conversation up to message k stops
    agreeing with the full render (a common prefix, not an exact one: a
    template may close a group of tool messages only after the last).
    """
    full = done.full
    chars = [False] * done.start + [True] * (len(full) - done.start)
    start = done.start
    for k, message in enumerate(done.messages):
        upto = full if k == len(done.messages) - 1 else render(prompt + done.messages[:k + 1], done.column, False)
        end = next((i for i, (a, b) in enumerate(zip(upto, full)) if a != b), min(len(upto), len(full)))
        if message["role"] in UNSCORED_ROLES:
            chars[start:end] = [False] * max(0, end - start)
        start = max(start, end)
    return chars


def _generation_chars(tokenizer: Any, messages: list[dict], tools: list[dict] | None, kwargs: dict,
                      done: _Rendered) -> list[bool]:
    """Per character of the full text: True inside the chat template's {% generation %} ranges."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True}, **kwargs,
        )
    except Exception as exc:  # as in _render
        raise _BadRow("chat_template_error", done.column, f"{type(exc).__name__}: {exc}") from None
    chars = [False] * len(done.full)
    for (a, b), marked in zip(out["offset_mapping"], out["assistant_masks"]):
        if marked:
            chars[a:b] = [True] * (min(b, len(chars)) - a)
    return chars


def _offsets(tokenizer: Any, text: str, base: int) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` (tokenized as ``_encode`` does), shifted by ``base``."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"assistant_only_loss and user/tool messages inside completions need a fast tokenizer "
                        f"(character offsets); {type(tokenizer).__name__} is not one")
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [(a + base, b + base) for a, b in spans]


def _token_mask(offsets: list[tuple[int, int]], scored: list[bool]) -> list[int]:
    """1 for each token with at least one scored character (a zero-width token looks at the character it sits on)."""
    return [int(any(scored[a:max(b, a + 1)])) for a, b in offsets]


def _with_image_parts(prompt: list[dict], chosen: list[dict], rejected: list[dict], count: int) -> list[dict]:
    """The prompt with its image parts (TRL's placement when it has none); completions must have none."""
    for column, messages in (("chosen", chosen), ("rejected", rejected)):
        if vision.has_image_parts(messages):
            raise _BadRow("wrong_type", column, "has an image part: images belong in the prompt")
    return prompt if vision.has_image_parts(prompt) else vision.with_image_parts(prompt, count)


def _drop_none(value: Any) -> Any:
    """Arrow fills absent struct keys with None; templates test ``is defined``, so remove them."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _text(content: Any) -> str:
    return vision.text_of(content) if isinstance(content, list) else content or ""


def _messages(value: list, column: str, parts: bool = False) -> list[dict]:
    """The messages with None-valued keys removed; a malformed message raises _BadRow.

    A content given as a list of ``{"type": "text"}``/``{"type": "image"}`` parts stays one with
    ``parts`` (a row with images, rendered by the processor's template) and becomes its text otherwise.
    """
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _BadRow("bad_message", column,
                          f"message {i} is {_type_name(message)}, not a {{role, content}} object")
        message = _drop_none(message)
        if "role" not in message:
            raise _BadRow("bad_message", column, f"message {i} has no 'role'")
        if message["role"] not in ROLES:
            raise _BadRow("unknown_role", column,
                          f"message {i} has role {message['role']!r}; expected one of {list(ROLES)}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise _BadRow("bad_message", column, f"message {i} has no 'content'")
        if isinstance(content, list):
            _check_parts(content, column, i)
            if not parts:
                if any(part["type"] == "image" for part in content):
                    raise _BadRow("wrong_type", column, f"message {i} has an image part, but the row has no "
                                                        "images column")
                message = {**message, "content": vision.text_of(content)}
        elif content is not None and not isinstance(content, str):
            raise _BadRow("wrong_type", column,
                          f"message {i} content: expected text or a list of parts, got {_type_name(content)}")
        messages.append(message)
    return messages


def _check_parts(content: list, column: str, i: int) -> None:
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image") or (kind == "text" and not isinstance(part.get("text"), str)):
            raise _BadRow("bad_message", column, f"message {i} content part {j}: expected "
                                                 '{"type": "text", "text": ...} or {"type": "image"}, got '
                                                 f"{part!r:.80}")


def _tools(value: Any) -> list[dict] | None:
    """A list of JSON schemas, given as such or as a JSON string; ``None``/empty means no tools."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _BadRow("invalid_tools_json", "tools", f"is not valid JSON: {exc}") from None
    if not value:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise _BadRow("wrong_type", "tools", f"expected a list of JSON schema objects, got {_type_name(value)}")
    return _drop_none(value)


def _template_kwargs(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadRow("wrong_type", "chat_template_kwargs", f"expected an object, got {_type_name(value)}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & value.keys())
    if reserved:
        raise _BadRow("wrong_type", "chat_template_kwargs", f"cannot set {reserved}: they are set from the row itself")
    return _drop_none(value)


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], spec: _Spec,
              image_start: int | None = None) -> dict:
    """Apply the module docstring's truncation rules; raise _BadRow with a length reason to drop the row.

    ``image_start``: the position of the first image token of the prompt; no cut may reach it.
    """
    cut = {"_cut_prompt": False, "_cut_chosen": False, "_cut_rejected": False}

    def keep_prompt_end(ids: list[int], n: int) -> list[int]:
        if image_start is not None and len(ids) - n > image_start:
            raise _BadRow("image_tokens_truncated", "images",
                          f"keeping the last {n} of the prompt's {len(ids)} tokens would cut its image tokens "
                          f"(the first is token {image_start}); raise max_length / max_prompt_length")
        if len(ids) > n:
            cut["_cut_prompt"] = True
            return ids[len(ids) - n:]
        return ids

    def keep_completion_start(ids: list[int], n: int, part: str) -> list[int]:
        if len(ids) > n:
            cut[f"_cut_{part}"] = True
            return ids[:n]
        return ids

    if spec.max_prompt_length is not None:
        prompt = keep_prompt_end(prompt, spec.max_prompt_length)
    if spec.max_completion_length is not None:
        chosen = keep_completion_start(chosen, spec.max_completion_length, "chosen")
        rejected = keep_completion_start(rejected, spec.max_completion_length, "rejected")
    if spec.max_length is not None:
        if spec.truncation_mode == "keep_start":
            if len(prompt) >= spec.max_length:
                raise _BadRow("prompt_exceeds_max_length", "prompt", f"{len(prompt)} prompt tokens >= max_length")
            room = spec.max_length - len(prompt)
            chosen = keep_completion_start(chosen, room, "chosen")
            rejected = keep_completion_start(rejected, room, "rejected")
        else:
            longest = max(len(chosen), len(rejected))
            if longest + (1 if prompt else 0) > spec.max_length:
                raise _BadRow("completion_exceeds_max_length", "chosen" if len(chosen) == longest else "rejected",
                              f"{longest} completion tokens leave no room for the prompt in max_length")
            prompt = keep_prompt_end(prompt, spec.max_length - longest)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, **cut}
