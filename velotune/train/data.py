"""Training data: read rows, recognise their shape, render chat templates, tokenize, mask labels.

Rows come from JSONL / JSON / CSV / Parquet files, Hugging Face `datasets` objects or plain lists
of dicts, in one of four shapes:

    text       {"text": "..."}
    alpaca     {"instruction": "...", "input": "...", "output": "..."}   ("input" optional)
    messages   {"messages": [{"role": "user", "content": "..."}, ...]}
    sharegpt   {"conversations": [{"from": "human", "value": "..."}, ...]}

Every problem with a row is found before any training starts, and named by where the row lives:
"data.jsonl line 12" (JSON Lines and CSV: the 1-based line of the file), "data.json item 3" and
"data.parquet row 3" (0-based index in the file), "row 3" (0-based index of a list or dataset).

    empty file or no rows             DataError naming the file
    a line that is not JSON / UTF-8   DataError naming the line
    missing or non-string field       DataError naming the row and field
    unknown role, role not a string   DataError naming the row and turn
    roles that do not alternate       DataError naming the row and the turns (a conversation is an
                                      optional system turn, then user and assistant turns in
                                      alternation: two user or two assistant turns in a row are an
                                      error, not merged, since merging would change what is learnt)
    no assistant turn                 DataError naming the row
    template refuses the chat         DataError naming the row, with the template's message
    longer than max_seq_length        `overlong`: "truncate" (default: keep the first max_seq_length
                                      tokens), "drop", or "error"; counted and logged
    every label masked                dropped (it would add nothing to the loss), counted and logged;
                                      a DataError if no row is left

Row errors are collected over the whole data and raised together (the count and the first ten), so
one pass finds every broken row. What was truncated or dropped is in the returned dataset's
`stats` (a `DataStats`), and logged.

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
from dataclasses import dataclass, field

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
OVERLONG = ("truncate", "drop", "error")
_SHOWN = 10  # row errors and examples of dropped rows shown in a message
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
        rows = _rows_from_jsonl(path, name)
    elif ext == "json":
        rows = _rows_from_json(path, name)
    elif ext == "csv":
        rows = _rows_from_csv(path, name)
    elif ext == "parquet":
        rows = _rows_from_parquet(path, name)
    else:
        raise DataError(f"{path}: unknown data file type {ext!r}; use .jsonl, .json, .csv or .parquet.")
    if not rows:
        raise DataError(f"{path} holds no rows (the file is empty, or blank lines / a header only).")
    return rows


def _rows_from_jsonl(path: str, name: str) -> list[Row]:
    rows = []
    # Bytes, decoded line by line, so that a bad byte is reported at its line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{name} line {line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                raise DataError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}).") from None
            rows.append(_checked(Row(where, fields)))
    return rows


def _rows_from_json(path: str, name: str) -> list[Row]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _rows_from_jsonl(path, name)  # many ".json" files are JSON Lines
    if isinstance(data, Mapping):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or one object holding one such list).")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
    return [_checked(Row(f"{name} item {i}", r)) for i, r in enumerate(data)]


def _rows_from_csv(path: str, name: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            # reader.line_num is the file line the row ended on (rows may hold quoted newlines).
            for r in reader:
                rows.append(Row(f"{name} line {reader.line_num}", r))
        except UnicodeDecodeError as exc:
            raise DataError(f"{name} near line {reader.line_num + 1}: not UTF-8 text ({exc.reason}).") from None
        except csv.Error as exc:
            raise DataError(f"{name} line {reader.line_num}: not valid CSV ({exc}).") from None
    return rows


def _rows_from_parquet(path: str, name: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`).") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError) on a corrupt or non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}).") from exc
    return [Row(f"{name} row {i}", r) for i, r in enumerate(table.to_pylist())]


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
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
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
    """The row as a chat: a list of {"role", "content"} dicts, checked as the module docstring says."""
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
            raise DataError(f"{row.where}: turn {i} needs {role_key!r} and {content_key!r} keys, got {turn!r:.200}.")
        given = turn[role_key]
        role = (roles.get(given) if roles is not None else given) if isinstance(given, str) else None
        if role not in _ROLES:
            expected = sorted(roles) if roles is not None else list(_ROLES)
            raise DataError(f"{row.where}: turn {i} has role {given!r:.100}; expected one of {expected}.")
        if not isinstance(turn[content_key], str):
            raise DataError(
                f"{row.where}: turn {i} {content_key!r} should be a string, got {type(turn[content_key]).__name__}."
            )
        messages.append({"role": role, "content": turn[content_key]})
    _check_turn_order(row, messages)
    return messages


def _check_turn_order(row: Row, messages: list[dict]) -> None:
    """An optional system turn first, then user and assistant turns alternating, with at least one
    assistant turn. Consecutive same-role turns are refused rather than merged: joining them needs a
    separator the data did not choose, and two assistant turns in a row would train on a reply the
    model never sees asked for."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise DataError(f"{row.where}: turn {i} is a system turn; only the first turn may be one.")
        if i > 0 and m["role"] == messages[i - 1]["role"]:
            raise DataError(
                f"{row.where}: turns {i - 1} and {i} are both {m['role']!r}; user and assistant turns must "
                "alternate. Merge or remove one of them."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: the conversation has no assistant turn, so there is nothing to learn.")


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


@dataclass
class DataStats:
    """What `prepare_dataset` did with the rows it read: `rows` read, `examples` kept, and where (the
    row names of) every example it truncated or dropped."""

    rows: int
    examples: int
    truncated: list[str] = field(default_factory=list)  # longer than max_seq_length, cut (overlong="truncate")
    dropped_overlong: list[str] = field(default_factory=list)  # longer than max_seq_length (overlong="drop")
    dropped_unlabelled: list[str] = field(default_factory=list)  # no token to learn from

    def summary(self) -> str:
        parts = [f"{self.examples} of {self.rows} rows kept"]
        for what, rows in (("truncated to max_seq_length", self.truncated),
                           ("dropped as longer than max_seq_length", self.dropped_overlong),
                           ("dropped with every label masked", self.dropped_unlabelled)):  # fmt: skip
            if rows:
                shown = ", ".join(rows[:3]) + (", ..." if len(rows) > 3 else "")
                parts.append(f"{len(rows)} {what} ({shown})")
        return "; ".join(parts)


class TokenizedDataset:
    """Token ids and labels of every example, stored flat (int32) with offsets: compact at any size.

    `ds[i]` is {"input_ids": LongTensor, "labels": LongTensor}, the form the collators and
    transformers.Trainer take.
    """

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        where: list[str],
        stats: DataStats | None = None,
    ):
        self.ids, self.labels, self.offsets, self.where = ids, labels, offsets, where
        self.stats = stats if stats is not None else DataStats(rows=len(where), examples=len(where))

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        where: list[str] | None = None,
        stats: DataStats | None = None,
    ):
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for e, _ in examples for t in e), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for _, e in examples for t in e), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, labels, offsets, where or [f"row {i}" for i in range(len(examples))], stats)

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
    overlong: str = "truncate",
    batch_rows: int = 1000,
) -> TokenizedDataset:
    """Reads, renders and tokenizes `source`, ready for the trainer.

    Args:
        source: a path (.jsonl/.json/.csv/.parquet), a `datasets.Dataset`, or a sequence of dicts.
        tokenizer: the model's (fast) tokenizer.
        max_seq_length: the longest example kept whole (None: no limit).
        format: "auto" (from the first row), "text", "alpaca", "messages" or "sharegpt".
        text_field: the field holding plain text, for the "text" format.
        chat_template: a built-in template name to set on the tokenizer (see `get_chat_template`);
            None keeps the tokenizer's own.
        train_on_responses_only: labels only on assistant replies (chat / Alpaca rows).
        overlong: what to do with an example longer than max_seq_length: "truncate" (keep its first
            max_seq_length tokens, as TRL's SFTTrainer does), "drop" it, or "error". Truncated and
            dropped rows are counted in the result's `stats` and logged.

    Every broken row is reported at once, in one DataError; see the module docstring for the rules.
    Examples with no label left (e.g. a reply cut off by truncation) are dropped, counted and logged.
    """
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong={overlong!r}: use one of {list(OVERLONG)}.")
    if max_seq_length is not None and not (
        isinstance(max_seq_length, int) and not isinstance(max_seq_length, bool) and max_seq_length >= 1
    ):
        raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive integer or None.")
    rows = read_rows(source)
    if not rows:
        raise DataError("the training data has no rows (an empty list or dataset).")
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
    examples, where, problems = [], [], []
    for chunk_start in range(0, len(rows), batch_rows):
        chunk, texts, spans = [], [], []
        for row in rows[chunk_start : chunk_start + batch_rows]:
            try:
                text, row_spans = _render_row(row, format, text_field, tokenizer, has_template)
            except DataError as exc:
                problems.append(str(exc))
                continue
            chunk.append(row)
            texts.append(text)
            spans.append(row_spans)
        if not chunk:
            continue
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
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise DataError(f"{len(problems)} of {len(rows)} rows cannot be used:\n  {shown}{more}")

    stats = DataStats(rows=len(rows), examples=0)
    examples, where = _fit_lengths(examples, where, max_seq_length, overlong, stats)
    kept = [i for i, (_, labels) in enumerate(examples) if (labels != IGNORE_INDEX).any()]
    if len(kept) < len(examples):
        gone = set(range(len(examples))) - set(kept)
        stats.dropped_unlabelled = [where[i] for i in sorted(gone)]
        examples, where = [examples[i] for i in kept], [where[i] for i in kept]
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no row is left to learn from: {stats.summary()}.")
    if stats.truncated or stats.dropped_overlong or stats.dropped_unlabelled:
        logger.warning("training data: %s", stats.summary())
    else:
        logger.info("training data: %s", stats.summary())
    return TokenizedDataset.from_examples(examples, where, stats)


