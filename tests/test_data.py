"""dpo_ds.data: sources, formats, prompt/completion boundary, truncation, bad rows, report, cache.

Expected token ids are computed in each test from ``tokenizer(...)`` on the
literal strings (or from TRL 1.16's own preprocessing), never from dpo_ds.
"""
import json
import os
from types import SimpleNamespace

import datasets
import pytest
from datasets import Dataset, DatasetDict

from dpo_ds.config import ConfigError, DPOConfig
from dpo_ds.data import DataError, DataReport, load_preference_data, prepare_dataset
from dpo_ds.models import load_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
EOS = "<|im_end|>"

# A ChatML-like template that renders tools, assistant tool calls and a per-row `note` kwarg.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}{{ ' ' + tool.function.name }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- if note is defined %}{{ '<|im_start|>system\\nNote: ' + note + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.tool_calls is defined %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + call.function.name + '</tool_call>' }}{% endfor %}{% endif %}"
    "{%- if message.content is defined %}{{ message.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Its generation prompt opens an empty think block that the rendered assistant turn does not have.
THINK_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)
# Renders the message count first, so a prompt renders differently when a completion follows.
COUNTING_TEMPLATE = (
    "{{ messages | length }}{{ '\\n' }}{%- for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def config(source, **overrides):
    overrides.setdefault("dataset_test_split", None)
    overrides.setdefault("eval_strategy", "steps")  # an eval split is loaded only when something evaluates
    return DPOConfig(dataset_name=str(source), **overrides)


def load(tmp_path, rows, tokenizer, **overrides):
    return load_preference_data(config(write_jsonl(tmp_path / "data.jsonl", rows), **overrides), tokenizer)


def encode(tokenizer, text, special_tokens=False):
    return tokenizer(text, add_special_tokens=special_tokens)["input_ids"]


def trl_tokenize(tokenizer, rows):
    """TRL 1.16's DPO preprocessing (prompt extraction, EOS, tokenization) as the reference."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trl_args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(rows), tokenizer,
                                      trl_args, "reference")
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in out]


def ids(dataset):
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in dataset]


@pytest.fixture(scope="module")
def tok(builtin_tokenizer):
    return builtin_tokenizer


def template_tokenizer(tmp_path, template):
    path = tmp_path / "template.jinja"
    path.write_text(template)
    return load_tokenizer("builtin", DPOConfig(chat_template_path=str(path)))


# --------------------------------------------------------------------------- formats


def test_standard_explicit_matches_hand_encoding_and_trl(tmp_path, tok):
    rows = [{"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green, mostly."}]
    data = load(tmp_path, rows, tok)
    prompt_ids = encode(tok, "What color is the sky?", special_tokens=True)
    full_chosen = encode(tok, "What color is the sky? Blue." + EOS, special_tokens=True)
    full_rejected = encode(tok, "What color is the sky? Green, mostly." + EOS, special_tokens=True)
    assert full_chosen[: len(prompt_ids)] == prompt_ids  # no merge across this boundary
    expected = {"prompt_ids": prompt_ids, "chosen_ids": full_chosen[len(prompt_ids):],
                "rejected_ids": full_rejected[len(prompt_ids):]}
    assert ids(data.train) == [expected]
    assert ids(data.train) == trl_tokenize(tok, rows)
    assert data.train[0]["row_index"] == 0
    assert data.train_report.format == "standard, explicit prompt"
    assert data.train_report.boundary_fixes == 0


def test_eos_not_appended_twice(tmp_path, tok):
    data = load(tmp_path, [{"prompt": "Sky?", "chosen": " Blue." + EOS, "rejected": " Red."}], tok)
    assert data.train[0]["chosen_ids"] == encode(tok, " Blue." + EOS)
    assert data.train[0]["rejected_ids"] == encode(tok, " Red." + EOS)


def test_standard_implicit_prompt_follows_trl(tmp_path, tok):
    from trl import extract_prompt

    rows = [
        {"chosen": "Q: What color is the sky? A: blue", "rejected": "Q: What color is the sky? A: green"},
        {"chosen": "Say hi. Sure, hi!", "rejected": "Say hi. No."},
    ]
    data = load(tmp_path, rows, tok)
    assert data.train_report.format == "standard, implicit prompt"
    assert extract_prompt(rows[0])["prompt"] == "Q: What color is the sky? A:"
    for row, out in zip(rows, data.train):
        split = extract_prompt(row)
        prompt_ids = encode(tok, split["prompt"], special_tokens=True)
        assert out["prompt_ids"] == prompt_ids
        assert out["chosen_ids"] == encode(tok, split["prompt"] + split["chosen"] + EOS)[len(prompt_ids):]
    assert ids(data.train) == trl_tokenize(tok, rows)


def test_conversational_explicit_matches_literal_chatml_and_trl(tmp_path, tok):
    rows = [{"prompt": [user("What color is the sky?")], "chosen": [assistant("Blue.")],
             "rejected": [assistant("Green.")]}]
    data = load(tmp_path, rows, tok)
    prompt_text = SYSTEM + "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    assert ids(data.train) == [{
        "prompt_ids": encode(tok, prompt_text),
        "chosen_ids": encode(tok, "Blue.<|im_end|>\n"),
        "rejected_ids": encode(tok, "Green.<|im_end|>\n"),
    }]
    assert ids(data.train) == trl_tokenize(tok, rows)
    assert data.train_report.format == "conversational, explicit prompt"


def test_conversational_implicit_prompt_is_the_common_message_prefix(tmp_path, tok):
    turns = [{"role": "system", "content": "Be terse."}, user("Sky color?"), assistant("Blue?"), user("Sure?")]
    rows = [{"chosen": turns + [assistant("Yes.")], "rejected": turns + [assistant("No, green.")]}]
    data = load(tmp_path, rows, tok)
    explicit = trl_tokenize(tok, [{"prompt": turns, "chosen": [assistant("Yes.")],
                                   "rejected": [assistant("No, green.")]}])
    assert ids(data.train) == explicit == trl_tokenize(tok, rows)
    assert data.train_report.format == "conversational, implicit prompt"


def test_text_prompt_column_with_conversations_is_ignored_like_trl(tmp_path, tok):
    rows = [{"prompt": "Sky color?", "chosen": [user("Sky color?"), assistant("Blue.")],
             "rejected": [user("Sky color?"), assistant("Red.")]}]
    data = load(tmp_path, rows, tok)
    assert "implicit prompt, prompt column ignored" in data.train_report.format
    assert ids(data.train) == trl_tokenize(tok, [{k: rows[0][k] for k in ("chosen", "rejected")}])


def test_standard_and_conversational_rows_mix_in_one_file(tmp_path, tok):
    rows = [
        {"prompt": "Sky color?", "chosen": " Blue.", "rejected": " Red."},
        {"prompt": [user("Sky color?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red.")]},
        {"chosen": [user("Sea?"), assistant("Wet.")], "rejected": [user("Sea?"), assistant("Dry.")]},
        {"prompt": "6 * 14 =", "chosen": " 84.", "rejected": "true"},  # text that reads as JSON stays text
    ]
    data = load(tmp_path, rows, tok)
    assert ids(data.train) == [trl_tokenize(tok, [row])[0] for row in rows]
    assert tok.decode(data.train[3]["chosen_ids"]) == " 84." + EOS
    assert data.train_report.format == ("standard, explicit prompt (2 rows); conversational, explicit prompt "
                                        "(1 rows); conversational, implicit prompt (1 rows)")


def test_tools_and_chat_template_kwargs_reach_the_template(tmp_path):
    tokenizer = template_tokenizer(tmp_path, TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    question = {"role": "user", "content": "Weather in Paris?", "tool_calls": None}
    rows = [
        {"prompt": [question], "chosen": [call], "rejected": [assistant("No idea.")], "tools": tools},
        {"prompt": [question], "chosen": [call], "rejected": [assistant("No idea.")], "tools": json.dumps(tools)},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")],
         "chat_template_kwargs": {"note": "be brief"}},
    ]
    data = load(tmp_path, rows, tokenizer)
    tool_prompt = encode(tokenizer, "<|im_start|>system\nTools: get_weather<|im_end|>\n"
                                    "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    expected_tool_row = {"prompt_ids": tool_prompt,
                         "chosen_ids": encode(tokenizer, "<tool_call>get_weather</tool_call><|im_end|>\n"),
                         "rejected_ids": encode(tokenizer, "No idea.<|im_end|>\n")}
    note_prompt = encode(tokenizer, "<|im_start|>system\nNote: be brief<|im_end|>\n"
                                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids(data.train)[:2] == [expected_tool_row, expected_tool_row]
    assert data.train[2]["prompt_ids"] == note_prompt
    assert data.train_report.format == ("conversational, explicit prompt, tools (2 rows); "
                                        "conversational, explicit prompt, chat_template_kwargs (1 rows)")


# --------------------------------------------------------------------------- prompt/completion boundary


def test_bpe_merge_across_boundary_keeps_exact_prompt_ids(tmp_path, tok):
    prompt, chosen = "The answer is un", "believable"
    prompt_ids = encode(tok, prompt, special_tokens=True)
    assert encode(tok, prompt + chosen + EOS, special_tokens=True)[: len(prompt_ids)] != prompt_ids  # merges
    data = load(tmp_path, [{"prompt": prompt, "chosen": chosen, "rejected": " no"}], tok)
    row = data.train[0]
    assert row["prompt_ids"] == prompt_ids
    assert row["chosen_ids"] == encode(tok, chosen + EOS)
    assert row["rejected_ids"] == encode(tok, prompt + " no" + EOS, special_tokens=True)[len(prompt_ids):]
    assert data.train_report.boundary_fixes == 1


def test_bpe_merge_after_the_generation_prompt(tmp_path, tok):
    prompt_text = SYSTEM + "<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = encode(tok, prompt_text)
    assert encode(tok, prompt_text + "\n\nBlue.<|im_end|>\n")[: len(prompt_ids)] != prompt_ids  # "\n\n\n" merges
    rows = [{"prompt": [user("Sky?")], "chosen": [assistant("\n\nBlue.")], "rejected": [assistant("Red.")]}]
    data = load(tmp_path, rows, tok)
    assert ids(data.train) == [{"prompt_ids": prompt_ids, "chosen_ids": encode(tok, "\n\nBlue.<|im_end|>\n"),
                                "rejected_ids": encode(tok, "Red.<|im_end|>\n")}]
    assert data.train_report.boundary_fixes == 1


def test_generation_prompt_differing_from_assistant_turn(tmp_path):
    tokenizer = template_tokenizer(tmp_path, THINK_TEMPLATE)
    rows = [{"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red.")]},
            {"prompt": [user("Sea?")], "chosen": [assistant("Wet.")], "rejected": [assistant("Dry.")]}]
    data = load(tmp_path, rows, tokenizer)
    row = data.train[0]
    assert row["prompt_ids"] == encode(tokenizer, "<|im_start|>user\nSky?<|im_end|>\n"
                                                  "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert row["chosen_ids"] == encode(tokenizer, "Blue.<|im_end|>\n")
    assert row["rejected_ids"] == encode(tokenizer, "Red.<|im_end|>\n")
    assert data.train_report.boundary_fixes == 2


def test_template_that_rerenders_the_prompt_is_a_bad_row(tmp_path):
    tokenizer = template_tokenizer(tmp_path, COUNTING_TEMPLATE)
    rows = [{"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red.")]}]
    with pytest.raises(DataError, match=r"train row 0, column 'chosen': chat_template_error: .*differently"):
        load(tmp_path, rows, tokenizer)


# --------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def long_row(tok):
    """A row with a 10-token prompt, a 6-token chosen and a 3-token rejected completion (EOS included)."""
    prompt = "one two three four five six seven eight nine ten"
    chosen, rejected = " a b c d e", " x y"
    prompt_ids = encode(tok, prompt, special_tokens=True)
    chosen_ids = encode(tok, prompt + chosen + EOS, special_tokens=True)[len(prompt_ids):]
    rejected_ids = encode(tok, prompt + rejected + EOS, special_tokens=True)[len(prompt_ids):]
    assert (len(prompt_ids), len(chosen_ids), len(rejected_ids)) == (10, 6, 3)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, prompt_ids, chosen_ids, rejected_ids


def test_keep_start_cuts_completion_ends(tmp_path, tok, long_row):
    row, p, c, r = long_row
    data = load(tmp_path, [row], tok, max_length=12, truncation_mode="keep_start")
    assert ids(data.train) == [{"prompt_ids": p, "chosen_ids": c[:2], "rejected_ids": r[:2]}]
    assert data.train_report.truncated == {"prompt": 0, "chosen": 1, "rejected": 1}


def test_keep_end_cuts_the_prompt_start_for_the_longer_completion(tmp_path, tok, long_row):
    row, p, c, r = long_row
    data = load(tmp_path, [row], tok, max_length=12, truncation_mode="keep_end")
    assert ids(data.train) == [{"prompt_ids": p[-6:], "chosen_ids": c, "rejected_ids": r}]
    assert data.train_report.truncated == {"prompt": 1, "chosen": 0, "rejected": 0}


def test_prompt_and_completion_limits(tmp_path, tok, long_row):
    row, p, c, r = long_row
    data = load(tmp_path, [row], tok, max_length=9, max_prompt_length=4, max_completion_length=4)
    assert ids(data.train) == [{"prompt_ids": p[-4:], "chosen_ids": c[:4], "rejected_ids": r}]
    assert data.train_report.truncated == {"prompt": 1, "chosen": 1, "rejected": 0}
    data = load(tmp_path, [row], tok, max_length=None)
    assert ids(data.train) == [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}]


def test_rows_that_cannot_fit_are_dropped_and_counted(tmp_path, tok, long_row):
    row, p, c, r = long_row
    short = {"prompt": "Hi", "chosen": " yo", "rejected": " no"}
    data = load(tmp_path, [row, short], tok, max_length=10, truncation_mode="keep_start")
    assert data.train_report.dropped == {"prompt_exceeds_max_length": 1}
    assert [x["row_index"] for x in data.train] == [1]
    data = load(tmp_path, [row, short], tok, max_length=6, truncation_mode="keep_end")
    assert data.train_report.dropped == {"completion_exceeds_max_length": 1}
    assert data.train_report.rows_read == 2 and data.train_report.rows_kept == 1


# --------------------------------------------------------------------------- bad rows

STANDARD_BAD = [
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "wrong_type", "text or a list of messages, got int"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing_value", "is missing (null)"),
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing_value", "the row has keys ['prompt', 'rejected']"),
    ({"prompt": "p", "chosen": "c", "rejected": {"text": "r"}}, "rejected", "wrong_type", "got dict"),
    ({"prompt": "p", "chosen": "c", "rejected": [assistant("r")]}, "rejected", "wrong_type",
     "is list but chosen is str"),
    ({"prompt": "p", "chosen": " \n\t", "rejected": "r"}, "chosen", "empty_completion", "whitespace-only"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen", "identical_completions", "identical"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "wrong_type", "text or a list of messages, got int"),
]
CONVERSATION_BAD = [
    ({"prompt": [{"content": "hi"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "prompt", "bad_message", "message 0 has no 'role'"),
    ({"prompt": [user("hi")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]},
     "chosen", "bad_message", "message 0 has no 'content'"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [{"role": "bot", "content": "b"}]},
     "rejected", "unknown_role", "role 'bot'"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], "tools": "{not json"},
     "tools", "invalid_tools_json", "not valid JSON"),
    ({"prompt": [user("hi")], "chosen": [assistant("a"), 3], "rejected": [assistant("b")]},
     "chosen", "bad_message", "message 1 is int"),
    ({"prompt": [user("hi")], "chosen": ["a"], "rejected": [assistant("b")]},
     "chosen", "bad_message", "message 0 is str"),
    ({"prompt": [user("hi")], "chosen": [assistant("  ")], "rejected": [assistant("b")]},
     "chosen", "empty_completion", "no message with non-empty content"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("a")]},
     "chosen", "identical_completions", "identical"),
    ({"prompt": [user("hi")], "chosen": [assistant(7)], "rejected": [assistant("b")]},
     "chosen", "wrong_type", "message 0 content: expected text or a list of parts, got int"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], "tools": '{"name": "f"}'},
     "tools", "wrong_type", "expected a list of JSON schema objects, got dict"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")],
      "chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs", "wrong_type", "cannot set ['add_generation_prompt']"),
    ({"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], "chat_template_kwargs": "x"},
     "chat_template_kwargs", "wrong_type", "expected an object, got str"),
    ({"chosen": [user("hi"), assistant("a")], "rejected": [user("yo"), assistant("b")]},
     "prompt", "empty_prompt", "no prompt message"),
]


@pytest.mark.parametrize("cases,good", [
    (STANDARD_BAD, {"prompt": "p", "chosen": "c", "rejected": "r"}),
    (CONVERSATION_BAD[:7], {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}),
    (CONVERSATION_BAD[7:], {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}),
], ids=["standard", "conversational", "conversational_template_inputs"])  # at most 10 rows are listed
def test_each_bad_row_kind_is_named_in_one_error_or_skipped(tmp_path, tok, cases, good):
    rows = [good] + [row for row, *_ in cases]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows, tok)
    message = str(err.value)
    assert message.startswith(f"{len(cases)} bad row(s)")
    for index, (_, column, reason, detail) in enumerate(cases, start=1):
        line = next(x for x in message.splitlines() if f"train row {index}," in x)
        assert f"column {column!r}: {reason}: " in line and detail in line, line
    data = load(tmp_path, rows, tok, on_bad_row="skip")
    expected = {}
    for _, _, reason, _ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert data.train_report.dropped == expected
    assert [row["row_index"] for row in data.train] == [0]
    assert len(data.train_report.problems) == len(cases)


def test_json_lines_that_are_not_rows(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": \n\n["a list"]\n')
    with pytest.raises(DataError) as err:
        load_preference_data(config(path), tok)
    assert "train row 1, column '(row)': invalid_json: is not valid JSON" in str(err.value)
    assert "train row 2, column '(row)': wrong_type: expected a JSON object, got list" in str(err.value)


def test_error_lists_ten_rows_and_the_total(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x"} for _ in range(13)]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows, tok)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("13 bad row(s) in the dataset (first 10 below)")
    assert [line.strip().split(",")[0] for line in lines[1:]] == [f"train row {i}" for i in range(10)]


def test_missing_column_names_existing_and_expected(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "c", "response_j": "r"}]
    with pytest.raises(DataError, match=r"no column 'rejected': it has columns \['prompt', 'chosen', "
                                        r"'response_j'\]; expected \['chosen', 'rejected'\]"):
        load(tmp_path, rows, tok)


@pytest.mark.parametrize("name,content", [
    ("latin1.jsonl", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'),
    ("latin1.csv", b"prompt,chosen,rejected\ncaf\xe9,a,b\n"),
])
def test_non_utf8_file_is_named(tmp_path, tok, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path} is not UTF-8 text"):
        load_preference_data(config(path), tok)


def test_text_rows_cannot_carry_tools(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "tools": "[]"},
            {"prompt": "p", "chosen": "c", "rejected": "r", "tools": '[{"type": "function"}]'},
            {"prompt": "p", "chosen": "c", "rejected": "r", "chat_template_kwargs": {"note": "x"}}]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows, tok)
    assert str(err.value).splitlines()[1:] == [
        "  train row 1, column 'tools': wrong_type: needs conversational rows (lists of messages), not plain text",
        "  train row 2, column 'chat_template_kwargs': wrong_type: needs conversational rows (lists of messages), "
        "not plain text",
    ]


def test_conversation_needs_a_chat_template(tmp_path, tok):
    bare = load_tokenizer("builtin")
    bare.chat_template = None
    rows = [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    with pytest.raises(DataError, match="column 'prompt': chat_template_error: the tokenizer has no chat template"):
        load(tmp_path, rows, bare)


# --------------------------------------------------------------------------- sources and splits

ROWS = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" No {i}."} for i in range(10)]


def test_file_formats_give_the_same_ids(tmp_path, tok):
    reference = ids(load(tmp_path, ROWS, tok).train)
    frame = Dataset.from_list(ROWS).to_pandas()
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    for name in ("d.parquet", "d.csv", "d.json"):
        assert ids(load_preference_data(config(tmp_path / name), tok).train) == reference, name


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tok):
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    DatasetDict({"train": Dataset.from_list(ROWS[:6]), "test": Dataset.from_list(ROWS[6:])}).save_to_disk(
        tmp_path / "dict")
    single = load_preference_data(config(tmp_path / "single", dataset_test_split="test"), tok)
    assert single.train_report.rows_kept == 10 and single.eval is None
    assert single.notes == [f"{tmp_path / 'single'} is a single split, with no 'test' split to evaluate on "
                            "(set eval_fraction to hold out part of it)"]
    both = load_preference_data(config(tmp_path / "dict", dataset_test_split="test"), tok)
    assert (both.train_report.rows_kept, both.eval_report.rows_kept) == (6, 4)
    assert both.eval[0]["prompt_ids"] == encode(tok, "Question 6?", special_tokens=True)
    with pytest.raises(DataError, match=r"no split 'validation'; it has splits \['train', 'test'\]"):
        load_preference_data(config(tmp_path / "dict", dataset_test_split="validation"), tok)


def test_data_directory_goes_through_load_dataset_and_bad_rows_of_both_splits_are_listed(tmp_path, tok):
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:5] + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "p", "chosen": "", "rejected": "x"}] + ROWS[5:])
    with pytest.raises(DataError) as err:
        load_preference_data(config(folder, dataset_test_split="test"), tok)
    assert "train row 5, column 'chosen': identical_completions" in str(err.value)
    assert "eval row 0, column 'chosen': empty_completion" in str(err.value)
    data = load_preference_data(config(folder, dataset_test_split="test", on_bad_row="skip"), tok)
    assert (data.train_report.rows_kept, data.eval_report.rows_kept) == (5, 5)
    no_eval = load_preference_data(config(folder, dataset_test_split="test", eval_strategy="no", on_bad_row="skip"),
                                   tok)
    assert no_eval.eval is None


def test_eval_fraction_is_seeded_and_keeps_source_row_indices(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = load_preference_data(config(path, eval_fraction=0.3, seed=1), tok)
    again = load_preference_data(config(path, eval_fraction=0.3, seed=1), tok)
    other = load_preference_data(config(path, eval_fraction=0.3, seed=2), tok)
    eval_rows = [row["row_index"] for row in first.eval]
    assert len(eval_rows) == 3 and first.eval_report.rows_read == 3
    assert eval_rows == [row["row_index"] for row in again.eval]
    assert eval_rows != [row["row_index"] for row in other.eval]
    assert sorted(eval_rows + [row["row_index"] for row in first.train]) == list(range(10))
    for row in first.eval:
        assert row["prompt_ids"] == encode(tok, f"Question {row['row_index']}?", special_tokens=True)


def test_missing_file_and_unreachable_hub_name_are_data_errors(tmp_path, tok, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_preference_data(config(tmp_path / "nope.jsonl"), tok)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset 'someone/no-such-dataset'"):
        load_preference_data(config("someone/no-such-dataset"), tok)


def test_builtin_dataset_keeps_every_row(tok):
    pytest.importorskip("dpo_ds.builtin")
    data = load_preference_data(DPOConfig(dataset_name="builtin", eval_strategy="steps"), tok)
    assert data.train_report.rows_read > 0 and data.eval_report.rows_read > 0
    assert data.train_report.dropped == {} and data.eval_report.dropped == {}


# --------------------------------------------------------------------------- report and cache


def test_percentiles_are_nearest_rank():
    lengths = list(range(100, 0, -1))
    report = DataReport("train", "standard", 100, 100, {}, 0, {}, lengths, [7], [])
    assert report.percentiles() == {
        "prompt": {"p50": 50, "p90": 90, "p99": 99, "max": 100},
        "chosen": {"p50": 7, "p90": 7, "p99": 7, "max": 7},
        "rejected": {"p50": 0, "p90": 0, "p99": 0, "max": 0},
    }


def test_report_lengths_are_those_of_kept_rows(tmp_path, tok, long_row):
    row, p, c, r = long_row
    data = load(tmp_path, [row, {"prompt": "p", "chosen": "x", "rejected": "x"}], tok, on_bad_row="skip")
    report = data.train_report
    assert (report.prompt_lengths, report.chosen_lengths, report.rejected_lengths) == ([10], [6], [3])
    summary = report.summary()
    assert summary["rows_read"] == 2 and summary["rows_kept"] == 1
    assert summary["lengths"]["chosen"] == {"p50": 6, "p90": 6, "p99": 6, "max": 6}
    json.dumps(summary)


def _cache_files(dataset):
    folder = os.path.dirname(dataset.cache_files[0]["filename"])
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns
            for name in os.listdir(folder) if name.startswith("cache-")}


def test_second_run_loads_tokenized_rows_from_the_cache(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = load_preference_data(config(path), tok)
    files = _cache_files(first.train)
    assert files, "tokenized rows were not written to a cache file"
    again = load_preference_data(config(path), load_tokenizer("builtin"))
    assert _cache_files(again.train) == files  # nothing re-written, nothing new
    assert ids(again.train) == ids(first.train)
    load_preference_data(config(path, max_length=8), tok)
    assert len(_cache_files(first.train)) > len(files)  # another setting is another fingerprint


def test_an_edited_file_is_read_again(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    assert load_preference_data(config(path), tok).train_report.rows_read == 3
    write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="train row 2, column 'chosen': identical_completions"):
        load_preference_data(config(path), tok)


def test_worker_processes_give_the_same_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    single = load_preference_data(config(path), tok)
    parallel = load_preference_data(config(path, dataset_num_proc=2), tok)
    assert ids(parallel.train) == ids(single.train)
    assert [row["row_index"] for row in parallel.train] == list(range(10))


def test_prepare_dataset_on_an_in_memory_dataset(tok):
    dataset, report = prepare_dataset(Dataset.from_list(ROWS[:2]), tok, DPOConfig())
    assert report.rows_kept == 2
    assert dataset.column_names == ["row_index", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_loss_mask",
                                    "chosen_loss_mask", "rejected_loss_mask"]


# --------------------------------------------------------------------------- TRL's dataset mixtures


def test_datasets_mixture_follows_trls_fractions_and_columns(tmp_path, tok):
    """`datasets:` as TRL's DatasetMixtureConfig: shares normalized, no entry oversampled, columns selected."""
    from dpo_ds.data import load_raw_splits

    first = write_jsonl(tmp_path / "a.jsonl", [{**ROWS[i % len(ROWS)], "source": "a"} for i in range(10)])
    second = write_jsonl(tmp_path / "b.jsonl", [{**ROWS[i % len(ROWS)], "source": "b"} for i in range(4)])
    entries = [{"path": "json", "data_files": first, "fraction": 3}, {"path": "json", "data_files": second,
                                                                       "fraction": 1}]
    train, eval_split, _ = load_raw_splits(config("unused", datasets=entries, eval_strategy="no"))
    # Shares 3/4 and 1/4; the largest size oversampling neither is min(10 / 0.75, 4 / 0.25) = 13.33, so
    # round(10.0) = 10 rows of a, then round(3.33) = 3 rows of b, in order.
    assert train["source"] == ["a"] * 10 + ["b"] * 3 and eval_split is None
    entries = [{"path": "json", "data_files": first, "columns": ["prompt", "chosen", "rejected"]},
               {"path": "json", "data_files": second, "split": "train", "columns": ["prompt", "chosen", "rejected"]}]
    data = load_preference_data(config("unused", datasets=entries, eval_fraction=0.25), tok)
    assert (len(data.train), len(data.eval)) == (10, 4)  # all 14 rows, a quarter (rounded up) held out


def test_datasets_mixture_errors_name_the_entry(tmp_path, tok):
    from dpo_ds.data import DataError, load_raw_splits

    path = write_jsonl(tmp_path / "a.jsonl", ROWS[:3])
    with pytest.raises(ConfigError, match=r"datasets\[1\] = .*no 'path'"):
        config("unused", datasets=[{"path": "json", "data_files": path}, {"data_files": path}])
    with pytest.raises(ConfigError, match=r"datasets\[0\] = .*unknown key 'fractoin'"):
        config("unused", datasets=[{"path": "json", "fractoin": 0.5}])
    with pytest.raises(ConfigError, match="fraction must be set for every entry"):
        config("unused", datasets=[{"path": "json", "fraction": 0.5}, {"path": "json"}])
    with pytest.raises(DataError, match=r"datasets\[0\] \(json\): no column 'answer'"):
        load_raw_splits(config("unused", datasets=[{"path": "json", "data_files": path, "columns": ["answer"]}]))
