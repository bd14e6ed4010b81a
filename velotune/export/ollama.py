"""An Ollama Modelfile beside a GGUF file: FROM, a TEMPLATE equal to the model's chat template, and stops.

Ollama templates are Go templates, chat templates are Jinja: rather than translate one language
into the other, the Jinja template is rendered on a few conversations made of sentinel strings,
and the text around the sentinels gives, per role, what comes before and after a message. The Go
template assembles those pieces; before it is written, the same assembly is replayed in Python on
each conversation and must reproduce the Jinja output exactly, or no TEMPLATE is written (with a
warning) rather than a wrong one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from velotune.errors import ConfigError
from velotune.export.atomic import atomic_file
from velotune.export.gguf_vocab import adds_bos
from velotune.paths import plain_file_name

logger = logging.getLogger(__name__)

SYSTEM, USER1, ASSISTANT1, USER2 = (
    "VTSENTINELSYSTEM",
    "VTSENTINELUSER1",
    "VTSENTINELASSISTANT1",
    "VTSENTINELUSER2",
)
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatPieces:
    """Text around messages, as the chat template writes it (see the module docstring)."""

    head: str  # before the first message when it is not a system message (a default system prompt)
    system_prefix: str | None  # None: the template refuses system messages
    system_suffix: str
    user_prefix: str
    user_to_assistant: str  # after a user message that an assistant message follows
    generation_prompt: str  # after the last user message: opens the assistant's turn
    assistant_suffix: str  # after an assistant message that another message follows

    def render(self, messages: list[dict]) -> str:
        """What the Go template produces, replayed in Python (used to check the derivation)."""
        out = [] if messages and messages[0]["role"] == "system" else [self.head]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system":
                out += [self.system_prefix or "", m["content"], self.system_suffix]
            elif m["role"] == "user":
                out += [
                    self.user_prefix,
                    m["content"],
                    self.generation_prompt if last else self.user_to_assistant,
                ]
            else:
                out += [m["content"], "" if last else self.assistant_suffix]
        return "".join(out)


def _common_suffix(texts: list[str]) -> str:
    shortest = min(texts, key=len)
    n = 0
    while n < len(shortest) and all(t[len(t) - n - 1] == shortest[len(shortest) - n - 1] for t in texts):
        n += 1
    return shortest[len(shortest) - n :]


def _around(text: str, first: str, second: str | None = None) -> tuple[str, str]:
    """(text before `first`, text between `first` and `second` or to the end)."""
    start = text.index(first) + len(first)
    end = text.index(second, start) if second else len(text)
    return text[: text.index(first)], text[start:end]


def _conversations(with_system: bool) -> list[list[dict]]:
    user1, assistant1, user2 = (
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": ASSISTANT1},
        {"role": "user", "content": USER2},
    )
    convs = [[user1], [user1, assistant1, user2]]
    if with_system:
        system = {"role": "system", "content": SYSTEM}
        convs += [[system, user1], [system, user1, assistant1, user2]]
    return convs


def chat_pieces(tokenizer, drop_bos: bool) -> ChatPieces | None:
    """The pieces of the tokenizer's chat template, or None when it has none or they cannot be derived."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    extra = {"bos_token": ""} if drop_bos else {}

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    try:
        one, three = render(_conversations(False)[0]), render(_conversations(False)[1])
        head_user, generation_prompt = _around(one, USER1)
        _, user_to_assistant = _around(three, USER1, ASSISTANT1)
        _, assistant_to_user = _around(three, ASSISTANT1, USER2)
    except Exception as exc:  # a template that cannot render a plain conversation cannot be derived
        logger.warning(
            "the chat template could not be rendered (%s: %s); no Ollama TEMPLATE.", type(exc).__name__, exc
        )
        return None
    try:
        with_system = render(_conversations(True)[2])
        system_prefix, system_to_user = _around(with_system, SYSTEM, USER1)
    except Exception:  # e.g. Gemma's template raises on a system message
        system_prefix, system_to_user = None, None
    user_prefix = _common_suffix(
        [head_user, assistant_to_user] + ([system_to_user] if system_to_user else [])
    )
    pieces = ChatPieces(
        head=head_user[: len(head_user) - len(user_prefix)],
        system_prefix=system_prefix,
        system_suffix=system_to_user[: len(system_to_user) - len(user_prefix)] if system_to_user else "",
        user_prefix=user_prefix,
        user_to_assistant=user_to_assistant,
        generation_prompt=generation_prompt,
        assistant_suffix=assistant_to_user[: len(assistant_to_user) - len(user_prefix)],
    )
    for conv in _conversations(system_prefix is not None):
        if pieces.render(conv) != render(conv):
            logger.warning(
                "the chat template does not decompose into per-role prefixes and suffixes (it renders %r); "
                "no Ollama TEMPLATE is written: add one to the Modelfile by hand.", render(conv),
            )  # fmt: skip
            return None
    return pieces