def _render_row(row: Row, format: str, text_field: str, tokenizer, has_template: bool):
    """(text, assistant spans or None for plain text) of one row; DataError names the row."""
    if format == "text":
        return _field(row, text_field), None
    if format == "alpaca" and not has_template:
        prompt, answer = _alpaca_text(row)
        eos_text = tokenizer.eos_token or ""
        return prompt + answer + eos_text, [(len(prompt), len(prompt) + len(answer) + len(eos_text))]
    messages = row_messages(row, format)
    try:
        return render_chat(tokenizer, messages)
    except Exception as exc:  # Jinja's TemplateError (raise_exception in the template) and kin
        raise DataError(
            f"{row.where}: the chat template cannot render this conversation ({type(exc).__name__}: {exc})."
        ) from exc


def _fit_lengths(examples, where: list[str], max_seq_length: int | None, overlong: str, stats: DataStats):
    """Applies `overlong` to the examples longer than max_seq_length, recording what it did in `stats`."""
    if max_seq_length is None:
        return examples, where
    long = [i for i, (ids, _) in enumerate(examples) if len(ids) > max_seq_length]
    if not long:
        return examples, where
    if overlong == "error":
        shown = ", ".join(f"{where[i]} ({len(examples[i][0])} tokens)" for i in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        raise DataError(
            f"{len(long)} example(s) longer than max_seq_length={max_seq_length}: {shown}{more}. Shorten or drop "
            "them, set overlong='truncate' or 'drop', or load the model with a larger max_seq_length."
        )
    if overlong == "drop":
        stats.dropped_overlong = [where[i] for i in long]
        gone = set(long)
        return [e for i, e in enumerate(examples) if i not in gone], [w for i, w in enumerate(where) if i not in gone]
    stats.truncated = [where[i] for i in long]
    out = list(examples)
    for i in long:
        ids, labels = examples[i]
        out[i] = (ids[:max_seq_length], labels[:max_seq_length])
    return out, where
