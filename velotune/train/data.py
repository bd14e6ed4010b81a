"""Training data: read rows, recognise their shape, render chat templates, tokenize, mask labels.

Rows come from JSONL / JSON / CSV / Parquet files, Hugging Face `datasets` objects or plain lists
of dicts, in one of four shapes:

    text       {"text": "..."}
    alpaca     {"instruction": "...", "input": "...", "output": "..."}   ("input" optional)
    messages   {"messages": [{"role": "user", "content": "..."}, ...]}
    sharegpt   {"conversations": [{"from": "human", "value": "..."}, ...]}

Every problem with a row (missing field, unknown role, too long) is reported as a `DataError`
naming the file and line (or row) before any training starts.

Response-only labels are found from the rendered text, not from per-template marker strings: for
assistant turn i, the template is rendered for the turns before it plus the generation prompt, and
for the turns up to and including it; the characters between the two renderings are the assistant's
(its reply and the template's end-of-turn). Tokens whose last character falls there keep their labels.
This works for any template whose rendering of a prefix of the conversation is a prefix of the
whole rendering, which holds for every built-in template and the common model templates.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from velotune.errors import ConfigError, DataError
from velotune.train.chat_templates import get_chat_template

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "alpaca", "messages", "sharegpt")
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "system": "system",
}  # fmt: skip
_ROLES = ("system", "user", "assistant")
_ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request."


@dataclass
class Row:
    where: str  # "data.jsonl line 12" / "row 12": how an error names this row
    fields: Mapping


# ---------------------------------------------------------------------------------------------- reading


def _rows_from_file(path: str) -> list[Row]:
    if not os.path.isfile(path):
        raise DataError(
            f"data file not found: {path!r}. Check the path (relative paths start at {os.getcwd()!r})."
        )
    name = os.path.basename(path)
    ext = name.lower().rsplit(".", 1)[-1]
    if ext == "jsonl":
        return _rows_from_jsonl(path, name)
    if ext == "json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _rows_from_jsonl(path, name)  # many ".json" files are JSON Lines
        if isinstance(data, Mapping):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(
                    f"{path}: expected a JSON list of objects (or one object holding one such list)."
                )
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
        return [_checked(Row(f"{name} item {i}", r)) for i, r in enumerate(data)]
    if ext == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            # Line 1 is the header, so data row i sits on line i + 2 (for rows without embedded newlines).
            return [Row(f"{name} line {i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
    if ext == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`).") from exc
        return [Row(f"{name} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unknown data file type {ext!r}; use .jsonl, .json, .csv or .parquet.")


def _rows_from_jsonl(path: str, name: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(_checked(Row(f"{name} line {line_no}", json.loads(line))))
            except json.JSONDecodeError as exc:
                raise DataError(f"{name} line {line_no}: not valid JSON ({exc.msg}).") from None
    return rows


def _checked(row: Row) -> Row:
    if not isinstance(row.fields, Mapping):
        raise DataError(f"{row.where}: expected a JSON object, got {type(row.fields).__name__}.")
    return row


def read_rows(source) -> list[Row]:
    """Rows of a file path, a Hugging Face `datasets.Dataset`, or a sequence of dicts."""
    if isinstance(source, (str, os.PathLike)):
        return _rows_from_file(os.fspath(source))
    if hasattr(source, "column_names") and isinstance(getattr(source, "column_names"), Mapping):
        raise DataError(
            f"got a DatasetDict with splits {list(source.column_names)}; pass one split, e.g. ds['train']."
        )
    if isinstance(source, Iterable):
        return [_checked(Row(f"row {i}", r)) for i, r in enumerate(source)]
    raise DataError(f"cannot read training data from {type(source).__name__}; pass a file path, a datasets.Dataset "
                    "or a list of dicts.")  # fmt: skip


# ------------------------------------------------------------------------------------------ row shapes


def detect_format(row: Row) -> str:
    keys = set(row.fields)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.where}: cannot tell the data shape from fields {sorted(keys)}; expected 'text', 'instruction' + "
        "'output' (Alpaca), 'messages' or 'conversations' (ShareGPT). Set the format and field explicitly."
    )


def _field(row: Row, key: str, kind: type = str, optional: bool = False):
    value = row.fields.get(key)
    if value is None:
        if optional:
            return kind()
        raise DataError(f"{row.where}: missing field {key!r} (fields present: {sorted(row.fields)}).")
    if not isinstance(value, kind):
        raise DataError(f"{row.where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}.")
    return value


def row_messages(row: Row, fmt: str) -> list[dict]:
    """The row as a chat: a list of {"role", "content"} dicts."""
    if fmt == "alpaca":
        instruction = _field(row, "instruction")
        extra = _field(row, "input", optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _field(row, "output")}]
    if fmt == "messages":
        turns, role_key, content_key, roles = _field(row, "messages", list), "role", "content", None
    elif fmt == "sharegpt":
        turns, role_key, content_key, roles = (
            _field(row, "conversations", list),
            "from",
            "value",
            _SHAREGPT_ROLES,
        )
    else:
        raise ConfigError(f"format {fmt!r} is not a chat format")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise DataError(
                f"{row.where}: turn {i} needs {role_key!r} and {content_key!r} keys, got {turn!r}."
            )
        role = turn[role_key]
        role = roles.get(role) if roles is not None else role
        if role not in _ROLES:
            raise DataError(
                f"{row.where}: turn {i} has role {turn[role_key]!r}; expected one of {list(_ROLES)}."
            )
        if not isinstance(turn[content_key], str):
            raise DataError(f"{row.where}: turn {i} content should be a string.")
        messages.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: the conversation has no assistant turn, so there is nothing to learn.")
    return messages


# ------------------------------------------------------------------------------------------- rendering


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of its assistant turns (reply + end-of-turn)."""

    def render(msgs, prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(render(messages[:i], True), text) if i else 0
        end = _common_prefix(render(messages[: i + 1], False), text)
        if end > start:
            spans.append((start, end))
    return text, spans


def _alpaca_text(row: Row) -> tuple[str, str]:
    instruction, extra = _field(row, "instruction"), _field(row, "input", optional=True)
    if extra.strip():
        head = _ALPACA_HEAD.format(", paired with an input that provides further context")
        prompt = f"{head}\n\n### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n"
    else:
        prompt = f"{_ALPACA_HEAD.format('')}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    return prompt, _field(row, "output")


# ------------------------------------------------------------------------------------------ tokenizing


class TokenizedDataset:
    """Token ids and labels of every example, stored flat (int32) with offsets: compact at any size.

    `ds[i]` is {"input_ids": LongTensor, "labels": LongTensor}, the form the collators and
    transformers.Trainer take.
    """

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, where: list[str]):
        self.ids, self.labels, self.offsets, self.where = ids, labels, offsets, where

    @classmethod
    def from_examples(
        cls, examples: Sequence[tuple[Sequence[int], Sequence[int]]], where: list[str] | None = None
    ):
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for e, _ in examples for t in e), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for _, e in examples for t in e), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, labels, offsets, where or [f"row {i}" for i in range(len(examples))])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": torch.from_numpy(self.ids[a:b].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[a:b].astype(np.int64)),
        }

    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _label_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens whose last character lies in a span (zero-width tokens: whose position does).

    Judging by the last character keeps a token that straddles a reply's start (e.g. SentencePiece's
    "▁Paris" whose space belongs to the template) and drops one that straddles its end, which is
    the next turn's header: a span's end can overshoot into it by a character or two when the two
    renderings happen to agree there ("</s>" vs "<|user|>" share "<").
    """
    keep = np.zeros(len(offsets), dtype=bool)
    last = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    for a, b in spans:
        keep |= (last >= a) & (last < b)
    return keep


def _tokenize_with_offsets(tokenizer, texts: list[str]):
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("response-only labels need a fast tokenizer (offset mappings); load the model's "
                          "tokenizer.json, or set train_on_responses_only=False.")  # fmt: skip
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def prepare_dataset(
    source,
    tokenizer,
    *,
    max_seq_length: int | None,
    format: str = "auto",
    text_field: str = "text",
    chat_template: str | None = None,
    train_on_responses_only: bool = True,
    batch_rows: int = 1000,
) -> TokenizedDataset:
    """Reads, renders and tokenizes `source`, ready for the trainer.

    Args:
        source: a path (.jsonl/.json/.csv/.parquet), a `datasets.Dataset`, or a sequence of dicts.
        tokenizer: the model's (fast) tokenizer.
        max_seq_length: a longer example is a DataError (None: no limit).
        format: "auto" (from the first row), "text", "alpaca", "messages" or "sharegpt".
        text_field: the field holding plain text, for the "text" format.
        chat_template: a built-in template name to set on the tokenizer (see `get_chat_template`);
            None keeps the tokenizer's own.
        train_on_responses_only: labels only on assistant replies (chat / Alpaca rows).
    """
    rows = read_rows(source)
    if not rows:
        raise DataError("the training data has no rows.")
    if format == "auto":
        format = "text" if text_field != "text" and text_field in rows[0].fields else detect_format(rows[0])
    if format not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}; use 'auto' or one of {list(FORMATS)}.")
    if chat_template is not None:
        get_chat_template(tokenizer, chat_template)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if format in ("messages", "sharegpt") and not has_template:
        raise ConfigError("chat data needs a chat template and the tokenizer has none; set chat_template to one "
                          "of 'llama-3', 'chatml', 'mistral', 'gemma', 'phi-3', 'qwen-2.5'.")  # fmt: skip

    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    eos = tokenizer.eos_token_id
    examples, where = [], []
    for chunk_start in range(0, len(rows), batch_rows):
        chunk = rows[chunk_start : chunk_start + batch_rows]
        texts, spans = [], []
        for row in chunk:
            if format == "text":
                text = _field(row, text_field)
                texts.append(text)
                spans.append(None)
            elif format == "alpaca" and not has_template:
                prompt, answer = _alpaca_text(row)
                eos_text = tokenizer.eos_token or ""
                texts.append(prompt + answer + eos_text)
                spans.append([(len(prompt), len(prompt) + len(answer) + len(eos_text))])
            else:
                text, turn_spans = render_chat(tokenizer, row_messages(row, format))
                texts.append(text)
                spans.append(turn_spans)
        ids_list, offsets_list = _tokenize_with_offsets(tokenizer, texts)
        for row, ids, offsets, row_spans in zip(chunk, ids_list, offsets_list, spans):
            ids = np.asarray(ids, dtype=np.int64)
            if row_spans is None:  # plain text: the tokenizer's own BOS choice, then an EOS to learn stopping
                head = [bos] if adds_bos else []
                tail = [eos] if eos is not None else []
                ids = np.concatenate(
                    [np.asarray(head, dtype=np.int64), ids, np.asarray(tail, dtype=np.int64)]
                )
                labels = ids.copy()
            elif train_on_responses_only:
                keep = _label_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), row_spans)
                labels = np.where(keep, ids, IGNORE_INDEX)
            else:
                labels = ids.copy()
            if len(ids):
                labels[0] = IGNORE_INDEX  # no token predicts the first one
            examples.append((ids, labels))
            where.append(row.where)

    _check_lengths(examples, where, max_seq_length)
    dropped = [i for i, (_, labels) in enumerate(examples) if not (labels != IGNORE_INDEX).any()]
    if dropped:
        if len(dropped) == len(examples):
            raise DataError("no row has a token to learn from (every label is masked).")
        logger.warning("dropped %d of %d rows with no label tokens (first: %s)", len(dropped), len(examples),
                       where[dropped[0]])  # fmt: skip
        gone = set(dropped)
        examples = [e for i, e in enumerate(examples) if i not in gone]
        where = [w for i, w in enumerate(where) if i not in gone]
    return TokenizedDataset.from_examples(examples, where)


def _check_lengths(examples, where: list[str], max_seq_length: int | None) -> None:
    if max_seq_length is None:
        return
    long = [i for i, (ids, _) in enumerate(examples) if len(ids) > max_seq_length]
    if long:
        shown = ", ".join(f"{where[i]} ({len(examples[i][0])} tokens)" for i in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        raise DataError(
            f"{len(long)} example(s) longer than max_seq_length={max_seq_length}: {shown}{more}. Shorten or drop "
            "them, or load the model with a larger max_seq_length."
        )
