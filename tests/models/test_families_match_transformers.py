"""Every family, loaded from a sharded Hugging Face folder, gives Transformers' logits and loss."""

import pytest
import torch

import velotune
from tests.model_zoo import FAMILY_CONFIGS, random_batch, rel_err, save_hf_model, shard_count


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, str(folder))
    assert shard_count(str(folder)) > 1, "the test must exercise sharded loading"
    ours, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu")
    return request.param, hf, ours


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_and_loss_equal_transformers(pair, padding):
    name, hf, ours = pair
    ids, mask, labels = random_batch(3, 13, seed=hash((name, padding)) % 1000, padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    assert rel_err(out.logits[keep], ref.logits[keep]) < 1e-5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-6


def test_batch_of_one_token_matches(pair):
    _, hf, ours = pair
    ids = torch.tensor([[7]])
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-5


def test_packed_rows_equal_separate_sequences(pair):
    """Restarting position_ids packs documents: each must score as if it were alone."""
    name, hf, ours = pair
    a, _, _ = random_batch(1, 5, seed=1)
    b, _, _ = random_batch(1, 7, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        together = ours(input_ids=packed, position_ids=positions).logits
        alone = torch.cat([ours(input_ids=a).logits, ours(input_ids=b).logits], dim=1)
        hf_alone = torch.cat([hf(input_ids=a).logits, hf(input_ids=b).logits], dim=1)
    assert rel_err(together, alone) < 1e-5
    assert rel_err(alone, hf_alone) < 1e-5
