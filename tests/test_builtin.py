"""The built-in preference dataset: reproducible, well-formed, split cleanly, short enough."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ds.builtin import dataset_files

REPO = Path(__file__).resolve().parent.parent


def _rows(split: str) -> list[dict]:
    with open(dataset_files()[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _conversational(row: dict) -> bool:
    return isinstance(row["prompt"], list)


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion.strip()


def _question(row: dict) -> str:
    """The question a row asks: its last user message (conversational) or last 'Question:' line."""
    if _conversational(row):
        return row["prompt"][-1]["content"]
    return re.findall(r"Question: (.*)\nAnswer:$", row["prompt"])[-1]


@pytest.fixture(scope="module")
def splits():
    return {split: _rows(split) for split in ("train", "test")}


def test_generator_reproduces_committed_files(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="12345")  # no dependence on set/dict hash order
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_builtin_data.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True)
    for split, path in dataset_files().items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == Path(path).read_bytes(), split


def test_sizes(splits):
    assert len(splits["train"]) >= 1000
    assert 150 <= len(splits["test"]) <= 300


def test_both_formats_are_mixed_in_each_split(splits):
    for split, rows in splits.items():
        conversational = sum(map(_conversational, rows))
        assert 0.25 * len(rows) < conversational < 0.75 * len(rows), split
        # mixed along the file, not two blocks one after the other
        half = len(rows) // 2
        assert 0 < sum(map(_conversational, rows[:half])) < half, split


def test_rows_are_well_formed(splits):
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            where = f"{split} row {i}"
            assert set(row) == {"prompt", "chosen", "rejected"}, where
            if _conversational(row):
                roles = [m["role"] for m in row["prompt"]]
                assert roles[-1] == "user" and set(roles) <= {"system", "user", "assistant"}, where
                assert all(set(m) == {"role", "content"} and m["content"] for m in row["prompt"]), where
                for key in ("chosen", "rejected"):
                    assert [m["role"] for m in row[key]] == ["assistant"], where
            else:
                assert row["prompt"].endswith("\nAnswer:"), where
                assert row["chosen"].startswith(" ") and row["rejected"].startswith(" "), where
            assert _text(row["chosen"]) != _text(row["rejected"]), where


def test_train_and_test_share_no_question(splits):
    train = {_question(r) for r in splits["train"]}
    test = [_question(r) for r in splits["test"]]
    assert len(set(test)) == len(test)
    assert not train & set(test)
    assert not {json.dumps(r["prompt"]) for r in splits["train"]} & {json.dumps(r["prompt"]) for r in splits["test"]}


def _right_answer(question: str) -> str | None:
    """Computed here, independently of the generator, for arithmetic and comparison questions."""
    if match := re.match(r"What is (\d+) ([-+*]) (\d+)\?", question):
        a, op, b = int(match[1]), match[2], int(match[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if match := re.match(r"Which number is larger, (\d+) or (\d+)\?", question):
        return str(max(int(match[1]), int(match[2])))
    return None


def _states(answer: str, value: str) -> bool:
    """'12 + 30 equals 42.', '42.', '42 is larger than 7.' (any case, maybe with ' Done.')."""
    return re.match(rf"^(.* equals )?{value}(\.| is larger)", answer, re.IGNORECASE) is not None


def _is_format_pair(chosen: str, rejected: str) -> bool:
    return chosen in (f"{rejected} Done.", rejected.upper()) or len(chosen.split()) == 1


def test_arithmetic_and_comparison_answers_are_right_in_chosen_only(splits):
    correctness_pairs = 0
    for rows in splits.values():
        for row in rows:
            chosen, rejected, value = _text(row["chosen"]), _text(row["rejected"]), _right_answer(_question(row))
            if value is None:
                continue
            assert _states(chosen, value), (_question(row), chosen)
            if not _is_format_pair(chosen, rejected):
                assert not _states(rejected, value), (_question(row), rejected)
                correctness_pairs += 1
    assert correctness_pairs > 100


def test_format_pairs_follow_their_instruction(splits):
    """Whenever the prompt asks for a format, chosen has it and rejected does not."""
    for rows in splits.values():
        for row in rows:
            prompt = json.dumps(row["prompt"]).lower()
            chosen, rejected = _text(row["chosen"]), _text(row["rejected"])
            if "done." in prompt:
                assert chosen == f"{rejected} Done."
            elif "uppercase" in prompt or "capital letters" in prompt or "all caps" in prompt:
                assert chosen == rejected.upper() != rejected
            elif "one word" in prompt or "single word" in prompt:
                assert len(chosen.split()) == 1 < len(rejected.split())
                assert chosen.rstrip(".").lower() in rejected.lower()


def test_everything_fits_max_length_192(splits, builtin_tokenizer):
    tok = builtin_tokenizer
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            for key in ("chosen", "rejected"):
                if _conversational(row):
                    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
                    full = tok.apply_chat_template(row["prompt"] + row[key], return_dict=False)
                    completion = len(full) - len(prompt)
                else:
                    prompt = tok(row["prompt"]).input_ids
                    completion = len(tok(row[key]).input_ids) + 1  # + EOS
                assert completion < 40 and len(prompt) + completion <= 192, f"{split} row {i} {key}"
