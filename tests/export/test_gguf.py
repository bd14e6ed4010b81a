"""GGUF files run in llama.cpp (through llama-cpp-python) with velotune's logits, tokenize as the
Hugging Face tokenizer does, and carry the metadata llama.cpp reads.

Models are small and random, with a real byte-level BPE tokenizer; their embedding has more rows
than the tokenizer has tokens (padding rows, as real checkpoints often have).
"""

import json
import logging

import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import velotune
from tests.model_zoo import rel_err
from velotune.errors import UnsupportedModelError
from velotune.export.gguf import arch_for, save_gguf
from velotune.export.gguf_names import PRE_TOKENIZER_BY_PATTERN
from velotune.quickstart import CORPUS, build_tokenizer

MIXED = "Hello wörld! Ça va? 🚀🦙 naïve café 日本語\ndef f(x):\n    return x**2  # 12345 3.14\n\n\tdone. I'll"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = 400  # embedding rows; the tokenizer has fewer tokens
F32_KV = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default f16 cache would add its own rounding

COMMON = dict(vocab_size=ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)  # fmt: skip
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.05 * i for i in range(8)], "long_factor": [1.2 + 0.3 * i for i in range(8)]}  # fmt: skip
# Shapes llama.cpp accepts (Qwen2 and Phi-3 need heads x head_dim == hidden), with each family's quirks on.
GGUF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ),  # fmt: skip
    "llama_tied_bias": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=24, hidden_act="gelu_pytorch_tanh"),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**COMMON, "num_hidden_layers": 3},
        head_dim=24,
        sliding_window=5,
        query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),  # fmt: skip
    "phi3": lambda: transformers.Phi3Config(**COMMON, rope_parameters=LONGROPE),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = build_tokenizer(str(tmp_path_factory.mktemp("tok")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def random_model(family: str, folder, tokenizer, std: float = 0.1, learn: list[int] | None = None, **overrides):
    """A random model saved with Transformers and loaded back through velotune (float32).

    With `learn`, the model is first trained on that token sequence until its loss is below 0.3 nats per
    token: a model that has learned its text, whose next-token logits are peaked as a trained LM's are.
    """
    torch.manual_seed(0)
    config = GGUF_CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, std)
            if "norm" in name and "gemma" not in family:
                p.add_(1.0)
    if learn is not None:
        learn_sequence(hf, learn)
    hf.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          progress=False)  # fmt: skip
    return model


def learn_sequence(hf, ids: list[int], target_loss: float = 0.3, max_steps: int = 150) -> None:
    row = torch.tensor([ids])
    optimizer = torch.optim.Adam(hf.parameters(), lr=1e-2)
    for _ in range(max_steps):  # 25-55 steps measured
        loss = hf(row, labels=row).loss
        if loss.item() < target_loss:
            return
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    raise AssertionError(f"the test model did not learn its text: loss {loss.item():.3f} after {max_steps} steps")


def prompt_ids(tokenizer, n: int = 48) -> list[int]:
    ids = tokenizer(MIXED + " " + CORPUS).input_ids[:n]
    assert len(ids) == n
    return ids


def llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, n_threads=2, **F32_KV)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def velotune_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", sorted(GGUF_CONFIGS))
def test_llama_cpp_runs_the_f32_and_f16_files_with_velotunes_logits(family, tokenizer, tmp_path):
    model = random_model(family, tmp_path / "model", tokenizer)
    ids = prompt_ids(tokenizer)
    ours = torch.from_numpy(velotune_logits(model, ids))
    f32 = save_gguf(model, str(tmp_path / "out"), tokenizer, "f32")
    f16 = save_gguf(model, str(tmp_path / "out"), tokenizer, "f16")
    # float32 weights and cache: what is left is llama.cpp's float32 arithmetic (Gemma's GELU goes through
    # a float16 lookup table in ggml, ~4e-4 of the logit range).
    assert rel_err(torch.from_numpy(llama_cpp_logits(f32, ids)), ours) < 1e-3
    assert rel_err(torch.from_numpy(llama_cpp_logits(f16, ids)), ours) < 1e-2


Q8_0_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]


@pytest.mark.parametrize("family", Q8_0_FAMILIES)
def test_q8_0_files_hold_what_llama_cpps_own_quantizer_makes(family, tokenizer, tmp_path):
    # Same tensors, same types (norms, biases and rope factors kept in float32) and the same bytes as
    # llama.cpp's quantizer makes from the f32 file: the only difference from f32 is Q8_0's own rounding.
    model = random_model(family, tmp_path / "model", tokenizer, std=0.02)
    ours = save_gguf(model, str(tmp_path / "out"), tokenizer, "q8_0")
    f32 = save_gguf(model, str(tmp_path / "out"), tokenizer, "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    theirs = str(tmp_path / "llama_cpp_q8_0.gguf")
    assert llama_cpp.llama_model_quantize(f32.encode(), theirs.encode(), params) == 0
    ours_tensors = {t.name: t for t in GGUFReader(ours).tensors}
    theirs_tensors = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(ours_tensors) == sorted(theirs_tensors)
    assert ours_tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    for name, mine in ours_tensors.items():
        other = theirs_tensors[name]
        assert mine.tensor_type == other.tensor_type, name
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(other.data).view(np.uint8)), name