def _go_literal(text: str) -> str:
    # Template actions open with "{{"; a literal one must be written as an action printing it.
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """The Ollama (Go) template that writes what `pieces.render` writes.

    One line, and no "{{-" trim markers: the pieces' own whitespace (newlines ending a turn) is part
    of the format, and a trim marker would eat it.
    """
    lit = _go_literal
    parts = []
    if pieces.head:
        parts.append(f'{{{{ if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{lit(pieces.head)}'
                     "{{ end }}{{ end }}")  # fmt: skip
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if pieces.system_prefix is not None:
        parts.append(f'{{{{ if eq .Role "system" }}}}{lit(pieces.system_prefix)}{{{{ .Content }}}}'
                     f'{lit(pieces.system_suffix)}{{{{ else if eq .Role "user" }}}}')  # fmt: skip
    else:
        parts.append('{{ if eq .Role "user" }}')
    parts.append(
        f"{lit(pieces.user_prefix)}{{{{ .Content }}}}{{{{ if $last }}}}{lit(pieces.generation_prompt)}"
        f"{{{{ else }}}}{lit(pieces.user_to_assistant)}{{{{ end }}}}"
    )
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{{{{ if not $last }}}}'
                 f"{lit(pieces.assistant_suffix)}{{{{ end }}}}")  # fmt: skip
    parts.append("{{ end }}{{ end }}")
    return "".join(parts)


def stop_strings(tokenizer, pieces: ChatPieces | None) -> list[str]:
    """End-of-sequence token, and the first special token the template writes after an assistant turn."""
    stops = []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos:
        stops.append(eos)
    if pieces is not None:
        after_turn = pieces.assistant_suffix + pieces.user_prefix
        specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]
        found = sorted((after_turn.index(s), s) for s in specials if s in after_turn)
        if found and found[0][1] not in stops:
            stops.append(found[0][1])
    return stops


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_file: str, tokenizer) -> str:
    """The Modelfile for `gguf_file` (a path relative to the Modelfile's folder).

    Where the tokenizer adds BOS itself, llama.cpp does too, so the template is rendered without it.
    """
    pieces = chat_pieces(tokenizer, drop_bos=adds_bos(tokenizer))
    lines = [f"FROM ./{gguf_file}"]
    if pieces is not None:
        template = go_template(pieces)
        if '"""' in template:
            raise ConfigError(
                "the chat template contains triple quotes, which a Modelfile TEMPLATE cannot hold."
            )
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append(
            "# No TEMPLATE: the tokenizer has no chat template velotune could translate; Ollama will send"
        )
        lines.append("# prompts as plain text. Add a TEMPLATE for chat use.")
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stop_strings(tokenizer, pieces)]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: str, gguf_file: str, tokenizer) -> str:
    """Writes `<directory>/Modelfile` for the GGUF file `gguf_file` in that folder; returns its path."""
    # FROM ./<name> must name a file beside the Modelfile, not one elsewhere on the machine.
    plain_file_name(gguf_file, "the GGUF file of a Modelfile", ConfigError)
    path = os.path.join(directory, MODELFILE)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(modelfile_text(gguf_file, tokenizer))
    return path
