"""Padding-free packing and prefix sharing: the same numbers as the padded batch, and as each sequence run alone."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dpo_ds.collate import PreferenceCollator
from dpo_ds.config import DPOConfig
from dpo_ds.engines import PreferenceModel
from dpo_ds.losses import LossConfig, compute_loss
from dpo_ds.packing import attention_mask_4d, model_inputs
from dpo_ds.reference import pair_logps

VOCAB = 97
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128)


def tiny(kind: str, attn: str) -> PreferenceModel:
    torch.manual_seed(0)
    config = (LlamaConfig if kind == "llama" else Qwen2Config)(**SIZES)
    return PreferenceModel(AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval())


def random_rows(n: int, seed: int, prompt=(2, 14), completion=(1, 9)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(1, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*completion), "rejected_ids": ids(*completion)}
            for _ in range(n)]


def alone_logps(model: PreferenceModel, rows: list[dict]) -> list[torch.Tensor]:
    """Independent reference: each sequence alone, no padding, HF logits -> float64 log-softmax."""
    out = []
    for part in ("chosen_ids", "rejected_ids"):
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row[part]])
            with torch.no_grad():
                logits = model.model(input_ids=ids).logits[0, :-1].double()
            token = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(token[len(row["prompt_ids"]) - 1:])
    return out


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_layouts_give_the_padded_logps_and_loss(kind, attn, side):
    model = tiny(kind, attn)
    rows = random_rows(5, seed=1)
    batch = PreferenceCollator(0, padding_side=side)(rows)
    mask = batch["completion_mask"][:, 1:].float()
    padded = model(**model_inputs(batch, "padded"), with_log_sum_sq_probs=True)
    expected = alone_logps(model, rows)
    for i, want in enumerate(expected):
        torch.testing.assert_close(padded.logps[i][mask[i] > 0].double(), want, atol=1e-5, rtol=0)
    args = LossConfig.from_config(DPOConfig())
    ref = pair_logps(padded.logps.detach() * 0.9, mask)
    padded_loss = compute_loss(args, pair_logps(padded.logps, mask), ref)
    for layout in ("padding_free", "prefix_sharing"):
        out = model(**model_inputs(batch, layout, max_length=30), with_log_sum_sq_probs=True)
        for name in ("logps", "entropy", "mean_logits", "log_sum_sq_probs"):
            torch.testing.assert_close(getattr(out, name), getattr(padded, name), atol=1e-5, rtol=0, msg=name)
        assert torch.equal(out.top1, padded.top1)
        loss = compute_loss(args, pair_logps(out.logps, mask), ref)
        torch.testing.assert_close(loss.per_pair, padded_loss.per_pair, atol=1e-5, rtol=0)
        seq, padded_seq = pair_logps(out.logps, mask), pair_logps(padded.logps, mask)
        torch.testing.assert_close(seq.chosen, padded_seq.chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(seq.rejected, padded_seq.rejected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_packed_gradients_equal_padded_gradients(layout):
    model = tiny("llama", "sdpa")
    batch = PreferenceCollator(0)(random_rows(4, seed=2))
    mask = batch["completion_mask"][:, 1:].float()
    grads = {}
    for name in ("padded", layout):
        model.zero_grad()
        out = model(**model_inputs(batch, name, max_length=32), with_stats=False)
        pair = pair_logps(out.logps, mask)
        (pair.chosen - 0.5 * pair.rejected).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["padded"].items():
        torch.testing.assert_close(grads[layout][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_varlen_layout_is_one_unmasked_row_that_hf_splits_by_position():
    """The flash-attention layout: one row, no mask, positions restarting per sequence. On CPU sdpa,
    transformers finds the same boundaries from position_ids, so the numbers can be checked here too."""
    model = tiny("llama", "sdpa")
    rows = random_rows(3, seed=3)
    batch = PreferenceCollator(0)(rows)
    inputs = model_inputs(batch, "padding_free", max_length=8, attn_implementation="flash_attention_2")
    lengths = [len(r["prompt_ids"]) + len(r[p]) for p in ("chosen_ids", "rejected_ids") for r in rows]
    assert inputs["attention_mask"] is None
    assert inputs["input_ids"].shape == (1, sum(lengths))
    assert inputs["position_ids"][0].tolist() == [t for n in lengths for t in range(n)]
    torch.testing.assert_close(model(**inputs).logps, model(**model_inputs(batch, "padded")).logps, atol=1e-5, rtol=0)


def test_padding_free_rows_hold_at_most_max_length_tokens_and_every_real_token_once():
    batch = PreferenceCollator(0)(random_rows(6, seed=4, prompt=(2, 10), completion=(1, 8)))
    inputs = model_inputs(batch, "padding_free", max_length=20)
    real = int(batch["attention_mask"].sum())
    assert inputs["input_ids"].shape[1] <= 20
    # Each real token sits at exactly one packed position, and that position holds it.
    at = inputs["token_index"][batch["attention_mask"] > 0]
    assert at.unique().numel() == real
    assert torch.equal(inputs["input_ids"].flatten()[at], batch["input_ids"][batch["attention_mask"] > 0])
    # Balanced rows: each row's unused tail is shorter than the longest sequence.
    rows, longest = inputs["input_ids"].shape[0], int(batch["attention_mask"].sum(1).max())
    assert inputs["input_ids"].numel() - real < rows * longest
    assert inputs["input_ids"].numel() < batch["input_ids"].numel()


def test_prefix_sharing_layout_by_hand():
    rows = [{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]}]
    inputs = model_inputs(PreferenceCollator(0)(rows), "prefix_sharing")
    assert inputs["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31]]
    # Both completions continue from the prompt's last position (2).
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    assert inputs["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # chosen: prompt + itself
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # rejected: prompt + itself, never the chosen tokens
    ]
    # Row 0 (chosen) and row 1 (rejected) read the shared prompt from the same places.
    assert inputs["token_index"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, 0]]


def test_attention_mask_keeps_segments_apart():
    segment = torch.tensor([[0, 0, 1, 1, 1, 2]])
    kind = torch.zeros_like(segment)
    assert attention_mask_4d(segment, kind)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_prefix_sharing_saves_the_repeated_prompt():
    """Long prompts, short completions: the model runs on each prompt once instead of twice."""
    rows = random_rows(8, seed=5, prompt=(40, 60), completion=(3, 8))
    batch = PreferenceCollator(0)(rows)
    prompts = sum(len(r["prompt_ids"]) for r in rows)
    completions = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert int(batch["attention_mask"].sum()) == 2 * prompts + completions

    def positions_used(layout):
        inputs = model_inputs(batch, layout, max_length=200)
        return inputs["token_index"][batch["attention_mask"] > 0].unique().numel()

    assert positions_used("padding_free") == 2 * prompts + completions
    assert positions_used("prefix_sharing") == prompts + completions


def test_prefix_sharing_refuses_pairs_with_different_prompts():
    batch = PreferenceCollator(0)(random_rows(2, seed=6))
    batch["input_ids"][3, 0] += 1  # pair 1's rejected row now has another prompt
    with pytest.raises(ValueError, match="pair 1 has different prompts"):
        model_inputs(batch, "prefix_sharing")


def test_prefix_sharing_needs_a_mask_taking_kernel():
    with pytest.raises(ValueError, match="prefix_sharing needs a 4D attention mask"):
        model_inputs(PreferenceCollator(0)(random_rows(1, seed=7)), "prefix_sharing",
                     attn_implementation="flash_attention_2")
