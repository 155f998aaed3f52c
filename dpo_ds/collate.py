"""Batches of preference pairs: B rows -> one padded [2B, T] batch (chosen rows, then rejected rows).

Truncation happens in ``dpo_ds.data``; the collator only concatenates and pads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import vision


@dataclass
class PreferenceCollator:
    """Pad ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids`` into one batch.

    Returns long tensors ``input_ids``, ``attention_mask``,
    ``completion_mask`` and ``prompt_mask`` of shape ``[2B, T]`` (row ``i`` is
    pair ``i``'s chosen sequence, row ``B + i`` its rejected one), plus
    ``row_index [B]`` when the rows carry it (the key of the
    precomputed-reference cache). ``completion_mask`` is 1 on the tokens the
    loss scores: the rows' ``prompt_loss_mask + chosen_loss_mask`` /
    ``prompt_loss_mask + rejected_loss_mask`` when they carry them (see
    ``dpo_ds.data``: completion_only_loss, assistant_only_loss), else the
    completion tokens. ``prompt_mask`` is 1 on the prompt tokens, whatever is
    scored (prefix sharing runs them once per pair). ``T`` is the longest sequence,
    rounded up to ``pad_to_multiple_of``; ``padding_side="left"`` puts the
    padding before the tokens (as generation-style batches expect).

    With a vision ``processor`` and rows that carry ``images``, the batch also holds the image
    processor's tensors (``pixel_values``, ``image_grid_thw``, ...; see ``dpo_ds.vision.image_inputs``)
    for the chosen rows' images, then the rejected rows' (the same images: one prompt per pair).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | str | None = None
    processor: Any = None

    def __post_init__(self) -> None:
        self.pad_to_multiple_of = padding_multiple(self.pad_to_multiple_of)
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        sequences, scored, prompt_lengths = [], [], []
        for part in ("chosen", "rejected"):
            for row in rows:
                sequences.append(list(row["prompt_ids"]) + list(row[f"{part}_ids"]))
                scored.append(_loss_mask(row, part))
                prompt_lengths.append(len(row["prompt_ids"]))
        width = max(len(seq) for seq in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        prompt_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (seq, mask, n_prompt) in enumerate(zip(sequences, scored, prompt_lengths)):
            start = width - len(seq) if self.padding_side == "left" else 0
            end = start + len(seq)
            input_ids[i, start:end] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, start:end] = 1
            completion_mask[i, start:end] = torch.tensor(mask, dtype=torch.long)
            prompt_mask[i, start:start + n_prompt] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                 "prompt_mask": prompt_mask}
        if self.processor is not None and "images" in rows[0]:
            batch.update(vision.image_inputs(self.processor, [list(row["images"]) for row in rows] * 2))
        if "row_index" in rows[0]:
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows], dtype=torch.long)
        return batch


def _loss_mask(row: dict, part: str) -> list[int]:
    """The scored tokens of prompt + completion: the row's loss masks, or the completion alone.

    A sequence's first token is never scored: nothing before it predicts it
    (under left padding a pad token would).
    """
    if "prompt_loss_mask" not in row:
        return [0] * len(row["prompt_ids"]) + [1] * len(row[f"{part}_ids"])
    mask = list(row["prompt_loss_mask"]) + list(row[f"{part}_loss_mask"])
    return [0] + mask[1:]


def padding_multiple(pad_to_multiple_of: int | str | None) -> int | None:
    """pad_to_multiple_of as a number or None: TRL's "auto" rounds only on AWS Neuron, which dpo_ds does not run on."""
    return None if pad_to_multiple_of == "auto" else pad_to_multiple_of
