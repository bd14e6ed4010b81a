"""Small random models of every supported family, built with Transformers' own classes and saved
in Hugging Face format (sharded), for tests that load them back through velotune.

Sizes are deliberately odd: head_dim differs from hidden/heads, kv heads differ from heads, the
vocabulary is not a multiple of 64.
"""

from __future__ import annotations

import os

import torch
import transformers

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=20,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _rope_longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [1.5 + 0.2 * i for i in range(half)],
        "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    }


FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    ),  # fmt: skip
    "llama_tied_bias": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, hidden_act="gelu_pytorch_tanh"),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**COMMON, "num_hidden_layers": 3},
        sliding_window=5,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "phi3": lambda: transformers.Phi3Config(
        **{k: v for k, v in COMMON.items() if k != "head_dim"},
        original_max_position_embeddings=8,
        rope_parameters=_rope_longrope(48 // 6),
    ),
    "phi3_partial": lambda: transformers.Phi3Config(
        **{k: v for k, v in COMMON.items() if k != "head_dim"},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        sliding_window=6,
    ),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
}


# Models whose projection widths are whole 4-bit quantization blocks (64) and whose LoRA ranks can sum to
# multiples of 8: the shapes at which a 4-bit projection folds its LoRA into the base GEMM
# (velotune.kernels.lora.fold_width), as every real checkpoint's do. Not in FAMILY_CONFIGS: the
# family is Llama's, which every test over the families already covers.
ALIGNED_CONFIGS = {
    "llama_aligned": lambda: transformers.LlamaConfig(
        **{**COMMON, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
    ),
}


def build_hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = {**FAMILY_CONFIGS, **ALIGNED_CONFIGS}[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    # Transformers' init leaves norms at 1 (Gemma's at 0) and biases at 0; randomise every parameter
    # so that a swapped or ignored tensor cannot go unnoticed.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "layernorm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in name else 1.0))
            elif pname.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(name: str, folder: str, seed: int = 0, shard_size: str = "40KB"):
    model = build_hf_model(name, seed)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return model


def random_batch(batch: int, seq: int, seed: int, padding: str | None = None):
    """input_ids, attention_mask (or None) and labels (-100 at padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    if padding is None:
        return ids, None, ids.clone()
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = (row * 3 + 1) % (seq - 2)
        if padding == "left":
            mask[row, :pad] = 0
        else:
            mask[row, seq - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        # The first real token would be predicted from a padding position, whose output no library
        # defines (a query that may attend nothing); a real collator masks it, and so do we.
        first = mask.argmax(dim=1)
        labels[torch.arange(batch), first] = -100
    return ids, mask, labels


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of `batch`: the loss and a copy of every gradient, by parameter name."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def shard_count(folder: str) -> int:
    return sum(name.endswith(".safetensors") for name in os.listdir(folder))


def velotune_lora_model(
    folder: str,
    dropout: float = 0.0,
    load_in_4bit: bool = False,
    seed: int = 1,
    r: int = 4,
    lora_alpha: float = 8,
):
    """A float32 CPU velotune model from `folder` with rank-r LoRA on every linear, in training mode, its
    B factors random (B starts at zero, which would hide the B side of the math)."""
    import velotune

    base, _ = velotune.FastLanguageModel.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu", load_in_4bit=load_in_4bit, progress=False
    )
    model = velotune.FastLanguageModel.get_peft_model(
        base,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        use_gradient_checkpointing=False,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.train()
