"""`dpo-ds data-check`, run as a separate process the way a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ds.cli import main

REPO = Path(__file__).resolve().parents[1]


def data_check(*args):
    return subprocess.run([sys.executable, "-m", "dpo_ds.cli", "data-check", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GOOD = {"prompt": "one two three four five six seven eight nine ten", "chosen": " yes", "rejected": " no"}


@pytest.mark.slow  # starts a subprocess
def test_json_report_with_training_flag_overrides(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Hi", "chosen": " a", "rejected": " a"},
                                               {"prompt": "Hi", "chosen": " hello", "rejected": " bye"}])
    result = data_check("--dataset", path, "--model", "builtin", "--json", "--dataset_test_split", "none",
                        "--max_length", "10", "--on_bad_row", "skip")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["rows"], report["kept"], report["format"]) == (3, 1, "standard, explicit prompt")
    assert report["dropped"] == {"identical_completions": 1, "prompt_exceeds_max_length": 1}
    assert report["eval"] is None
    assert report["lengths"]["prompt"]["max"] == 1  # "Hi"


@pytest.mark.slow  # starts a subprocess
def test_bad_rows_exit_non_zero_with_the_message_and_no_traceback(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Hi", "chosen": "", "rejected": " no"}])
    result = data_check("--dataset", path, "--model", "builtin", "--dataset_test_split=none")
    assert result.returncode == 1
    assert "1 bad row(s)" in result.stderr
    assert "train row 1, column 'chosen': empty_completion" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_text_report_shows_examples_with_the_boundary(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert main(["data-check", "--dataset", path, "--model", "builtin", "--show", "1", "--truncation_mode",
                 "keep_end", "--max_length", "8", "--eval_strategy", "steps"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 rows read, 1 kept, 0 dropped" in out
    assert "truncated rows: prompt 1, chosen 0, rejected 0" in out
    assert "note: " in out and "no 'test' split" in out
    # 10 prompt tokens + 2 completion tokens in max_length 8: the prompt keeps its last 6, for both completions
    lines = out.splitlines()
    assert " five six seven eight nine ten[[COMPLETION]] yes<|im_end|>" in lines
    assert " five six seven eight nine ten[[COMPLETION]] no<|im_end|>" in lines


@pytest.mark.slow  # starts a subprocess
def test_builtin_dataset_and_model_keep_every_row():
    result = data_check("--dataset", "builtin", "--model", "builtin", "--json", "--eval_strategy", "steps")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] > 0 and report["kept"] == report["rows"] and report["dropped"] == {}
    assert report["eval"]["kept"] == report["eval"]["rows"] > 0


def test_config_errors_are_reported_without_traceback(capsys):
    assert main(["data-check", "--dataset", "builtin", "--truncation_mode", "middle"]) == 1
    assert "truncation_mode" in capsys.readouterr().err
    assert main(["data-check", "--dataset", "builtin", "--shoe", "2"]) == 1
    assert "unknown argument(s) ['--shoe', '2']" in capsys.readouterr().err
    assert main(["data-check", "--show", "many"]) == 1
    assert "--show needs a number of examples, got 'many'" in capsys.readouterr().err


def test_dispatch(capsys):
    assert main(["data-check", "--help"]) == 0
    assert "--dataset SOURCE" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'frobnicate'; expected one of" in err and "'data-check'" in err
    assert main([]) == 2


@pytest.mark.parametrize("argv", [["--dataset=x.jsonl", "--model", "m"], ["--dataset", "x.jsonl", "--model=m"]])
def test_aliases_become_config_keys(argv):
    from dpo_ds.cli import _data_check_flags
    from dpo_ds.parser import parse_known

    rest, as_json, show = _data_check_flags(argv + ["--json", "--show=3"])
    config, remaining = parse_known(rest)
    assert (config.dataset_name, config.model_name_or_path, as_json, show, remaining) == ("x.jsonl", "m", True, 3, [])
