"""PreferenceCollator: [2B, T] batches checked against hand-written tensors and TRL 1.16's collator."""
import random

import pytest
import torch

from dpo_ds.collate import PreferenceCollator

ROWS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]


def test_right_padding_chosen_rows_then_rejected_rows():
    batch = PreferenceCollator(pad_token_id=0)(ROWS)
    assert torch.equal(batch["input_ids"], torch.tensor([
        [1, 2, 3, 4, 5],
        [7, 8, 9, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 0],
    ]))
    assert torch.equal(batch["attention_mask"], torch.tensor([
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]))
    assert torch.equal(batch["completion_mask"], torch.tensor([
        [0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 1, 0],
    ]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
    ]))
    assert all(t.dtype == torch.long for t in batch.values())
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "prompt_mask"}


def test_loss_masks_of_the_rows_become_the_completion_mask():
    """Rows from dpo_ds.data carry per-token loss masks (here: prompt tokens scored, holes in completions); a
    sequence's first token is never scored, even when its mask says so: nothing predicts it (left padding
    would put a pad token before it)."""
    rows = [{**ROWS[0], "prompt_loss_mask": [0, 1, 1], "chosen_loss_mask": [0, 1], "rejected_loss_mask": [1]},
            {**ROWS[1], "prompt_loss_mask": [1, 0], "chosen_loss_mask": [1], "rejected_loss_mask": [1, 0]}]
    batch = PreferenceCollator(pad_token_id=0, padding_side="left")(rows)
    assert torch.equal(batch["completion_mask"], torch.tensor([
        [0, 1, 1, 0, 1],
        [0, 0, 0, 0, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 0],
    ]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([
        [1, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 0, 0],
    ]))


def test_left_padding_and_pad_to_multiple_of():
    batch = PreferenceCollator(pad_token_id=-1, padding_side="left", pad_to_multiple_of=4)(ROWS)
    assert torch.equal(batch["input_ids"], torch.tensor([
        [-1, -1, -1, 1, 2, 3, 4, 5],
        [-1, -1, -1, -1, -1, 7, 8, 9],
        [-1, -1, -1, -1, 1, 2, 3, 6],
        [-1, -1, -1, -1, 7, 8, 10, 11],
    ]))
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != -1).long())
    assert torch.equal(batch["completion_mask"], torch.tensor([
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]))


def test_matches_trl_collator_on_random_rows():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rng = random.Random(0)

    def ids(low):
        return [rng.randrange(1, 1000) for _ in range(rng.randrange(low, 12))]

    rows = [{"prompt_ids": ids(0), "chosen_ids": ids(1), "rejected_ids": ids(1)} for _ in range(7)]
    ours = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    reference = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert ours["input_ids"].shape[1] % 8 == 0
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], reference[key].long()), key


def test_row_index_travels_with_the_batch():
    rows = [dict(row, row_index=i) for i, row in zip((41, 7), ROWS)]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert torch.equal(batch["row_index"], torch.tensor([41, 7]))
    assert batch["row_index"].dtype == torch.long


@pytest.mark.parametrize("kwargs,message", [
    ({"padding_side": "middle"}, "padding_side must be 'right' or 'left'"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be >= 1"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceCollator(pad_token_id=0, **kwargs)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty list of rows"):
        PreferenceCollator(pad_token_id=0)([])
