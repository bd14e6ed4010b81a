"""Helpers for the training tests: a small byte-level BPE tokenizer that knows every built-in chat
template's markers, and tiny models loaded through velotune."""

from __future__ import annotations

import torch

import velotune
from tests.model_zoo import save_hf_model

CORPUS = [
    "Capital of France? Paris. And two plus two? Four. Be brief.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Translate to French: good morning. Bonjour. Write a haiku about rain.",
]
MARKERS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
    "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
]  # fmt: skip


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", *MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(folder, family: str = "llama", seed: int = 0, full_finetuning: bool = True, max_seq_length=64):
    save_hf_model(family, str(folder), seed=seed)
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", full_finetuning=full_finetuning,
        max_seq_length=max_seq_length, progress=False,
    )  # fmt: skip
    return model


def random_examples(
    n: int, seed: int, vocab: int = 101, min_len: int = 3, max_len: int = 20, prompt_frac=0.4
):
    """(input_ids, labels) pairs of varied lengths; the first part of each is a masked 'prompt'."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        cut = max(1, int(length * prompt_frac))
        out.append((ids, [-100] * cut + ids[cut:]))
    return out