@pytest.mark.parametrize("family", Q8_0_FAMILIES)
def test_q8_0_files_pick_velotunes_next_token(family, tokenizer, tmp_path):
    # Q8_0 rounds weights to 1/254 of each 32-block's largest value and llama.cpp rounds activations the same
    # way before each product: 0.3-0.4% of the logit range at the median position, 0.8-1.5% at the worst.
    # A random model's top two logits are often closer than that (median gap 4-5% of the range, 10th
    # percentile 0.6-0.9%), so 1-4% of its positions flip (Gemma 2's sandwich norms add the most rounding).
    # A model that has learned its text has a clear top token as trained LMs do (median gap 2-3 logits,
    # 12-19% of the range), and the top token stays put. Gemma 2 keeps its released caps (50 / 30): a toy
    # cap of 3 pins a trained model's top logits to the cap, a tie no format could break.
    ids = tokenizer(CORPUS).input_ids[:100]
    caps = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0) if family == "gemma2" else {}
    model = random_model(family, tmp_path / "model", tokenizer, std=0.02, learn=ids, **caps)
    ours = velotune_logits(model, ids)
    theirs = llama_cpp_logits(save_gguf(model, str(tmp_path / "out"), tokenizer, "q8_0"), ids)
    assert rel_err(torch.from_numpy(theirs), torch.from_numpy(ours)) < 0.03
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.98


def test_gemma2_without_soft_caps_is_not_capped_by_llama_cpp(tokenizer, tmp_path):
    model = random_model("gemma2", tmp_path / "model", tokenizer, attn_logit_softcapping=None,
                         final_logit_softcapping=None)  # fmt: skip
    ids = prompt_ids(tokenizer)
    theirs = llama_cpp_logits(save_gguf(model, str(tmp_path / "out"), tokenizer, "f32"), ids)
    assert rel_err(torch.from_numpy(theirs), torch.from_numpy(velotune_logits(model, ids))) < 1e-3


def test_bf16_files_run_in_llama_cpp(tokenizer, tmp_path):
    model = random_model("llama", tmp_path / "model", tokenizer)
    ids = prompt_ids(tokenizer)
    path = save_gguf(model, str(tmp_path / "out"), tokenizer, "bf16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    # bfloat16 keeps 8 significant bits: ~0.4% per weight.
    assert (
        rel_err(torch.from_numpy(llama_cpp_logits(path, ids)), torch.from_numpy(velotune_logits(model, ids)))
        < 3e-2
    )


def test_q8_0_writes_rows_its_block_does_not_divide_as_f16(tokenizer, tmp_path):
    model = random_model("llama", tmp_path / "model", tokenizer, std=0.02, intermediate_size=72)
    path = save_gguf(model, str(tmp_path / "out"), tokenizer, "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 72 values: not a multiple of Q8_0's 32
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.ffn_norm.weight"] == "F32"
    ids = prompt_ids(tokenizer)
    assert (
        rel_err(torch.from_numpy(llama_cpp_logits(path, ids)), torch.from_numpy(velotune_logits(model, ids)))
        < 0.06
    )


def test_q4_k_m_is_made_by_llama_cpps_quantizer_and_loads(tokenizer, tmp_path):
    model = random_model("llama", tmp_path / "model", tokenizer, std=0.02)
    path = save_gguf(model, str(tmp_path / "out"), tokenizer, "q4_k_m")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.Q4_K_M.gguf"
    ]  # the f32 source is gone
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    ids = tokenizer(CORPUS).input_ids[:60]
    theirs = llama_cpp_logits(path, ids)
    assert np.isfinite(theirs).all()
    # 64-wide rows are below Q4_K's 256 block, so llama.cpp falls back to its smaller 4/5-bit types.
    assert rel_err(torch.from_numpy(theirs), torch.from_numpy(velotune_logits(model, ids))) < 0.25


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_the_gguf_of_a_lora_model_computes_the_adapted_logits(family, tokenizer, tmp_path):
    model = random_model(family, tmp_path / "model", tokenizer)
    # B random too, so that the adapter changes every output; Mixtral's experts and router are adapted.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets += ["gate"] if family == "mixtral" else []
    model = velotune.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=targets, use_gradient_checkpointing=False)  # fmt: skip
    ids = prompt_ids(tokenizer)
    ours = torch.from_numpy(velotune_logits(model, ids))
    path = model.save_pretrained_gguf(str(tmp_path / "out"), tokenizer, quantization_method="f32")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "model.F32.gguf"]
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./model.F32.gguf\n")
    assert rel_err(torch.from_numpy(llama_cpp_logits(path, ids)), ours) < 1e-4
    assert torch.equal(torch.from_numpy(velotune_logits(model, ids)), ours)  # merged into copies only


