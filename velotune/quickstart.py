"""`velotune quickstart`: a complete fine-tuning run on any machine, with no downloads.

1. Builds a small Llama-shaped model (random weights) and a byte-level BPE tokenizer trained on a
   bundled text, and saves both as a standard Hugging Face folder.
2. Loads that folder through velotune's loader and asks it to translate three phrases into
   "Velotongue", a made-up language it cannot know: it babbles.
3. Adds LoRA adapters (only they train; the base stays frozen) and trains on 100 example
   translations (velotune/quickstart_data/train.jsonl, chat format, loss on the answers only,
   several examples packed per row), showing the loss fall.
4. Translates the 20 held-out phrases (heldout.jsonl) it never saw, and saves the adapter.

Velotongue is word for word: size, colour, animal ("big red cat" -> "zor ka tib"); the held-out
phrases are new combinations of known words, so getting them right means the model learned the
words and the order, not the sentences. Everything runs locally; on a GPU the same code runs on CUDA.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

DATA_DIR = os.path.join(os.path.dirname(__file__), "quickstart_data")

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

MODEL_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2)  # fmt: skip
INIT_RANGE = 0.05
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def read_task(split: str) -> list[dict]:
    with open(os.path.join(DATA_DIR, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(folder: str, extra_text: list[str] = (), extra_special: list[str] = ()):
    """A byte-level BPE tokenizer (384 tokens) trained on CORPUS plus `extra_text`, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() + list(extra_text), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_model_folder(folder: str, seed: int = 0) -> str:
    """A random Llama-shaped model + tokenizer saved in Hugging Face format (sharded safetensors)."""
    import transformers

    from velotune.train.chat_templates import get_chat_template

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    # The task's words are part of the tokenizer's training text, so each becomes one token.
    task_text = [
        m["content"] for split in ("train", "heldout") for row in read_task(split) for m in row["messages"]
    ]
    tokenizer = build_tokenizer(folder, task_text, CHATML_TOKENS)
    get_chat_template(tokenizer, "chatml")
    tokenizer.save_pretrained(folder)  # with its chat template, so the folder is complete on its own
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        **MODEL_SHAPE,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        # Wider than Transformers' default 0.02: with the embeddings (and the tied LM head) frozen under
        # LoRA, their scale bounds how confident the model's logits can get, hence how low the loss goes.
        initializer_range=INIT_RANGE,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="2MB")
    return folder


def translate(model, tokenizer, rows: list[dict], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to each row's user turn, up to the end-of-turn token."""
    from velotune.train.chat_templates import end_of_turn_id

    stop = end_of_turn_id(tokenizer)
    answers = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            row["messages"][:1], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=stop)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def run(
    output_dir: str = "quickstart_out", max_steps: int = 120, say: Callable[[str], object] = logger.info
) -> dict:
    """The whole quickstart; `say` receives the lines meant for a person. Returns the held-out results."""
    import velotune
    from velotune.train import Trainer, TrainingArguments, prepare_dataset

    start = time.perf_counter()
    folder = build_model_folder(os.path.join(output_dir, "tiny-llama"))
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(folder, max_seq_length=256, progress=False)
    say(f"1. Built a random {model.num_parameters() / 1e6:.1f}M-parameter Llama-shaped model in {folder} "
        f"and loaded it on {model.device} ({str(model.dtype).replace('torch.', '')}).")  # fmt: skip

    heldout = read_task("heldout")
    show = heldout[:3]
    velotune.FastLanguageModel.for_inference(model)
    before = translate(model, tokenizer, show)
    say("2. Before training, it cannot speak Velotongue:")
    for row, got in zip(show, before):
        say(f"     {row['messages'][0]['content']!r:48} -> {got!r}")

    model = velotune.FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, use_gradient_checkpointing=False, random_state=0
    )
    trainable = model.num_parameters(trainable_only=True)
    train = prepare_dataset(os.path.join(DATA_DIR, "train.jsonl"), tokenizer, max_seq_length=256)
    say(f"3. Velotongue is made up and goes word for word: size, colour, animal ('big red cat' -> 'zor ka tib'). "
        f"Training LoRA adapters ({trainable / 1e6:.2f}M parameters; the base stays frozen) on {len(train)} "
        f"example translations for {max_steps} steps, loss on the answers only:")  # fmt: skip
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "run"),
        max_steps=max_steps,
        batch_size=2,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        warmup_steps=10,
        packing=True,
        max_seq_length=256,
        logging_steps=10,
        seed=0,
    )
    velotune.FastLanguageModel.for_training(model)
    state = Trainer(model, args, train_dataset=train, tokenizer=tokenizer).train()
    losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    say(
        f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} (every 10 steps in {os.path.join(args.output_dir, 'log.jsonl')})"
    )

    velotune.FastLanguageModel.for_inference(model)
    answers = translate(model, tokenizer, heldout)
    expected = [row["messages"][1]["content"] for row in heldout]
    right = sum(a == e for a, e in zip(answers, expected))
    say(f"4. On {len(heldout)} phrases it never saw, it now answers {right} right:")
    for row, got, want in zip(heldout[:6], answers, expected):
        mark = "ok" if got == want else f"expected {want!r}"
        say(f"     {row['messages'][0]['content']!r:48} -> {got!r:18} {mark}")
    adapter_dir = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    say(
        f"5. Saved the LoRA adapter (PEFT format) to {adapter_dir}; its base model is {folder}. Load both with "
        f"velotune.FastLanguageModel.from_pretrained({adapter_dir!r})."
    )
    say(f"Done in {time.perf_counter() - start:.0f}s.")
    return {
        "right": right,
        "total": len(heldout),
        "losses": losses,
        "answers": answers,
        "adapter": adapter_dir,
    }
