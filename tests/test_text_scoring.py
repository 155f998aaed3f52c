"""What the model learns from, on text: packing (alias padding_free), completion_only_loss, assistant_only_loss."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dpo_ds.collate import PreferenceCollator
from dpo_ds.config import ConfigError, DPOConfig
from dpo_ds.data import GENERATION_TEMPLATE, DataError, load_preference_data
from dpo_ds.models import load_tokenizer
from dpo_ds.engines import PreferenceModel
from dpo_ds.losses import LOSS_TYPES, LossConfig, compute_loss
from dpo_ds.packing import layout_name, model_inputs
from dpo_ds.reference import pair_logps
from test_packing import random_rows, tiny


@pytest.mark.parametrize("kw,packed", [({}, False), ({"packing": True}, True), ({"padding_free": True}, True),
                                       ({"packing": True, "padding_free": True}, True),
                                       ({"packing": False, "padding_free": False}, False)])
def test_packing_and_its_alias_padding_free_resolve_to_one_value(kw, packed):
    cfg = DPOConfig(**kw)
    assert cfg.packing is packed and cfg.padding_free is packed
    assert layout_name(cfg) == ("padding_free" if packed else "padded")


@pytest.mark.parametrize("packing,padding_free", [(True, False), (False, True)])
def test_contradicting_packing_and_padding_free_is_an_error(packing, padding_free):
    with pytest.raises(ConfigError, match=f"packing={packing} contradicts padding_free={padding_free}"):
        DPOConfig(packing=packing, padding_free=padding_free)


def test_saved_packing_config_reads_back_equal(tmp_path):
    cfg = DPOConfig(packing=True, prefix_sharing=True)
    cfg.save(str(tmp_path / "c.yaml"))
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["packing"] is True and saved["padding_free"] is True
    back = DPOConfig.load(str(tmp_path / "c.yaml"))
    assert back == cfg and layout_name(back) == "prefix_sharing"


# --------------------------------------------------------------------------- scored-token masks, by hand
#
# The expected masks are built from the rendered text cut into pieces at ChatML's special tokens, each
# piece tokenized on its own and given its 0/1 by hand; the tests first check that the pieces' ids are the
# row's ids, so the masks line up token by token.

GENERATION = str(GENERATION_TEMPLATE)
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
TOOLS_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>\n\nFor each "
    "function call, return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
)


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tok(builtin_tokenizer):
    return builtin_tokenizer


@pytest.fixture(scope="module")
def gen_tok():
    return load_tokenizer("builtin", DPOConfig(chat_template_path=GENERATION))


def pieces(tokenizer, parts):
    """(ids, mask) of text pieces given as (text, scored) pairs, each tokenized on its own."""
    ids, mask = [], []
    for text, scored in parts:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(scored)] * len(piece)
    return ids, mask


def chatml(role, text, scored_header, scored_body):
    """One ChatML turn cut at its special tokens: header pieces, then body + <|im_end|> + newline."""
    return [("<|im_start|>", scored_header), (f"{role}\n", scored_header), (text, scored_body),
            ("<|im_end|>", scored_body), ("\n", scored_body)]


def one_row(tmp_path, tokenizer, row, **kw):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_preference_data(DPOConfig(dataset_name=str(path), dataset_test_split=None, **kw), tokenizer)
    return data.train[0], data.train_report


def check(row, prompt, chosen, rejected):
    """The row's ids and loss masks equal the hand-built pieces'."""
    for part, (ids, mask) in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        assert row[f"{part}_ids"] == ids, part
        assert row[f"{part}_loss_mask"] == mask, part


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_standard_rows_score_the_prompt_only_without_completion_only_loss(tmp_path, tok, completion_only_loss):
    row, report = one_row(tmp_path, tok, {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                          completion_only_loss=completion_only_loss)
    prompt = pieces(tok, [("The sky is", not completion_only_loss)])
    check(row, prompt, pieces(tok, [(" blue.", True), ("<|im_end|>", True)]),
          pieces(tok, [(" green.", True), ("<|im_end|>", True)]))
    # data-check's count: the scored label positions (the sequence's first token has none).
    first = 0 if completion_only_loss else 1
    assert report.chosen_scored_lengths == [sum(prompt[1]) + len(row["chosen_ids"]) - first]


MULTI_TURN = {"prompt": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "2+2?")],
              "chosen": [msg("assistant", "4"), msg("user", "Sure?"), msg("assistant", "Yes, 4.")],
              "rejected": [msg("assistant", "5")]}


@pytest.mark.parametrize("completion_only_loss,assistant_only_loss",
                         [(True, False), (False, False), (True, True), (False, True)])
def test_multi_turn_masks(tmp_path, gen_tok, completion_only_loss, assistant_only_loss):
    """A user turn inside a completion is never scored; assistant_only_loss also drops the role headers and,
    without completion_only_loss, scores the prompt's assistant turns (TRL's combination)."""
    row, report = one_row(tmp_path, gen_tok, MULTI_TURN, completion_only_loss=completion_only_loss,
                          assistant_only_loss=assistant_only_loss)
    p = not completion_only_loss  # prompt text scored at all
    a = not assistant_only_loss  # role headers and non-assistant text scored (when in a scored part)
    prompt = pieces(gen_tok, [(SYSTEM.replace("<|im_end|>\n", ""), p and a), ("<|im_end|>", p and a),
                              ("\n", p and a), *chatml("user", "Hi", p and a, p and a),
                              *chatml("assistant", "Hello!", p and a, p),
                              *chatml("user", "2+2?", p and a, p and a),
                              ("<|im_start|>", p and a), ("assistant\n", p and a)])
    chosen = pieces(gen_tok, [("4", True), ("<|im_end|>", True), ("\n", True),
                              *chatml("user", "Sure?", False, False),
                              ("<|im_start|>", a), ("assistant\n", a),
                              ("Yes, 4.", True), ("<|im_end|>", True), ("\n", True)])
    rejected = pieces(gen_tok, [("5", True), ("<|im_end|>", True), ("\n", True)])
    check(row, prompt, chosen, rejected)
    assert report.rejected_scored_lengths == [sum(prompt[1][1:]) + sum(rejected[1])]


def test_truncation_cuts_the_masks_with_the_ids(tmp_path, gen_tok):
    """max_prompt_length keeps the prompt's end, max_completion_length the completion's start: masks too."""
    full, _ = one_row(tmp_path, gen_tok, MULTI_TURN, completion_only_loss=False, assistant_only_loss=True)
    # Keep the prompt from the second token of its scored assistant turn: the cut lands inside the pattern.
    keep = len(full["prompt_ids"]) - full["prompt_loss_mask"].index(1) - 1
    cut, report = one_row(tmp_path, gen_tok, MULTI_TURN, completion_only_loss=False, assistant_only_loss=True,
                          max_prompt_length=keep, max_completion_length=5, max_length=None)
    assert report.truncated == {"prompt": 1, "chosen": 1, "rejected": 0}
    assert cut["prompt_ids"] == full["prompt_ids"][-keep:]
    assert cut["prompt_loss_mask"] == full["prompt_loss_mask"][-keep:]
    assert cut["prompt_loss_mask"][0] == 1 and 0 in cut["prompt_loss_mask"]
    assert cut["chosen_ids"] == full["chosen_ids"][:5] and cut["chosen_loss_mask"] == full["chosen_loss_mask"][:5]
    assert cut["rejected_loss_mask"] == full["rejected_loss_mask"]


TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_ROW = {"prompt": [msg("user", "Weather in Paris?")],
            "chosen": [{"role": "assistant", "tool_calls": [TOOL_CALL]}, msg("tool", "22 C, sunny"),
                       msg("assistant", "It is 22 C and sunny in Paris.")],
            "rejected": [msg("assistant", "I cannot know that.")],
            "tools": TOOLS}


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_tool_row_scores_the_call_and_the_answer_never_the_tool_output(tmp_path, gen_tok, assistant_only_loss):
    row, _ = one_row(tmp_path, gen_tok, TOOL_ROW, assistant_only_loss=assistant_only_loss)
    a = not assistant_only_loss
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    prompt = pieces(gen_tok, [(TOOLS_SYSTEM.replace("<|im_end|>\n", ""), False), ("<|im_end|>", False),
                              ("\n", False), *chatml("user", "Weather in Paris?", False, False),
                              ("<|im_start|>", False), ("assistant\n", False)])
    chosen = pieces(gen_tok, [(call, True), ("<|im_end|>", True), ("\n", True),
                              *chatml("tool", "22 C, sunny", False, False),
                              ("<|im_start|>", a), ("assistant\n", a),
                              ("It is 22 C and sunny in Paris.", True), ("<|im_end|>", True), ("\n", True)])
    rejected = pieces(gen_tok, [("I cannot know that.", True), ("<|im_end|>", True), ("\n", True)])
    check(row, prompt, chosen, rejected)


def test_assistant_only_loss_refuses_a_template_without_generation_tags(tmp_path, tok):
    with pytest.raises(DataError, match=r"no generation tags.*chat_template_path.*chatml_generation\.jinja"):
        one_row(tmp_path, tok, MULTI_TURN, assistant_only_loss=True)


def test_assistant_only_loss_on_a_text_row_is_a_bad_row(tmp_path, gen_tok):
    with pytest.raises(DataError, match="row 0, column 'chosen'.*assistant_only_loss needs conversational rows"):
        one_row(tmp_path, gen_tok, {"prompt": "a", "chosen": "b", "rejected": "c"}, assistant_only_loss=True)


def test_the_generation_template_renders_plain_chats_as_the_builtin_template(tok, gen_tok):
    """Without tools, the shipped template is SmolLM2's own ChatML, so the built-in model sees its own format."""
    for conversation in (MULTI_TURN["prompt"], [msg("system", "Be brief."), *MULTI_TURN["prompt"]]):
        for generation_prompt in (True, False):
            assert gen_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt) \
                == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)


