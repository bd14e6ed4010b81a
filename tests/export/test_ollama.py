"""The Ollama Modelfile's TEMPLATE writes what the tokenizer's chat template writes, and its stops end a turn.

Ollama itself is not installed here: the Go template is checked through `ChatPieces.render`, the
Python replay of the same assembly, and by its text.
"""

import logging

import pytest

from velotune.export.ollama import chat_pieces, go_template, modelfile_text, stop_strings
from velotune.quickstart import build_tokenizer
from velotune.train.chat_templates import END_OF_TURN, TEMPLATES

MARKERS = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
           "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]  # fmt: skip
LONG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "Low-rank adapters."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = build_tokenizer(str(tmp_path_factory.mktemp("tok")))
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_pieces_replay_every_built_in_chat_template(name, tokenizer):
    tokenizer.chat_template = TEMPLATES[name]
    pieces = chat_pieces(tokenizer, drop_bos=True)
    assert pieces is not None
    for conv in (LONG, LONG[1:], LONG[1:4]):
        expected = tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True, bos_token=""
        )
        assert pieces.render(conv) == expected
    end_of_turn = END_OF_TURN[name] or tokenizer.eos_token
    assert end_of_turn in stop_strings(tokenizer, pieces)


def test_chatml_modelfile_reads_as_ollama_expects(tokenizer):
    tokenizer.chat_template = TEMPLATES["chatml"]
    text = modelfile_text("model.Q8_0.gguf", tokenizer)
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.Q8_0.gguf"
    assert lines[1].startswith('TEMPLATE """{{ range $i, $_ := .Messages }}')
    assert '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}' in text
    assert "{{ if $last }}<|im_end|>\n<|im_start|>assistant\n{{ else }}" in text
    assert "{{-" not in text  # a trim marker would eat the newlines that end each turn
    assert text.count("{{") == text.count("}}")
    assert text.endswith('PARAMETER stop "</s>"\nPARAMETER stop "<|im_end|>"\n')


def test_a_template_with_a_default_system_prompt_writes_it_only_without_a_system_message(tokenizer):
    tokenizer.chat_template = TEMPLATES["qwen-2.5"]
    pieces = chat_pieces(tokenizer, drop_bos=True)
    assert "You are Qwen" in pieces.head
    assert 'if ne (index .Messages 0).Role "system" }}<|im_start|>system\nYou are Qwen' in go_template(pieces)


def test_literal_braces_in_a_template_are_escaped(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '{{' }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '{{' }}assistant: {% endif %}"
    )
    template = go_template(chat_pieces(tokenizer, drop_bos=True))
    assert '{{ "{{" }}user: {{ .Content }}' in template


def test_a_template_that_does_not_split_by_role_gets_no_template_and_a_warning(tokenizer, caplog):
    tokenizer.chat_template = "{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with caplog.at_level(logging.WARNING):
        text = modelfile_text("model.F16.gguf", tokenizer)
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "").replace("Add a TEMPLATE", "")
    assert "does not decompose" in caplog.text


def test_no_chat_template_writes_stops_only(tokenizer):
    tokenizer.chat_template = None
    text = modelfile_text("model.F16.gguf", tokenizer)
    assert text.startswith("FROM ./model.F16.gguf\n# No TEMPLATE")
    assert text.endswith('PARAMETER stop "</s>"\n')
