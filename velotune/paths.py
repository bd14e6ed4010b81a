"""Names that come from files or callers and become paths: they must stay inside their folder.

A shard name in model.safetensors.index.json, an adapter name or an output file name is joined to
a folder; a name such as "../../.ssh/x" or "/etc/x" would then read or write outside it. Such
names are refused rather than cleaned, so that nothing is silently written somewhere unexpected.
"""

from __future__ import annotations

from velotune.errors import VelotuneError

_FORBIDDEN = ("/", "\\", "\0")


def plain_file_name(name, what: str, error: type[VelotuneError]) -> str:
    """`name` itself if it names an entry directly inside a folder; raises `error` otherwise.

    Refused: non-strings, "", ".", "..", and anything holding a path separator (either slash, so a
    Windows-style "..\\x" is caught on every system) or a NUL byte.
    """
    if not isinstance(name, str):
        raise error(f"{what} must be a file name (a string), got {type(name).__name__} {name!r:.100}.")
    if name in ("", ".", "..") or any(c in name for c in _FORBIDDEN):
        raise error(
            f"{what} {name!r:.200} is not a plain file name: it would point outside its folder. "
            "Use a name without '/', '\\' or '..'."
        )
    return name
