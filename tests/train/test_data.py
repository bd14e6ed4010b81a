"""Data shapes, chat templates and response-only labels, checked token by token against the text."""

import json
import logging

import pytest

import velotune
from tests.train.helpers import build_tokenizer
from velotune.errors import ConfigError, DataError
from velotune.train.data import IGNORE_INDEX, DataStats, prepare_dataset

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


LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps."


def test_with_overlong_error_a_sequence_longer_than_max_seq_length_is_refused_with_its_row(tok):
    rows = [{"text": "Four."}, {"text": LONG}]
    with pytest.raises(DataError, match=r"row 1 \(\d+ tokens\)"):
        prepare_dataset(rows, tok, max_seq_length=8, overlong="error")


def test_a_missing_data_file_and_bad_roles_are_data_errors(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(str(tmp_path / "nope.jsonl"), tok, max_seq_length=None)
    velotune.get_chat_template(tok, "chatml")
    with pytest.raises(DataError, match="row 0: turn 0 has role 'robot'"):
        prepare_dataset([{"messages": [{"role": "robot", "content": "x"}]}], tok, max_seq_length=None)


def test_an_unknown_template_name_suggests_the_closest(tok):
    with pytest.raises(ConfigError, match="Did you mean 'chatml'"):
        velotune.get_chat_template(tok, "chatmel")


# ------------------------------------------------------------------------------ bad data


def test_overlong_rows_are_truncated_by_default_counted_and_logged(tok, caplog):
    rows = [{"text": "Four."}, {"text": LONG}, {"text": LONG + " Again."}]
    whole = prepare_dataset(rows, tok, max_seq_length=None)
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset(rows, tok, max_seq_length=8)
    assert len(ds) == 3 and ds.lengths.tolist() == [len(whole[0]["input_ids"]), 8, 8]
    assert ds[1]["input_ids"].tolist() == whole[1]["input_ids"][:8].tolist()
    assert ds[1]["labels"].tolist() == whole[1]["labels"][:8].tolist()
    assert ds.stats == DataStats(rows=3, examples=3, truncated=["row 1", "row 2"])
    assert "2 truncated to max_seq_length (row 1, row 2)" in caplog.text


def test_overlong_drop_removes_the_rows_and_names_them(tok, caplog):
    rows = [{"text": "Four."}, {"text": LONG}, {"text": "Five."}]
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset(rows, tok, max_seq_length=8, overlong="drop")
    assert ds.where == ["row 0", "row 2"]
    assert ds.stats == DataStats(rows=3, examples=2, dropped_overlong=["row 1"])
    assert "1 dropped as longer than max_seq_length (row 1)" in caplog.text


def test_an_unknown_overlong_setting_or_a_bad_max_seq_length_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="overlong='cut'"):
        prepare_dataset([{"text": "x"}], tok, max_seq_length=8, overlong="cut")
    with pytest.raises(ConfigError, match="max_seq_length=0"):
        prepare_dataset([{"text": "x"}], tok, max_seq_length=0)


def test_a_chat_whose_reply_truncation_cuts_off_is_dropped_as_unlabelled(tok, caplog):
    velotune.get_chat_template(tok, "chatml")
    long_question = [{"role": "user", "content": LONG * 3}, {"role": "assistant", "content": "Yes."}]
    rows = [{"messages": CHAT[1:3]}, {"messages": long_question}]
    short, long = (prepare_dataset([r], tok, max_seq_length=None)[0] for r in rows)
    first_label = int((long["labels"] != IGNORE_INDEX).nonzero()[0])
    assert len(short["input_ids"]) <= first_label  # row 0 stays whole, row 1 loses its whole reply
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset(rows, tok, max_seq_length=first_label)
    assert ds.where == ["row 0"]
    assert ds.stats.truncated == ["row 1"] and ds.stats.dropped_unlabelled == ["row 1"]
    assert "1 dropped with every label masked (row 1)" in caplog.text


# A template that writes nothing for an empty reply: such a row has no token to learn from.
SKIPS_EMPTY_REPLIES = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['content'] %}A: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)