def byte_level_tokenizer(folder, split_pattern: str | None):
    """A byte-level BPE tokenizer that pre-splits with `split_pattern` (None: GPT-2's, inside ByteLevel)."""
    tok = Tokenizer(models.BPE())
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS.splitlines() + [MIXED] * 3, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")  # fmt: skip
    fast.save_pretrained(str(folder))
    return fast


@pytest.mark.parametrize("pre", sorted(set(PRE_TOKENIZER_BY_PATTERN.values())))
def test_llama_cpp_tokenizes_like_the_hugging_face_tokenizer(pre, tmp_path):
    pattern = next(p for p, name in PRE_TOKENIZER_BY_PATTERN.items() if name == pre)
    tok = byte_level_tokenizer(tmp_path / "tok", None if pre == "gpt-2" else pattern)
    tok.save_pretrained(str(tmp_path / "model"))
    config = transformers.LlamaConfig(
        **{**COMMON, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1}
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "model"))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path / "model"), dtype=torch.float32,
                                                          device_map="cpu", progress=False)  # fmt: skip
    path = save_gguf(model, str(tmp_path / "out"), tok, "f16")
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    texts = [
        MIXED,
        CORPUS,
        "  leading spaces and trailing  ",
        "x" * 40 + " 0123456789 1,000,000",
        "über\r\nnaïve🦙🦙",
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids, text
        assert llm.detokenize(tok(text).input_ids).decode() == text


SPACE = "\u2581"


def sentencepiece_style_tokenizer(folder, style: str):
    """A Llama-2-like tokenizer.json: "\u2581" for spaces, byte-fallback tokens <0x00>..<0xFF> in the vocabulary,
    BOS added; spaces marked by normalizers (Transformers 4's export) or a Metaspace pre-tokenizer (5's)."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    trained.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if style == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(str(folder))
    return fast


@pytest.mark.parametrize("style", ["normalizer", "metaspace"])
def test_sentencepiece_style_tokenizers_tokenize_alike_in_llama_cpp(style, tmp_path):
    tok = sentencepiece_style_tokenizer(tmp_path / "model", style)
    small = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "vocab_size": len(tok) + 3}
    config = transformers.LlamaConfig(**{**COMMON, **small})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "model"))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path / "model"), dtype=torch.float32,
                                                          device_map="cpu", progress=False)  # fmt: skip
    path = save_gguf(model, str(tmp_path / "out"), tok, "f16")
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.token_type"].contents()[3 + 0xE2] == 6  # <0xE2>: a byte token
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    # Metaspace's "first" scheme adds no space before text that starts with one; llama.cpp always adds it,
    # so texts with leading spaces are left to the normalizer style.
    texts = [MIXED, CORPUS, "\u00fcber\r\nna\u00efve\U0001f999\U0001f999 x=1", "Hello world"]
    texts += ["  leading spaces and trailing  "] if style == "normalizer" else []
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text).input_ids, text


def test_metadata_carries_special_tokens_chat_template_and_unused_rows(tokenizer, tmp_path):
    model = random_model("qwen2", tmp_path / "model", tokenizer)
    fields = GGUFReader(save_gguf(model, str(tmp_path / "out"), tokenizer, "f16")).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == ROWS and tokens[len(tokenizer)] == f"[PAD{len(tokenizer)}]"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.chat_template"].contents() == CHATML
    types = fields["tokenizer.ggml.token_type"].contents()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert types[im_end] == 3 and types[10] == 1 and types[len(tokenizer)] == 5  # control, normal, unused


def test_a_model_llama_cpp_cannot_run_is_refused_with_the_reason(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**COMMON, "num_attention_heads": 4}, head_dim=24)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu",
                                                          progress=False)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="heads x head_dim != hidden_size"):
        arch_for(model.spec)


def test_sliding_window_llama_cpp_ignores_is_warned_about(tokenizer, tmp_path, caplog):
    config = transformers.MistralConfig(**COMMON, sliding_window=8)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu",
                                                          progress=False)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        arch_for(model.spec)
    assert "sliding window of 8 tokens" in caplog.text
