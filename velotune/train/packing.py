"""Batches: packing examples into rows, the order of each epoch, and collation into tensors.

A packed row holds several examples back to back. Each example's position_ids restart at 0 and
`cu_seqlens` (int32, over the flattened batch) marks where every example starts, so attention
never crosses from one to the next and no compute goes to padding except a row's short tail.
The first label of every example is -100: the token before it belongs to another example.

An unpacked batch pads each example on the right to the longest in the batch, with an
attention_mask, as Transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from velotune.errors import ConfigError

IGNORE_INDEX = -100


def pack(
    lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None, open_rows: int = 64
) -> list[list[int]]:
    """Groups example indices into rows of at most `capacity` tokens.

    Examples are taken in `order`; each goes to the first open row with room (first fit), and up to
    `open_rows` rows are kept open, so rows come out nearly full while the order stays roughly that
    of the data (a full sort by length would put all the long examples together).
    """
    order = range(len(lengths)) if order is None else order
    rows: list[list[int]] = []
    open_: list[tuple[int, list[int]]] = []  # (free tokens, example indices)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ConfigError(f"example {i} has {n} tokens, more than the row capacity {capacity}.")
        for slot, (free, members) in enumerate(open_):
            if n <= free:
                members.append(i)
                if free - n == 0:
                    rows.append(members)
                    open_.pop(slot)
                else:
                    open_[slot] = (free - n, members)
                break
        else:
            if len(open_) == open_rows:
                rows.append(open_.pop(0)[1])
            open_.append((capacity - n, [i]))
    rows.extend(members for _, members in open_)
    return rows


class BatchPlan:
    """Which examples form each micro-batch, epoch by epoch, as a pure function of the seed.

    Rows are packed once (from a seeded shuffle), and each epoch visits them in its own seeded
    order; the position in the data is then just (epoch, micro-batch index), which is what a
    checkpoint stores to resume exactly.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, packing: bool, max_seq_length: int | None,
                 shuffle: bool = True):  # fmt: skip
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        n = len(lengths)
        if packing:
            if max_seq_length is None:
                raise ConfigError("packing needs max_seq_length (the length of a packed row).")
            first = self._permutation(n, -1) if shuffle else np.arange(n)
            self.rows = pack(lengths, max_seq_length, first.tolist())
        else:
            self.rows = [[i] for i in range(n)]

    def _permutation(self, n: int, epoch: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        return torch.randperm(n, generator=gen).numpy()

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The micro-batches of one epoch: each a list of rows, each row a list of example indices."""
        order = self._permutation(len(self.rows), epoch) if self.shuffle else np.arange(len(self.rows))
        rows = [self.rows[i] for i in order]
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]


def collate_packed(
    rows: Sequence[Sequence[dict]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict:
    """Rows of examples ({"input_ids", "labels"} 1-D tensors) -> a packed batch."""
    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = _round_up(max(lengths), pad_to_multiple_of)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    starts = []
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, at : at + n] = torch.as_tensor(example["input_ids"])
            labels[r, at : at + n] = torch.as_tensor(example["labels"])
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            starts.append(r * width + at)
            at += n
        if at < width:  # the padded tail is a document of its own, so no real token attends to it
            position_ids[r, at:] = torch.arange(width - at)
            starts.append(r * width + at)
    starts.append(batch * width)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(starts, dtype=torch.int32),
    }


def collate_padded(
    examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict:
    """Examples -> a right-padded batch with attention_mask."""
    width = _round_up(max(len(e["input_ids"]) for e in examples), pad_to_multiple_of)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for r, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[r, :n] = torch.as_tensor(example["input_ids"])
        labels[r, :n] = torch.as_tensor(example["labels"])
        labels[r, 0] = IGNORE_INDEX
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def num_label_tokens(batch: dict) -> int:
    """Tokens that carry a loss (labels are shifted inside the model, so column 0 never does)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class DataCollator:
    """A collator for `transformers.Trainer` (or any DataLoader) over velotune's tokenized examples.

    Args:
        pad_token_id: id written into padding.
        packing: pack the examples of each batch into as few rows of `max_seq_length` as fit.
        max_seq_length: row length for packing.
        pad_to_multiple_of: round the batch width up (e.g. 8 for tensor cores).
    """

    def __init__(self, pad_token_id: int, packing: bool = False, max_seq_length: int | None = None,
                 pad_to_multiple_of: int | None = None):  # fmt: skip
        if packing and max_seq_length is None:
            raise ConfigError("packing needs max_seq_length (the length of a packed row).")
        self.pad_token_id, self.packing = pad_token_id, packing
        self.max_seq_length, self.pad_to_multiple_of = max_seq_length, pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict:
        if not self.packing:
            return collate_padded(examples, self.pad_token_id, self.pad_to_multiple_of)
        rows = pack([len(e["input_ids"]) for e in examples], self.max_seq_length)
        return collate_packed(
            [[examples[i] for i in row] for row in rows], self.pad_token_id, self.pad_to_multiple_of
        )