def test_rows_whose_labels_are_all_masked_are_dropped_counted_and_logged(tok, caplog):
    tok.chat_template = SKIPS_EMPTY_REPLIES
    empty = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]
    rows = [{"messages": CHAT[1:3]}, {"messages": empty}, {"messages": CHAT[1:3]}, {"messages": empty}]
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset(rows, tok, max_seq_length=None)
    assert ds.where == ["row 0", "row 2"]
    assert ds.stats == DataStats(rows=4, examples=2, dropped_unlabelled=["row 1", "row 3"])
    assert "2 dropped with every label masked (row 1, row 3)" in caplog.text


def test_when_no_row_has_a_label_the_error_says_so(tok):
    tok.chat_template = SKIPS_EMPTY_REPLIES
    empty = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]
    with pytest.raises(DataError, match=r"no row is left to learn from: 0 of 1 rows kept; 1 dropped with every label"):
        prepare_dataset([{"messages": empty}], tok, max_seq_length=None)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", "[]"),
        ("header_only.csv", "text\n"),
        ("nothing.csv", ""),
    ],
)
def test_an_empty_file_is_a_data_error_naming_it(tok, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name} holds no rows"):
        prepare_dataset(str(tmp_path / name), tok, max_seq_length=None)


def test_an_empty_list_is_a_data_error(tok):
    with pytest.raises(DataError, match="no rows"):
        prepare_dataset([], tok, max_seq_length=None)


def test_a_line_that_is_not_json_or_not_utf8_is_named(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        prepare_dataset(str(path), tok, max_seq_length=None)
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: not UTF-8"):
        prepare_dataset(str(path), tok, max_seq_length=None)
    path.write_bytes(b'{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: expected a JSON object, got list"):
        prepare_dataset(str(path), tok, max_seq_length=None)


def test_every_broken_row_is_reported_at_once_with_its_1_based_line_and_field(tok, tmp_path):
    velotune.get_chat_template(tok, "chatml")
    good = {"messages": CHAT}
    bad = [
        {"messages": "hello"},  # line 2
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # line 3
        {"messages": [{"role": ["user"], "content": "x"}]},  # line 4
        {"messages": [{"role": "user", "content": "x"}]},  # line 5
        {"messages": [{"role": "user"}]},  # line 6
        {"no_messages": 1},  # line 7
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, *bad, good]) + "\n")
    with pytest.raises(DataError) as err:
        prepare_dataset(str(path), tok, max_seq_length=None)
    message = str(err.value)
    assert message.startswith("6 of 8 rows cannot be used")
    for expected in [
        "chats.jsonl line 2: field 'messages' should be list, got str",
        "chats.jsonl line 3: turn 0 'content' should be a string, got int",
        "chats.jsonl line 4: turn 0 has role ['user']",
        "chats.jsonl line 5: the conversation has no assistant turn",
        "chats.jsonl line 6: turn 0 needs 'role' and 'content' keys",
        "chats.jsonl line 7: missing field 'messages'",
    ]:
        assert expected in message, (expected, message)


def test_text_and_alpaca_fields_that_are_not_strings_are_named(tok):
    with pytest.raises(DataError, match="row 1: field 'text' should be str, got int"):
        prepare_dataset([{"text": "a"}, {"text": 3}], tok, max_seq_length=None)
    tok.chat_template = None
    with pytest.raises(DataError, match="row 0: field 'input' should be str, got list"):
        prepare_dataset([{"instruction": "a", "input": ["b"], "output": "c"}], tok, max_seq_length=None)
    with pytest.raises(DataError, match="row 1: missing field 'output'"):
        prepare_dataset([{"instruction": "a", "output": "c"}, {"instruction": "a"}], tok, max_seq_length=None)


@pytest.mark.parametrize(
    "roles, pattern",
    [
        (["user", "user", "assistant"], "turns 0 and 1 are both 'user'"),
        (["user", "assistant", "assistant"], "turns 1 and 2 are both 'assistant'"),
        (["system", "system", "user", "assistant"], "turn 1 is a system turn"),
        (["user", "assistant", "system", "user", "assistant"], "turn 2 is a system turn"),
    ],
)
def test_conversations_whose_roles_do_not_alternate_are_refused_naming_the_turns(tok, roles, pattern):
    velotune.get_chat_template(tok, "chatml")
    turns = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]
    with pytest.raises(DataError, match=rf"row 0: {pattern}"):
        prepare_dataset([{"messages": turns}], tok, max_seq_length=None)


