"""Packing: every example once, rows within capacity, and the same per-example loss as padding."""

import pytest
import torch

from tests.train.helpers import random_examples, tiny_model
from velotune.train.data import TokenizedDataset
from velotune.train.packing import IGNORE_INDEX, BatchPlan, DataCollator, collate_packed, collate_padded, pack


def test_pack_places_every_example_once_within_capacity():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (300,), generator=gen).tolist()
    rows = pack(lengths, 64, open_rows=8)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64  # nearly full rows


def test_epochs_visit_every_row_once_in_a_seeded_order():
    plan = BatchPlan([5] * 10, batch_size=3, seed=1, packing=False, max_seq_length=None)
    epoch0, epoch1 = plan.epoch(0), plan.epoch(1)
    assert len(epoch0) == len(plan) == 4
    assert sorted(i for b in epoch0 for row in b for i in row) == list(range(10))
    assert epoch0 != epoch1 and epoch0 == BatchPlan([5] * 10, 3, 1, False, None).epoch(0)


def test_packed_rows_restart_positions_and_mark_every_document():
    examples = [{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)} for n in (3, 2, 4)]
    batch = collate_packed([examples[:2], examples[2:]], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10]  # the pad tail of row 1 is a document of its own
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 2], [-100, 2, 3, 4, -100]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("llama"), "qwen2")  # qwen2 adds a sliding window on one layer


def test_packing_on_and_off_give_the_same_loss_for_every_example(model):
    ds = TokenizedDataset.from_examples(random_examples(7, seed=3))
    examples = [ds[i] for i in range(len(ds))]
    packed = DataCollator(pad_token_id=0, packing=True, max_seq_length=40)(examples)
    assert packed["input_ids"].shape[0] < len(examples), "the test must put several examples in one row"
    model.eval()
    with torch.no_grad():
        for k in range(len(examples)):
            alone = collate_padded([examples[k]], pad_token_id=0)
            want = model(**alone).loss
            # Keep only example k's labels in the packed batch: its loss must not see the others.
            row_labels = packed["labels"].flatten().clone()
            mask = torch.zeros_like(row_labels, dtype=torch.bool)
            mask[_span_of(packed, examples, k)] = True
            labels = torch.where(mask, row_labels, IGNORE_INDEX).view_as(packed["labels"])
            got = model(**{**packed, "labels": labels}).loss
            assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))


def _span_of(packed, examples, k):
    """Flat positions of example k inside the packed batch, found by matching its tokens at a document start."""
    ids, starts = packed["input_ids"].flatten(), packed["cu_seqlens"].tolist()
    target = examples[k]["input_ids"]
    for s in starts[:-1]:
        if ids[s : s + len(target)].tolist() == target.tolist():
            return slice(s, s + len(target))
    raise AssertionError(f"example {k} not found in the packed batch")


def test_a_padded_and_a_packed_batch_give_the_same_mean_loss(model):
    ds = TokenizedDataset.from_examples(random_examples(6, seed=4))
    examples = [ds[i] for i in range(len(ds))]
    model.eval()
    with torch.no_grad():
        padded = model(**DataCollator(0)(examples)).loss
        packed = model(**DataCollator(0, packing=True, max_seq_length=48)(examples)).loss
    assert abs(padded.item() - packed.item()) <= 1e-6
