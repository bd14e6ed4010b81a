"""Data shapes, chat templates and response-only labels, checked token by token against the text."""

import json

import pytest

import velotune
from tests.train.helpers import build_tokenizer
from velotune.errors import ConfigError, DataError
from velotune.train.data import IGNORE_INDEX, prepare_dataset

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "Four."},
]

# What each template must leave trainable: each reply plus the template's own end of turn.
EXPECTED_REPLIES = {
    "chatml": ["Paris.<|im_end|>\n", "Four.<|im_end|>\n"],
    "qwen-2.5": ["Paris.<|im_end|>\n", "Four.<|im_end|>\n"],
    "llama-3": ["Paris.<|eot_id|>", "Four.<|eot_id|>"],
    "mistral": ["Paris.</s>", "Four.</s>"],
    "gemma": ["Paris.<end_of_turn>\n", "Four.<end_of_turn>\n"],
    "phi-3": ["Paris.<|end|>\n", "Four.<|end|>\n</s>"],
}
EXPECTED_PROMPT_START = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n",
    "qwen-2.5": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n",
    "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
    "mistral": "<s>[INST] Be brief.\n\nCapital of France? [/INST]Paris.",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\n",
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def labelled_runs(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive tokens that keep their label."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    runs, current = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == t, "a kept label must be the token itself"
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("name", sorted(EXPECTED_REPLIES))
def test_every_builtin_template_labels_exactly_the_assistant_replies(tok, name):
    velotune.get_chat_template(tok, name)
    ds = prepare_dataset([{"messages": CHAT}], tok, max_seq_length=None)
    text = tok.decode(ds[0]["input_ids"].tolist(), skip_special_tokens=False)
    assert text.startswith(EXPECTED_PROMPT_START[name])
    assert labelled_runs(tok, ds[0]) == EXPECTED_REPLIES[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_REPLIES))
def test_training_on_everything_keeps_every_label_but_the_first(tok, name):
    velotune.get_chat_template(tok, name)
    ds = prepare_dataset([{"messages": CHAT}], tok, max_seq_length=None, train_on_responses_only=False)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()


def test_the_tokenizers_own_template_is_used_when_none_is_named(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    ds = prepare_dataset([{"messages": CHAT[1:3]}], tok, max_seq_length=None)
    # "A: " ends with a space that byte-level BPE fuses into " Paris": that token predicts the reply.
    assert labelled_runs(tok, ds[0]) == [" Paris.\n"]


def test_sharegpt_rows_equal_the_same_messages(tok):
    velotune.get_chat_template(tok, "chatml")
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CHAT]  # fmt: skip
    a = prepare_dataset([{"conversations": sharegpt}], tok, max_seq_length=None)[0]
    b = prepare_dataset([{"messages": CHAT}], tok, max_seq_length=None)[0]
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()


def test_alpaca_rows_use_the_chat_template_when_there_is_one(tok):
    velotune.get_chat_template(tok, "chatml")
    row = {"instruction": "Translate to French:", "input": "good morning", "output": "Bonjour."}
    ds = prepare_dataset([row], tok, max_seq_length=None)
    text = tok.decode(ds[0]["input_ids"].tolist(), skip_special_tokens=False)
    assert (
        text
        == "<|im_start|>user\nTranslate to French:\n\ngood morning<|im_end|>\n<|im_start|>assistant\nBonjour.<|im_end|>\n"
    )
    assert labelled_runs(tok, ds[0]) == ["Bonjour.<|im_end|>\n"]


def test_alpaca_rows_without_a_template_use_the_alpaca_prompt(tok):
    tok.chat_template = None
    ds = prepare_dataset(
        [{"instruction": "Write a haiku about rain.", "output": "Rain."}], tok, max_seq_length=None
    )
    text = tok.decode(ds[0]["input_ids"].tolist(), skip_special_tokens=False)
    assert text.endswith("### Instruction:\nWrite a haiku about rain.\n\n### Response:\nRain.</s>")
    assert labelled_runs(tok, ds[0]) == ["Rain.</s>"]


def test_text_rows_learn_every_token_and_end_with_eos(tok):
    ds = prepare_dataset([{"text": "The cat sleeps."}], tok, max_seq_length=None)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "The cat sleeps.</s>"
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()


def test_jsonl_json_and_csv_files_read_the_same_rows(tok, tmp_path):
    rows = [{"text": "The quick brown fox."}, {"text": 'The lazy dog, "quoted".'}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('text\nThe quick brown fox.\n"The lazy dog, ""quoted""."\n')
    got = [
        prepare_dataset(str(tmp_path / f), tok, max_seq_length=None) for f in ("d.jsonl", "d.json", "d.csv")
    ]
    want = prepare_dataset(rows, tok, max_seq_length=None)
    for ds in got:
        assert len(ds) == 2 and all(
            ds[i]["input_ids"].tolist() == want[i]["input_ids"].tolist() for i in range(2)
        )


def test_parquet_files_are_read(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["The cat sleeps.", "Four."]}), str(tmp_path / "d.parquet"))
    ds = prepare_dataset(str(tmp_path / "d.parquet"), tok, max_seq_length=None)
    assert tok.decode(ds[1]["input_ids"].tolist(), skip_special_tokens=False) == "Four.</s>"


def test_a_datasets_like_object_is_read_row_by_row(tok):
    class FakeDataset(list):  # the two things velotune uses from datasets.Dataset: iteration and column_names
        column_names = ["text"]

    ds = prepare_dataset(FakeDataset([{"text": "Four."}]), tok, max_seq_length=None)
    assert len(ds) == 1


def test_a_row_without_the_expected_field_names_its_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: missing field 'text'"):
        prepare_dataset(str(path), tok, max_seq_length=None)


def test_a_sequence_longer_than_max_seq_length_is_refused_with_its_row(tok):
    rows = [{"text": "Four."}, {"text": "The quick brown fox jumps over the lazy dog while the cat sleeps."}]
    with pytest.raises(DataError, match=r"row 1 \(\d+ tokens\)"):
        prepare_dataset(rows, tok, max_seq_length=8)


def test_a_missing_data_file_and_bad_roles_are_data_errors(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(str(tmp_path / "nope.jsonl"), tok, max_seq_length=None)
    velotune.get_chat_template(tok, "chatml")
    with pytest.raises(DataError, match="row 0: turn 0 has role 'robot'"):
        prepare_dataset([{"messages": [{"role": "robot", "content": "x"}]}], tok, max_seq_length=None)


def test_an_unknown_template_name_suggests_the_closest(tok):
    with pytest.raises(ConfigError, match="Did you mean 'chatml'"):
        velotune.get_chat_template(tok, "chatmel")
