"""Padding-free and prefix-sharing layouts of a collated preference batch.

The collator's padded batch (`[2B, T]`, chosen rows then rejected rows) stays
the batch everything downstream reads: completion mask, sequence sums, metrics.
A layout only changes what the model *runs on*: the real tokens, laid out in
fewer rows, with `position_ids` and an attention mask that keep each sequence
to itself. `token_index [2B, T]` says where token `t` of padded row `i` sits in
the flattened model input, so `PreferenceModel` can hand back per-token
outputs in the padded layout.

- `padded`: the batch as collated (no `token_index`).
- `padding_free`: the 2B sequences are packed into the fewest balanced rows
  of at most `max_length` tokens, positions restarting at 0 per sequence, and a
  block-diagonal causal mask `[R, 1, N, N]` (sdpa/eager), which flex attention
  takes as a block mask. With a varlen kernel (flash attention) everything
  goes into one row with no mask: the kernel finds the sequence boundaries
  from `position_ids`. `attention_implementation` picks the kernel: on a GPU
  the fastest exact one.
- `prefix_sharing`: one unit per pair, `prompt + chosen + rejected`, the prompt
  run once. Both completions attend to the prompt and causally to themselves,
  never to each other, and their positions continue from the prompt's end, so
  every token sees exactly the context (and position) it has in the padded batch.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .collate import padding_multiple
from .vision import IMAGE_INPUTS

LAYOUTS = ("padded", "padding_free", "prefix_sharing")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
FLEX_ATTENTION = "flex_attention"
_PROMPT, _CHOSEN, _REJECTED = 0, 1, 2


def layout_name(args) -> str:
    """The layout a DPOConfig asks for."""
    if getattr(args, "prefix_sharing", False):
        return "prefix_sharing"
    return "padding_free" if getattr(args, "packing", False) else "padded"


def model_inputs(batch: dict, layout: str = "padded", max_length: Optional[int] = None,
                 attn_implementation: str = "sdpa", pad_to_multiple_of: Optional[int] = None) -> dict[str, Tensor]:
    """Keyword arguments of `PreferenceModel.forward` for a collated batch in `layout`."""
    padded = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    if layout == "padded":
        return {**padded, **{k: batch[k] for k in IMAGE_INPUTS if k in batch}}
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    varlen = attn_implementation in VARLEN_ATTENTION
    if layout == "prefix_sharing" and varlen:
        raise ValueError(f"prefix_sharing needs a 4D attention mask, which attn_implementation="
                         f"{attn_implementation!r} cannot take; use sdpa or eager")
    units = _units({**padded, "prompt_mask": batch["prompt_mask"]}, shared_prompt=layout == "prefix_sharing")
    capacity = None if varlen else max([max_length or 0] + [u.length for u in units])
    packed = _pack(units, capacity, pad_to_multiple_of, batch["input_ids"].shape)
    return {**packed, "completion_mask": padded["completion_mask"]}


def inputs_for(batch: dict, args, device) -> dict[str, Optional[Tensor]]:
    """`model_inputs` in the layout a DPOConfig asks for, on `device`, for the attention kernel the model runs."""
    attn = attention_implementation(args, torch.device(device).type == "cuda")
    inputs = model_inputs(batch, layout_name(args), args.max_length, attn, padding_multiple(args.pad_to_multiple_of))
    inputs = {k: None if v is None else v.to(device) for k, v in inputs.items()}
    mask = inputs["attention_mask"]
    if attn == FLEX_ATTENTION and mask is not None and mask.dim() == 4:
        inputs["attention_mask"] = block_mask(mask)
    return inputs


def attention_implementation(args, on_gpu: bool) -> str:
    """The attention kernel a run's models use: `model_init_kwargs["attn_implementation"]`, else
    `args.attn_implementation`, except that packed batches on a GPU with the default sdpa take the fastest
    exact kernel: flash-attn's varlen kernel when flash-attn is installed (padding_free only: prefix
    sharing needs a mask), else PyTorch's flex attention with a block mask, which skips the blocks that
    sdpa's dense block-diagonal mask would only mask. Each computes the same attention, within one sequence.
    """
    requested = (getattr(args, "model_init_kwargs", None) or {}).get("attn_implementation") \
        or getattr(args, "attn_implementation", None) or "sdpa"
    layout = layout_name(args)
    if not on_gpu or requested != "sdpa" or layout == "padded":
        return requested
    if layout == "padding_free" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return FLEX_ATTENTION


def block_mask(mask: Tensor):
    """Flex attention's BlockMask of a `[R, 1, N, N]` bool mask, on the mask's device: the same allowed
    (query, key) pairs, with the blocks that allow none skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]
    rows, n, _ = dense.shape

    def allowed(b, h, q, k):
        return dense[b, q, k]

    return create_block_mask(allowed, B=rows, H=None, Q_LEN=n, KV_LEN=n, device=dense.device)


