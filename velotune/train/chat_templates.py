"""Built-in chat templates, for tokenizers that have none or the wrong one.

Each template is Jinja text in the form Transformers' `apply_chat_template` renders, so a built-in
template and a tokenizer's own template go through the same code path everywhere else (rendering,
response-only masking, generation prompts). The texts follow the formats each model family was
trained with; where a family has no system role (Gemma, Mistral) the system message is folded
into the first user turn, as their official templates recommend.
"""

from __future__ import annotations

import difflib
import logging

from velotune.errors import ConfigError

logger = logging.getLogger(__name__)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_CHATML = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _CHATML
)

# The system text, when present, leads the first user turn (Mistral and Gemma have no system role).
_FOLD_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
)

_MISTRAL = (
    _FOLD_SYSTEM + "{{ bos_token }}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "[INST] {% if loop.first and system %}{{ system }}\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

_GEMMA = (
    _FOLD_SYSTEM + "{{ bos_token }}"
    "{% for m in turns %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.first and system %}{{ system }}\n\n{% endif %}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_PHI3 = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "llama-3": _LLAMA3,
    "chatml": _CHATML,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "phi-3": _PHI3,
    "qwen-2.5": _QWEN25,
}

# The token that closes an assistant turn: generation stops there.
END_OF_TURN: dict[str, str | None] = {
    "llama-3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "mistral": None,  # the tokenizer's eos_token
    "gemma": "<end_of_turn>",
    "phi-3": "<|end|>",
    "qwen-2.5": "<|im_end|>",
}

# Markers that should be single tokens; where they are not, the template still works, just longer.
_MARKERS: dict[str, tuple[str, ...]] = {
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    "qwen-2.5": ("<|im_start|>", "<|im_end|>"),
}

_ALIASES = {
    "llama3": "llama-3", "llama31": "llama-3", "llama32": "llama-3", "llama33": "llama-3",
    "chatml": "chatml", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma",
    "phi3": "phi-3", "phi35": "phi-3", "qwen25": "qwen-2.5", "qwen2": "qwen-2.5",
}  # fmt: skip


def template_name(name: str) -> str:
    """The canonical built-in name for `name` ("Llama-3.1", "qwen2.5" ... are accepted)."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown chat template {name!r}; built-in templates: {', '.join(TEMPLATES)}.{hint}")


def get_chat_template(tokenizer, name: str):
    """Sets one of the built-in chat templates on `tokenizer` (in place) and returns the tokenizer.

    Args:
        tokenizer: a Transformers tokenizer.
        name: one of "llama-3", "chatml", "mistral", "gemma", "phi-3", "qwen-2.5".
    """
    canonical = template_name(name)
    vocab = tokenizer.get_vocab()
    split = [m for m in _MARKERS[canonical] if m not in vocab]
    if split:
        logger.warning(
            "the tokenizer has no single tokens for %s; the %s template still works but each marker costs several "
            "tokens. Use the model's own tokenizer, or add them with tokenizer.add_special_tokens and resize the "
            "embeddings.",
            ", ".join(split),
            canonical,
        )
    tokenizer.chat_template = TEMPLATES[canonical]
    return tokenizer


def end_of_turn_id(tokenizer) -> int | None:
    """The id that ends an assistant turn under the tokenizer's chat template (its eos when unknown)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN.values():
        if marker is not None and marker in template and marker in vocab:
            return vocab[marker]
    return tokenizer.eos_token_id
