"""`TopKCollator`: padded `(B, L)` token batches with their stored `(B, L, k)` top-k teacher."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence

import torch

from .store import TopKStore

__all__ = ["TopKCollator"]


def _as_list(name: str, value, i: int) -> list:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"features[{i}][{name!r}] must be 1-D, got shape "
                             f"{tuple(value.shape)}")
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"features[{i}][{name!r}] must be a list or a 1-D tensor of token ids, "
                    f"got {type(value).__name__}")


def _key(value, i: int, field: str):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(f"features[{i}][{field!r}] must be a str or an int key")
        value = int(value.item())
    return value


def _token_fields(feat: dict, i: int) -> tuple:
    """input_ids, labels (default: input_ids) and attention_mask (default: ones) as lists."""
    ids = _as_list("input_ids", feat["input_ids"], i)
    lab = _as_list("labels", feat["labels"], i) if "labels" in feat else list(ids)
    att = (_as_list("attention_mask", feat["attention_mask"], i)
           if "attention_mask" in feat else [1] * len(ids))
    if not len(lab) == len(att) == len(ids):
        raise ValueError(f"features[{i}]: input_ids, labels and attention_mask must "
                         "have the same length")
    return ids, lab, att


class _Example(NamedTuple):
    """One collated feature: (n,) tensors and its kept stored rows at `positions`."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor        # ignore_index on unattended positions
    shift_labels: torch.Tensor  # the target of the logits at each position
    positions: torch.Tensor     # (m,) increasing positions of the m kept rows
    logprobs: torch.Tensor      # (m, k)
    indices: torch.Tensor       # (m, k)


def _row_positions(i: int, key, rows: int, attended: torch.Tensor, has_mask: bool
                   ) -> torch.Tensor:
    """Positions of a record's rows: one row per token, or (a pre-padded example, as
    `fastkd cache-teacher` writes it) one row per attended position."""
    if rows == attended.numel():
        return torch.arange(rows)
    ones = int(attended.sum())
    if has_mask and rows == ones:
        return attended.nonzero().flatten()
    mask = f"{ones} attended positions (attention_mask ones)" if has_mask else \
        "no attention_mask"
    raise ValueError(f"features[{i}]: key {key!r} has {rows} top-k rows in the store but "
                     f"{attended.numel()} input_ids and {mask}: the store needs one row per "
                     "input_id or one per attended position (tokenised differently?)")