def test_sharegpt_roles_alternate_by_their_mapped_role(tok):
    velotune.get_chat_template(tok, "chatml")
    turns = [{"from": "human", "value": "a"}, {"from": "user", "value": "b"}, {"from": "gpt", "value": "c"}]
    with pytest.raises(DataError, match="row 0: turns 0 and 1 are both 'user'"):
        prepare_dataset([{"conversations": turns}], tok, max_seq_length=None)


def test_a_template_that_refuses_a_conversation_names_the_row(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index0 == 0 and m['role'] != 'system' %}"
        "{{ raise_exception('a system prompt is required') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    with pytest.raises(DataError, match="row 1: the chat template cannot render this conversation.*system prompt is required"):
        prepare_dataset(rows, tok, max_seq_length=None)


def test_csv_rows_are_named_by_file_line_even_across_quoted_newlines(tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('other,text\nx,"two\nlines"\ny\n')
    with pytest.raises(DataError, match=r"d\.csv line 4: missing field 'text'"):
        prepare_dataset(str(path), tok, max_seq_length=None)


def test_a_corrupt_parquet_file_is_a_data_error(tok, tmp_path):
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        prepare_dataset(str(tmp_path / "d.parquet"), tok, max_seq_length=None)


def test_random_rows_either_prepare_or_fail_with_a_data_error(tok):
    """Hypothesis throws batches of rows at prepare_dataset (fixed budget, derandomized): well-formed
    rows of one shape mixed with arbitrary JSON values anywhere. Each batch is prepared, with no
    example over max_seq_length and none without a label, or refused with a DataError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    velotune.get_chat_template(tok, "chatml")
    words = st.text(alphabet="abc xyz.?", min_size=0, max_size=30)
    scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8)
    anything = st.recursive(scalar, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=5), x, max_size=3),
                            max_leaves=8)  # fmt: skip

    def chat(role_key, content_key, user, assistant):
        turn = lambda r: st.fixed_dictionaries({role_key: st.just(r), content_key: words})  # noqa: E731
        pair = st.tuples(turn(user), turn(assistant))
        return st.lists(pair, min_size=1, max_size=3).map(lambda ps: [t for p in ps for t in p])

    valid = {
        "text": st.fixed_dictionaries({"text": words}),
        "alpaca": st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": words}),
        "messages": st.fixed_dictionaries({"messages": chat("role", "content", "user", "assistant")}),
        "sharegpt": st.fixed_dictionaries({"conversations": chat("from", "value", "human", "gpt")}),
    }

    def spoiled(row, data):
        """The row with one value somewhere replaced by an arbitrary one (or a key removed)."""
        target = row
        while True:
            key = data.draw(st.sampled_from(sorted(target))) if isinstance(target, dict) and target else None
            if key is None:
                return row
            if isinstance(target[key], list) and target[key] and data.draw(st.booleans()):
                target = data.draw(st.sampled_from(target[key]))
                continue
            if data.draw(st.booleans()):
                target[key] = data.draw(anything)
            else:
                del target[key]
            return row

    outcomes = []

    @settings(max_examples=150, derandomize=True, database=None, deadline=5000,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(data=st.data())
    def run(data):
        shape = data.draw(st.sampled_from(sorted(valid)))
        rows = data.draw(st.lists(valid[shape], min_size=1, max_size=4))
        for i in range(len(rows)):
            if data.draw(st.integers(0, 5)) == 0:
                rows[i] = spoiled(rows[i], data)
        if data.draw(st.integers(0, 9)) == 0:
            rows.append(data.draw(anything))
        max_seq_length = data.draw(st.sampled_from([None, 1, 4, 16, 64]))
        overlong = data.draw(st.sampled_from(["truncate", "drop", "error"]))
        try:
            ds = prepare_dataset(rows, tok, max_seq_length=max_seq_length, overlong=overlong)
        except DataError:
            outcomes.append("refused")
            return
        outcomes.append("prepared")
        assert len(ds) == ds.stats.examples > 0
        assert max_seq_length is None or int(ds.lengths.max()) <= max_seq_length
        assert all((ds[i]["labels"] != IGNORE_INDEX).any() for i in range(len(ds)))

    run()
    assert outcomes.count("prepared") > 15 and outcomes.count("refused") > 50, outcomes  # seen: 41 and 109
