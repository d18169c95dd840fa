"""Prompt/completion text -> one (3, msl) int32 sample, exactly as ModelZoo's finetuning mode.

Mirrors `cszoo data_preprocess` (`mode: finetuning`, `FinetuningTokenGenerator`) with
`sep_token: null` and `use_ftfy: false`, so a user without ModelZoo gets the same arrays:

    text   = prompt + completion + eos_token                 (tokenized once, BOS added)
    loss   = 1 on the tokens covering the completion and the EOS, 0 elsewhere (by char offsets)
    sample = [input_ids = tokens[:-1], loss_mask = loss[1:], labels = tokens[1:]], padded to msl
             with pad_id (the tokenizer's pad id, else its EOS id) and loss 0.

Examples longer than msl tokens (before the shift) or shorter than `min_sequence_len` tokens are skipped, as
ModelZoo skips them; the caller counts and reports them.
"""

from __future__ import annotations

import numpy as np

MIN_SEQUENCE_LEN = 10  # ModelZoo's default `min_sequence_len`


def pad_id_of(tokenizer) -> int:
    """ModelZoo's rule: the tokenizer's pad id, else its EOS id."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _token_range(offsets: list[tuple[int, int]], start: int, end: int, first: int) -> tuple[int, int]:
    """Tokens [t0, t1) covering characters [start, end), ModelZoo's `find_token_range` rule."""
    t0 = next(
        (
            i
            for i in range(first, len(offsets))
            if offsets[i][0] <= start < offsets[i][1] or offsets[i][0] > start
        ),
        None,
    )
    if t0 is None:
        raise ValueError("tokenizer offsets do not cover the completion")
    t1 = next(
        (
            i
            for i in range(t0, len(offsets))
            if (offsets[i][1] >= end and offsets[i][0] < end)
            or (offsets[i][1] < end and (i + 1 >= len(offsets) or offsets[i + 1][0] >= end))
        ),
        None,
    )
    if t1 is None:
        raise ValueError("tokenizer offsets do not cover the completion")
    return t0, t1 + 1


def encode_example(
    tokenizer, prompt: str, completion: str, max_seq_length: int, min_sequence_len: int = MIN_SEQUENCE_LEN
) -> np.ndarray | None:
    """One sample, int32 [3, max_seq_length] (input_ids, loss mask, labels), or None when skipped."""
    eos = tokenizer.eos_token or ""
    text = prompt + completion + eos
    encoded = tokenizer(text, return_offsets_mapping=True)
    token_ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    if len(token_ids) > max_seq_length or len(token_ids) < min_sequence_len:
        return None
    prompt_t0, prompt_t1 = _token_range(offsets, 0, len(prompt), 0)
    del prompt_t0
    comp_t0, comp_t1 = _token_range(offsets, len(prompt), len(text), prompt_t1)
    loss = [0] * len(token_ids)
    for i in range(comp_t0, min(comp_t1, len(token_ids))):
        loss[i] = 1
    pad = pad_id_of(tokenizer)
    input_ids, labels, loss_mask = token_ids[:-1], token_ids[1:], loss[1:]
    num_pad = max_seq_length - len(input_ids)
    input_ids += [pad] * num_pad
    labels += [pad] * num_pad
    loss_mask += [0] * num_pad
    return np.stack([np.asarray(x, dtype=np.int32) for x in (input_ids, loss_mask, labels)])