# --------------------------------------------------------------------------- the masks through the model

LOSS_CASES = [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", ld_alpha=0.5), dict(loss_type="ipo"),
              dict(loss_type="sigmoid_norm"), dict(loss_type="simpo"), dict(loss_type="sigmoid", rpo_alpha=0.5)]


def masked_rows(n, seed):
    """random_rows with loss masks as completion_only_loss=false / assistant_only_loss leave them: some prompt
    tokens scored, holes inside the completions (at least one completion token scored)."""
    g = torch.Generator().manual_seed(seed)
    rows = random_rows(n, seed)

    def bits(length):
        return torch.randint(0, 2, (length,), generator=g).tolist()

    for row in rows:
        row["prompt_loss_mask"] = bits(len(row["prompt_ids"]))
        for part in ("chosen", "rejected"):
            row[f"{part}_loss_mask"] = [1] + bits(len(row[f"{part}_ids"]) - 1)
    return rows


def alone_sums(model, rows):
    """Independent reference: each sequence alone, HF logits -> float64 log-softmax, summed over its mask."""
    sums = []
    for part in ("chosen", "rejected"):
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row[f"{part}_ids"]])
            mask = torch.tensor(row["prompt_loss_mask"] + row[f"{part}_loss_mask"], dtype=torch.float64)
            with torch.no_grad():
                logits = model.model(input_ids=ids).logits[0, :-1].double()
            token = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
            sums.append((token * mask[1:]).sum())
    return torch.stack(sums)


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_and_padded_batches_give_the_same_losses_with_loss_masks(side):
    model = tiny("llama", "sdpa")
    rows = masked_rows(5, seed=3)
    batch = PreferenceCollator(0, padding_side=side)(rows)
    mask = batch["completion_mask"][:, 1:].float()
    padded = model(**model_inputs(batch, "padded"), with_stats=False).logps
    pol = pair_logps(padded, mask)
    torch.testing.assert_close(torch.cat([pol.chosen, pol.rejected]).double(), alone_sums(model, rows),
                               atol=1e-5, rtol=0)
    lengths = torch.tensor([sum((r["prompt_loss_mask"] + r[f"{p}_loss_mask"])[1:]) for p in ("chosen", "rejected")
                            for r in rows], dtype=torch.float32)
    assert torch.equal(torch.cat([pol.chosen_lengths, pol.rejected_lengths]), lengths)
    for layout in ("padding_free", "prefix_sharing"):
        packed = model(**model_inputs(batch, layout, max_length=30), with_stats=False).logps
        for case in LOSS_CASES:
            args = DPOConfig(**case)
            ref = pair_logps(padded.detach() * 0.9, mask, args.ld_alpha)
            want = compute_loss(LossConfig.from_config(args), pair_logps(padded, mask, args.ld_alpha), ref).per_pair
            got = compute_loss(LossConfig.from_config(args), pair_logps(packed, mask, args.ld_alpha), ref).per_pair
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"{layout} {case}")


