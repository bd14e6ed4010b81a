"""A Hugging Face fast tokenizer as llama.cpp's GGUF vocabulary.

Two kinds are written, read from the tokenizer's own tokenizer.json:
- byte-level BPE (GPT-2, Llama 3, Qwen 2): tokenizer model "gpt2" with its merges and the
  llama.cpp pre-tokenizer that applies the same split pattern;
- SentencePiece-style BPE ("▁" for spaces, byte fallback: Llama 2, Mistral, Gemma): tokenizer model
  "llama", where llama.cpp merges the adjacent pair whose result scores highest, so each token's
  score is minus the rank of the merge that makes it.
A split pattern llama.cpp does not implement is refused: a GGUF that tokenizes differently from
the model's training would degrade every answer without an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from gguf.constants import TokenType

from velotune.errors import UnsupportedModelError
from velotune.export.gguf_names import (
    BYTE_LEVEL_BPE,
    GPT2_PATTERN,
    PRE_TOKENIZER_BY_PATTERN,
    SENTENCEPIECE,
)

logger = logging.getLogger(__name__)

SPACE_MARK = "\u2581"  # SentencePiece's visible space


@dataclass
class GGUFVocab:
    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            f"{type(tokenizer).__name__} has no tokenizer.json (it is a slow tokenizer); GGUF export needs a fast "
            "tokenizer: load it with AutoTokenizer.from_pretrained(folder) from a folder with tokenizer.json."
        )
    return json.loads(backend.to_str())


def _flatten(component: dict | None) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        items = component.get("pretokenizers") or component.get("normalizers") or []
        return [leaf for item in items for leaf in _flatten(item)]
    return [component]


def _pattern_of(split: dict) -> str | None:
    pattern = split.get("pattern", {})
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _byte_level_pre(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose split equals this tokenizer's, or an error naming it."""
    parts = _flatten(spec.get("pre_tokenizer"))
    byte_level = [p for p in parts if p["type"] == "ByteLevel"]
    splits = [p for p in parts if p["type"] == "Split"]
    others = [p["type"] for p in parts if p["type"] not in ("ByteLevel", "Split")]
    if byte_level and byte_level[0].get("add_prefix_space"):
        raise UnsupportedModelError(
            "byte-level BPE with add_prefix_space=True has no llama.cpp pre-tokenizer."
        )
    patterns = [_pattern_of(s) for s in splits]
    if byte_level and byte_level[0].get("use_regex", True):
        patterns.append(GPT2_PATTERN)
    if others or len(patterns) != 1 or patterns[0] not in PRE_TOKENIZER_BY_PATTERN:
        raise UnsupportedModelError(
            f"this tokenizer pre-splits text with {patterns or others or 'nothing'}; llama.cpp implements the "
            f"splits of {sorted(set(PRE_TOKENIZER_BY_PATTERN.values()))} only, and a GGUF that splits "
            "differently would tokenize differently. Export the merged Hugging Face folder instead."
        )
    if _flatten(spec.get("normalizer")) and [n["type"] for n in _flatten(spec.get("normalizer"))] != ["NFC"]:
        logger.warning("the tokenizer normalizes text (%s); llama.cpp does not.", spec.get("normalizer"))
    return PRE_TOKENIZER_BY_PATTERN[patterns[0]]


def _is_sentencepiece_style(spec: dict) -> bool:
    model = spec.get("model", {})
    pre = _flatten(spec.get("pre_tokenizer"))
    norm = _flatten(spec.get("normalizer"))
    marks_spaces = any(p["type"] == "Metaspace" for p in pre) or any(
        n["type"] == "Replace" and n.get("content") == SPACE_MARK for n in norm
    )
    return model.get("type") == "BPE" and marks_spaces


def _prepends_space(spec: dict) -> bool:
    # llama.cpp prepends its space to every text; Metaspace's "first" scheme skips texts that already start
    # with a space, so those two tokenize a leading space differently (one token more in llama.cpp).
    for p in _flatten(spec.get("pre_tokenizer")):
        if p["type"] == "Metaspace":
            return (
                p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True) is not False
            )
    return any(
        n["type"] == "Prepend" and n.get("prepend") == SPACE_MARK for n in _flatten(spec.get("normalizer"))
    )


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds(tokenizer, token_id: int | None, position: int) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return (
        bool(ids) and ids[position] == token_id and tokenizer("a", add_special_tokens=False).input_ids != ids
    )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoding with its BOS token (llama.cpp is told to do the same)."""
    return _adds(tokenizer, getattr(tokenizer, "bos_token_id", None), 0)


def vocab_from_tokenizer(tokenizer, vocab_size: int, config: dict | None = None) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model with `vocab_size` embedding rows.

    Ids the tokenizer does not use (embedding rows padded to a round size) become unused
    placeholder tokens, as llama.cpp requires one token per row.
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"tokenizer model {model.get('type')!r} is not supported for GGUF export (BPE tokenizers are)."
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UnsupportedModelError(
            f"the tokenizer has token id {max(by_id)} but the model has {vocab_size} embedding rows; "
            "resize the model's embeddings to the tokenizer first."
        )
    added = tokenizer.added_tokens_decoder
    sentencepiece = _is_sentencepiece_style(spec)
    merges = _merge_strings(model.get("merges", []))
    rank_of_token = {}
    if sentencepiece:
        for rank, merge in enumerate(merges):
            rank_of_token.setdefault(merge.replace(" ", ""), rank)

    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif sentencepiece and token == model.get("unk_token"):
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
        scores.append(-float(rank_of_token[token]) if token in rank_of_token else 0.0)

    config = config or {}
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None:
            value = config.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            special[kind] = int(value)
    template = getattr(tokenizer, "chat_template", None)
    vocab = GGUFVocab(
        model=SENTENCEPIECE if sentencepiece else BYTE_LEVEL_BPE,
        tokens=tokens,
        types=[int(t) for t in types],
        special_ids=special,
        add_bos=_adds(tokenizer, special.get("bos"), 0),
        add_eos=_adds(tokenizer, special.get("eos"), -1),
        chat_template=template if isinstance(template, str) else None,
    )
    if sentencepiece:
        if not model.get("byte_fallback"):
            logger.warning(
                "SentencePiece-style tokenizer without byte fallback: llama.cpp will map unknown bytes to <unk>."
            )
        vocab.scores = scores
        vocab.add_space_prefix = _prepends_space(spec)
    else:
        vocab.pre = _byte_level_pre(spec)
        vocab.merges = merges
    return vocab


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Adds the tokenizer.ggml.* keys (names from the gguf package's writer) to a GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        setters[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
