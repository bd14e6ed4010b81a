"""Greedy generation with the static KV cache equals Transformers' greedy output token for token."""

import pytest
import torch

import velotune
from velotune.errors import ConfigError
from tests.model_zoo import save_hf_model


@pytest.fixture(scope="module", params=["llama", "gemma2", "mixtral", "phi3"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, str(folder))
    ours, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu")
    return hf, ours


def test_greedy_matches_transformers_single_prompt(pair):
    hf, ours = pair
    prompt = torch.tensor([[5, 17, 33, 8, 90, 41]])
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=12)
    assert torch.equal(got, expected)


def test_greedy_matches_transformers_left_padded_batch(pair):
    hf, ours = pair
    prompts = torch.tensor([[0, 0, 0, 11, 12, 13], [5, 17, 33, 8, 90, 41]])
    mask = (prompts != 0).long()
    expected = hf.generate(prompts, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)  # fmt: skip
    got = ours.generate(prompts, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_with_a_seed(pair):
    _, ours = pair
    prompt = torch.tensor([[5, 17, 33]])
    a = ours.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    b = ours.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(a, b)


def test_rows_stop_at_eos_and_are_padded(pair):
    _, ours = pair
    prompt = torch.tensor([[5, 17, 33]])
    first = int(ours.generate(prompt, max_new_tokens=1)[0, -1])
    out = ours.generate(prompt, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert out.shape[1] == 4 and int(out[0, -1]) == first


def test_right_padded_prompts_are_refused(pair):
    _, ours = pair
    with pytest.raises(ConfigError, match="left-padded"):
        ours.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