class _Unit:
    """Tokens that must sit in one packed row: one sequence, or a pair with its shared prompt.

    Each part is (kind, token ids, the (padded row, columns) it serves, its first position); a
    shared prompt serves both rows of its pair (at different columns under left padding).
    """

    def __init__(self, parts: list[tuple[int, Tensor, list[tuple[int, Tensor]], int]]) -> None:
        self.parts = parts
        self.length = sum(len(ids) for _, ids, *_ in parts)


def _units(batch: dict[str, Tensor], shared_prompt: bool) -> list[_Unit]:
    input_ids, attention, prompt_mask = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
    rows = input_ids.shape[0]
    columns = [attention[i].nonzero().squeeze(1) for i in range(rows)]
    if not shared_prompt:
        return [_Unit([(_PROMPT, input_ids[i, cols], [(i, cols)], 0)]) for i, cols in enumerate(columns)]
    pairs = rows // 2
    units = []
    for c in range(pairs):
        r = c + pairs
        prompt_len = int(prompt_mask[c].sum())
        prompt = input_ids[c, columns[c][:prompt_len]]
        if int(prompt_mask[r].sum()) != prompt_len or not torch.equal(
                prompt, input_ids[r, columns[r][:prompt_len]]):
            raise ValueError(f"prefix_sharing: pair {c} has different prompts in its chosen and rejected rows")
        parts = [(_PROMPT, prompt, [(c, columns[c][:prompt_len]), (r, columns[r][:prompt_len])], 0)]
        for kind, row in ((_CHOSEN, c), (_REJECTED, r)):
            cols = columns[row][prompt_len:]
            parts.append((kind, input_ids[row, cols], [(row, cols)], prompt_len))
        units.append(_Unit(parts))
    return units


def _rows(units: list[_Unit], capacity: Optional[int]) -> list[list[_Unit]]:
    """Balanced rows of at most `capacity` tokens (None: one row), as few as the greedy finds.

    From the fewest rows the tokens need: longest unit first, each into the
    emptiest row, so that no row's tail (the positions after its last unit, up
    to the common width) exceeds the longest unit; one more row while that
    overflows a row (it ends: one unit per row always fits).
    """
    if capacity is None:
        return [units]
    count = max(1, -(-sum(u.length for u in units) // capacity))
    while True:
        rows: list[list[_Unit]] = [[] for _ in range(count)]
        fill = [0] * count
        for unit in sorted(units, key=lambda u: -u.length):
            emptiest = min(range(count), key=fill.__getitem__)
            rows[emptiest].append(unit)
            fill[emptiest] += unit.length
        if max(fill) <= capacity:
            return rows
        count += 1


def _pack(units: list[_Unit], capacity: Optional[int], multiple: Optional[int], padded_shape: torch.Size) -> dict:
    """Lay the units out in balanced rows of at most `capacity` tokens (None: one row, no mask)."""
    bins = _rows(units, capacity)
    width = max(sum(u.length for u in members) for members in bins)
    if multiple:
        width = -(-width // multiple) * multiple
    n_rows = len(bins)
    input_ids = torch.zeros(n_rows, width, dtype=torch.long)
    position_ids = torch.zeros(n_rows, width, dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    kind = torch.zeros(n_rows, width, dtype=torch.long)
    token_index = torch.zeros(padded_shape, dtype=torch.long)
    for b, members in enumerate(bins):
        start = 0
        for s, unit in enumerate(members):
            for part, ids, serves, first_pos in unit.parts:
                where = torch.arange(start, start + len(ids))
                input_ids[b, where] = ids
                position_ids[b, where] = torch.arange(first_pos, first_pos + len(ids))
                segment[b, where] = s
                kind[b, where] = part
                for row, cols in serves:
                    token_index[row, cols] = b * width + where
                start += len(ids)
        if start < width:  # the tail: one more causal segment, so no query row is left with nothing to attend to
            position_ids[b, start:] = torch.arange(width - start)
            segment[b, start:] = len(members)
    out = {"input_ids": input_ids, "position_ids": position_ids, "token_index": token_index}
    if capacity is None:
        out["attention_mask"] = None
        return out
    out["attention_mask"] = attention_mask_4d(segment, kind)
    return out


def attention_mask_4d(segment: Tensor, kind: Tensor) -> Tensor:
    """`[R, 1, N, N]` bool, True where query q may attend key k.

    Same unit, k not after q, and never a rejected-completion query on a
    chosen-completion key (the only cross-part case that order alone allows).
    """
    n = segment.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    crossed = (kind.unsqueeze(2) == _REJECTED) & (kind.unsqueeze(1) == _CHOSEN)
    return (same & causal & ~crossed).unsqueeze(1)
