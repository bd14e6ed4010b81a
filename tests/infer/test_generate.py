"""Generation (prompt forward, then the fixed-shape decode step run eagerly, as it runs on the CPU) equals
Transformers' generate token for token: greedy on every family, sampling under the same seed, repetition
penalty, LoRA unmerged and merged, a 4-bit base with LoRA."""

import pytest
import torch
import transformers

import velotune
from velotune.errors import ConfigError
from tests.lora.helpers import velotune_and_peft
from tests.model_zoo import FAMILY_CONFIGS, save_hf_model


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
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


def test_sampling_draws_what_transformers_draws_under_the_same_seed(pair):
    # Same filters in the same order (temperature, top-k, top-p) and the same draw as torch.multinomial.
    hf, ours = pair
    prompts = torch.tensor([[0, 0, 11, 12, 13], [5, 17, 33, 8, 90]])
    mask = (prompts != 0).long()
    settings = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    torch.manual_seed(3)
    expected = hf.generate(prompts, attention_mask=mask, eos_token_id=None, pad_token_id=0, **settings)
    torch.manual_seed(3)
    got = ours.generate(prompts, attention_mask=mask, **settings)
    assert torch.equal(got, expected)


def test_repetition_penalty_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.tensor([[5, 17, 33, 8, 90, 41]])
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.7, eos_token_id=None,
                           pad_token_id=0)  # fmt: skip
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, repetition_penalty=1.7), expected)


def test_rows_stop_at_eos_and_are_padded(pair):
    _, ours = pair
    prompt = torch.tensor([[5, 17, 33]])
    first = int(ours.generate(prompt, max_new_tokens=1)[0, -1])
    out = ours.generate(prompt, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert out.shape[1] == 4 and int(out[0, -1]) == first


@pytest.mark.parametrize("check_every", [1, 16])
def test_rows_that_finish_at_different_steps_stop_whatever_the_check_interval(check_every, pair):
    _, ours = pair
    prompts = torch.tensor([[0, 0, 11, 12, 13], [5, 17, 33, 8, 90]])
    mask = (prompts != 0).long()
    free = ours.generate(prompts, attention_mask=mask, max_new_tokens=10)[:, 5:]
    eos = sorted({int(free[0, 2]), int(free[1, 5])})
    firsts = [next(i for i, t in enumerate(row.tolist()) if t in eos) for row in free]
    expected = free[:, : max(firsts) + 1].clone()
    for row, first in enumerate(firsts):
        expected[row, first + 1 :] = 0
    got = ours.generate(prompts, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0,
                        check_every=check_every)  # fmt: skip
    assert torch.equal(got[:, 5:], expected)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_phi3_re_encodes_the_sequence_where_it_outgrows_longrope_as_transformers_does(kernels, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    # LongRoPE's original length is 8 here: 8-column prompts cross it at the first new token, where Transformers
    # runs the whole sequence again so that every cached key is rotated with the long factors. The expected
    # tokens come from Transformers' forward over the whole sequence at every step (use_cache=False): its
    # cached generate re-encodes only the last token in some versions (5.17, issue #8), this does not depend
    # on that. "triton": the decode step's kernels as on a GPU (interpreted).
    hf = save_hf_model("phi3", str(tmp_path))
    ours, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu")
    assert ours.spec.rope.kind == "longrope" and ours.spec.rope.original_max_position_embeddings == 8
    prompts = torch.tensor([[0, 0, 0, 11, 12, 13, 14, 15], [5, 17, 33, 8, 90, 41, 7, 3]])
    mask = (prompts != 0).long()
    expected = hf.generate(prompts, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0, use_cache=False)  # fmt: skip
    monkeypatch.setenv("VELOTUNE_KERNELS", kernels)
    assert torch.equal(ours.generate(prompts, attention_mask=mask, max_new_tokens=24), expected)


def test_right_padded_prompts_are_refused(pair):
    _, ours = pair
    with pytest.raises(ConfigError, match="left-padded"):
        ours.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A Llama with a real byte-level BPE tokenizer (vocabulary of the model's size)."""
    from velotune.quickstart import build_tokenizer

    folder = tmp_path_factory.mktemp("llama_tok")
    tok = build_tokenizer(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)  # varied tokens, so that a stop string can end generation early
    hf.save_pretrained(str(folder))
    ours, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu")
    return hf, ours, tok


def test_stop_strings_end_generation_where_transformers_does(with_tokenizer):
    hf, ours, tok = with_tokenizer
    prompt = tok("A LoRA adapter", return_tensors="pt").input_ids
    free = ours.generate(prompt, max_new_tokens=12)
    # A stop string made of the k-th new token's text and the character before it, at the latest place where
    # both tokens are ordinary (not special, no partial UTF-8 character) and the string is new there.
    new = free[0, prompt.shape[1] :].tolist()
    texts = [tok.decode(new[:k]) for k in range(len(new) + 1)]

    def usable(k: int) -> bool:
        before, after = texts[k - 1], texts[k]
        ok = min(new[k - 2], new[k - 1]) > 2 and len(after) > len(before) > 0 and after.startswith(before)
        return ok and "\ufffd" not in after[len(before) - 1 :] and after[len(before) - 1 :] not in before

    k = max(k for k in range(2, len(new) + 1) if usable(k))
    stop = texts[k][len(texts[k - 1]) - 1 :]
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tok,
                           pad_token_id=0, eos_token_id=None)  # fmt: skip
    got = ours.generate(prompt, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(got, expected)
    assert got.shape[1] <= prompt.shape[1] + k


def test_stop_strings_without_a_tokenizer_are_refused(with_tokenizer):
    _, ours, _ = with_tokenizer
    with pytest.raises(ConfigError, match="tokenizer"):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, stop_strings=["x"])


def test_transformers_text_streamer_receives_what_is_generated(with_tokenizer):
    _, ours, tok = with_tokenizer
    prompt = tok("Packing puts", return_tensors="pt").input_ids
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True)
    out = ours.generate(prompt, max_new_tokens=10, streamer=streamer)
    streamed = "".join(streamer)  # the queue is complete: generate() has returned and called end()
    assert streamed == tok.decode(out[0, prompt.shape[1] :])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_lora_unmerged_and_merged_generate_what_peft_generates(family, tmp_path):
    ours, theirs, _ = velotune_and_peft(family, tmp_path)
    prompts = torch.tensor([[0, 0, 11, 12, 13], [5, 17, 33, 8, 90]])
    mask = (prompts != 0).long()
    theirs.eval()
    expected = theirs.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert torch.equal(ours.generate(prompts, attention_mask=mask, max_new_tokens=10), expected)
    merged = ours.merge_and_unload()
    assert torch.equal(merged.generate(prompts, attention_mask=mask, max_new_tokens=10), expected)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_4bit_base_with_lora_generates_what_peft_generates_on_the_dequantized_weights(kernels, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    from tests.quant.test_qlora import _qlora_pair

    ours, theirs = _qlora_pair("llama", tmp_path)
    prompts = torch.tensor([[0, 11, 12, 13], [5, 17, 33, 8]])
    mask = (prompts != 0).long()
    theirs.eval()
    expected = theirs.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)  # fmt: skip
    # "triton": the NF4 weights are dequantized by the Triton kernel (interpreted) into the scratch buffer,
    # inside the fused LoRA projection, as on a GPU.
    monkeypatch.setenv("VELOTUNE_KERNELS", kernels)
    assert torch.equal(ours.generate(prompts, attention_mask=mask, max_new_tokens=6), expected)