class TopKCollator:
    """Collate `{input_ids, key, [attention_mask], [labels]}` features with the store's top-k.

    Parameters
    ----------
    store : TopKStore or str
        The store (or its path) written for these sequences: the record of a sequence with
        L tokens holds L rows, row t being the teacher's distribution of token t + 1 (what
        `fastkd cache-teacher` writes). A pre-padded feature (its `attention_mask` has zeros,
        left, right or in between) may instead have one row per attended position: row j
        goes to the j-th attended position and predicts the next attended token; padded
        positions, and the first attended token's label, are ignored. Any other row count
        raises `ValueError` naming the key, the rows, the input_ids length and the mask's ones.
    pad_token_id : int
        Filler of `input_ids` past a sequence's end (right padding).
    ignore_index : int
        Label of ignored positions.
    key_field : str
        Feature field holding the store key.
    max_length : int or None
        Truncate sequences (and their top-k rows) to this many tokens.
    pad_to_multiple_of : int or None
        Round the padded length up to a multiple of this.

    Returns (from `__call__(features)`), a dict of tensors:
        `input_ids` (B, L) int64; `attention_mask` (B, L) int64;
        `labels` (B, L) int64 - the features' `labels` (default: `input_ids`) with padding set
        to `ignore_index`, unshifted as Hugging Face models expect;
        `shift_labels` (B, L) int64 - `labels[:, t + 1]`, `ignore_index` in the last column:
        the target of the student's logits at position t;
        `teacher_topk_logprobs` (B, L, k) float32 and `teacher_topk_indices` (B, L, k) int64,
        aligned with the student's logits (row t predicts token t + 1).
    Every row whose `shift_labels` is `ignore_index` (padding, a sequence's last token, masked
    prompt tokens) holds a filler - indices `0..k-1`, log-probs `-log k` - that the losses
    ignore. So the loss over all positions is simply
    `fastkd.sparse_distillation_loss(logits, batch["teacher_topk_logprobs"],
    batch["teacher_topk_indices"], batch["shift_labels"], ...)`.
    """

    def __init__(self, store, *, pad_token_id: int = 0, ignore_index: int = -100,
                 key_field: str = "key", max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None):
        self.store = store if isinstance(store, TopKStore) else TopKStore(store)
        for name, v in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        for name, v in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                                  or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if not isinstance(key_field, str):
            raise TypeError(f"key_field must be a str, got {type(key_field).__name__}")
        self.pad_token_id, self.ignore_index = int(pad_token_id), int(ignore_index)
        self.key_field, self.max_length = key_field, max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        if not features:
            raise ValueError("features must hold at least one example")
        k, ig = self.store.k, self.ignore_index
        examples = [self._example(i, feat) for i, feat in enumerate(features)]
        length = max(len(ex.input_ids) for ex in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(examples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((b, length), dtype=torch.int64)
        label_t = torch.full((b, length), ig, dtype=torch.int64)
        shift = torch.full((b, length), ig, dtype=torch.int64)
        lp_out = torch.full((b, length, k), -math.log(k), dtype=torch.float32)
        idx_out = torch.arange(k, dtype=torch.int64).expand(b, length, k).clone()
        for i, ex in enumerate(examples):
            n = len(ex.input_ids)
            input_ids[i, :n] = ex.input_ids
            attention[i, :n] = ex.attention_mask
            label_t[i, :n] = ex.labels
            shift[i, :n] = ex.shift_labels
            lp_out[i, ex.positions] = ex.logprobs
            idx_out[i, ex.positions] = ex.indices
        ignored = shift == ig
        lp_out[ignored] = -math.log(k)
        idx_out[ignored] = torch.arange(k, dtype=torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
                "shift_labels": shift, "teacher_topk_logprobs": lp_out,
                "teacher_topk_indices": idx_out}

    def _example(self, i: int, feat: dict) -> _Example:
        """Feature `i` truncated to `max_length`, with its stored rows and their positions."""
        if "input_ids" not in feat or self.key_field not in feat:
            raise ValueError(f"features[{i}] must have 'input_ids' and {self.key_field!r}")
        ids, lab, att = _token_fields(feat, i)
        key = _key(feat[self.key_field], i, self.key_field)
        if key not in self.store:
            raise KeyError(f"features[{i}]: key {key!r} is not in the top-k store "
                           f"{self.store.path!r}")
        lp, idx = self.store[key]
        attended = torch.as_tensor(att, dtype=torch.int64) != 0
        positions = _row_positions(i, key, lp.shape[0], attended, "attention_mask" in feat)
        n = len(ids) if self.max_length is None else min(len(ids), self.max_length)
        kept = int((positions < n).sum())  # positions increase
        positions, attended = positions[:kept], attended[:n]
        labels = torch.as_tensor(lab[:n], dtype=torch.int64).masked_fill(~attended,
                                                                          self.ignore_index)
        if lp.shape[0] < len(ids) and kept:
            # nothing predicts the first stored token: keeps `labels` (which older
            # transformers count for the loss divisor) in step with `shift_labels`
            labels[positions[0]] = self.ignore_index
        shifted = torch.full((n,), self.ignore_index, dtype=torch.int64)
        # row j predicts the token of row j + 1 (the next position, or the next attended one)
        shifted[positions[:-1]] = labels[positions[1:]]
        return _Example(torch.as_tensor(ids[:n], dtype=torch.int64), attended.long(), labels,
                        shifted, positions, lp[:kept], idx[:kept])
