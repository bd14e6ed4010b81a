"""`velotune quickstart`: a self-contained first run on any machine, with no downloads.

It builds a small Llama-shaped model with a byte-level BPE tokenizer trained on a bundled text,
saves both as a standard Hugging Face folder, loads that folder back through velotune's loader,
and generates from a prompt. Everything happens locally; on a GPU the same code runs on CUDA.
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

CORPUS = """\
velotune fine-tunes open language models on one GPU or many.
A LoRA adapter adds two small matrices beside each frozen weight; only the small matrices learn.
QLoRA keeps the frozen weights in four bits, so a large model fits on a small card.
The loss is the cross-entropy of the next token, averaged over the tokens that carry a label.
Packing puts several short examples in one row, and attention never crosses from one to the next.
Gradient checkpointing saves the input of each layer and recomputes the rest during the backward pass.
A checkpoint is written to a temporary folder first and renamed when complete, so a crash loses nothing.
The trained adapter loads in PEFT, the merged model in Transformers, and the GGUF file in llama.cpp.
"""


def build_tokenizer(folder: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_model_folder(folder: str, seed: int = 0) -> str:
    """A random Llama-shaped model + tokenizer saved in Hugging Face format (sharded safetensors)."""
    import transformers

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="2MB")
    return folder


def run(output_dir: str = "quickstart_out", prompt: str = "A LoRA adapter", max_new_tokens: int = 24) -> str:
    import velotune

    folder = build_model_folder(os.path.join(output_dir, "tiny-llama"))
    logger.info("model folder: %s", folder)
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(folder, max_seq_length=512)
    logger.info("loaded %s with %.2fM parameters on %s (%s)", model.spec.model_type,
                model.num_parameters() / 1e6, model.device, model.dtype)  # fmt: skip
    velotune.FastLanguageModel.for_inference(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    new_tokens = out.shape[1] - ids.shape[1]
    logger.info("generated %d tokens in %.2fs (%.1f tokens/s)", new_tokens, elapsed, new_tokens / elapsed)
    return text