@pytest.fixture(scope="module")
def assistant_only_batch(tmp_path_factory, gen_tok):
    """The multi-turn and the tool row, tokenized with assistant_only_loss, as one collated batch."""
    path = tmp_path_factory.mktemp("aol") / "rows.jsonl"
    path.write_text(json.dumps(MULTI_TURN) + "\n" + json.dumps(TOOL_ROW) + "\n")
    data = load_preference_data(DPOConfig(dataset_name=str(path), dataset_test_split=None, assistant_only_loss=True),
                                gen_tok)
    return PreferenceCollator(gen_tok.pad_token_id)(list(data.train)), data.train_report


@pytest.fixture(scope="module")
def assistant_only_logps(assistant_only_batch, tiny_model_dir):
    """The tiny model's per-token log-probs of that batch (one forward for all loss types)."""
    from transformers import AutoModelForCausalLM

    model = PreferenceModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        return model(**model_inputs(assistant_only_batch[0], "padded"), with_stats=False).logps


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_on_assistant_tokens_only(loss_type, assistant_only_batch, assistant_only_logps):
    """Each loss runs on assistant-only masks: finite, its lengths the scored counts data-check reports, its
    gradient on scored tokens only (some of them); at policy == reference the sigmoid loss is log 2."""
    batch, report = assistant_only_batch
    args = DPOConfig(loss_type=loss_type, assistant_only_loss=True,
                     label_smoothing=0.1 if loss_type == "exo_pair" else 0.0)
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = assistant_only_logps.clone().requires_grad_(True)
    pol = pair_logps(token_logps, mask)
    assert pol.chosen_lengths.tolist() == report.chosen_scored_lengths
    assert pol.rejected_lengths.tolist() == report.rejected_scored_lengths
    loss = compute_loss(LossConfig.from_config(args), pol, pair_logps(assistant_only_logps, mask)).per_pair.mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert token_logps.grad[mask == 0].abs().max() == 0 and token_logps.grad[mask > 0].abs().max() > 0
    if loss_type == "sigmoid":
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_tool_calling_example_trains_as_the_readme_runs_it(tmp_path, tiny_model_dir):
    """examples/tool_calling.yaml through the real entry script (one process), on a tiny model: it trains
    (step 1's loss is log 2, policy == reference) and exports the model."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "launch" / "train.py"), "--config", "examples/tool_calling.yaml",
           "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
           "--disable_tqdm", "true"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert any((tmp_path / "out" / where / "config.json").exists() for where in ("final", "."))


def test_tool_calling_example_data_scores_calls_and_answers_not_tool_output(gen_tok):
    root = Path(__file__).resolve().parent.parent
    args = DPOConfig.load(str(root / "examples" / "tool_calling.yaml"))
    args.dataset_name = str(root / args.dataset_name)
    data = load_preference_data(args, gen_tok)
    raw = [json.loads(line) for line in (root / args.dataset_name).read_text().splitlines()]
    assert data.train_report.rows_kept == len(raw) == 12
    for row in data.train:
        source = raw[row["row_index"]]
        for part in ("chosen", "rejected"):
            scored = gen_tok.decode([t for t, m in zip(row[f"{part}_ids"], row[f"{part}_loss_mask"]) if m])
            unscored = gen_tok.decode([t for t, m in zip(row[f"{part}_ids"], row[f"{part}_loss_mask"]) if not m])
            for message in source[part]:
                if message["role"] == "tool":
                    assert f"tool\n{message['content']}<|im_end|>" in unscored
                elif message.get("tool_calls"):
                    assert json.dumps(message["tool_calls"][0]["function"]["arguments"]) in scored
                else:
                    assert message["content"] in scored


def test_data_check_reports_scored_tokens_per_row(tmp_path, tok, capsys):
    from dpo_ds.cli import main

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "one two three four", "chosen": " yes", "rejected": " no way"}) + "\n")
    prompt = len(tok("one two three four")["input_ids"])
    chosen, rejected = (len(tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"])
                        for text in (" yes", " no way"))
    for flag, first_scored in (("true", prompt), ("false", 1)):
        assert main(["data-check", "--dataset", str(path), "--model", "builtin", "--json", "--dataset_test_split",
                     "none", "--completion_only_loss", flag, "--show", "1"]) == 0
        report = json.loads(capsys.readouterr().out)
        want = {"chosen": prompt + chosen - first_scored, "rejected": prompt + rejected - first_scored}
        assert {part: report["scored_tokens"][part]["max"] for part in want} == want
        assert report["examples"][0]["scored_tokens"] == want
    assert main(["data-check", "--dataset", str(path), "--model", "builtin", "--dataset_test_split", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("scored"))
    assert lines[at + 1].split() == ["chosen"] + [str(chosen)] * 4
    assert lines[at + 2].split() == ["rejected"] + [str(rejected)] * 4


# Its generation prompt opens an empty think block that the rendered assistant turn lacks (Qwen3-style), so the
# completion's text starts where prompt and full render diverge and its ids are encoded on their own.
THINK_GENERATION_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message.content + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{% endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)


@pytest.mark.parametrize("completion_only_loss,assistant_only_loss", [(True, False), (False, True)])
def test_masks_when_the_generation_prompt_differs_from_the_assistant_turn(tmp_path, completion_only_loss,
                                                                          assistant_only_loss):
    (tmp_path / "t.jinja").write_text(THINK_GENERATION_TEMPLATE)
    think_tok = load_tokenizer("builtin", DPOConfig(chat_template_path=str(tmp_path / "t.jinja")))
    row, _ = one_row(tmp_path, think_tok, MULTI_TURN, completion_only_loss=completion_only_loss,
                     assistant_only_loss=assistant_only_loss)
    p, a = not completion_only_loss, not assistant_only_loss
    prompt = pieces(think_tok, [*chatml("user", "Hi", p and a, p and a), *chatml("assistant", "Hello!", p and a, p),
                                *chatml("user", "2+2?", p and a, p and a), ("<|im_start|>", p and a),
                                ("assistant\n<think>\n\n</think>\n\n", p and a)])
    chosen = pieces(think_tok, [("4", True), ("<|im_end|>", True), ("\n", True),
                                *chatml("user", "Sure?", False, False), ("<|im_start|>", a), ("assistant\n", a),
                                ("Yes, 4.", True), ("<|im_end|>", True), ("\n", True)])
    check(row, prompt, chosen, pieces(think_tok, [("5", True), ("<|im_end|>", True), ("\n", True)]))
