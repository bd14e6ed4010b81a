"""Fuzzing the loader: mutated safetensors files and config.json files, for a fixed, derandomized budget.

Every input must either load or fail with velotune's own error type (a `VelotuneError`); any other
exception fails the test and hypothesis prints the input. Each example runs under a hard time limit
(a hang fails it), and the model the loader allocates (`Module.to_empty`) may not exceed the bytes
the checkpoint files hold: a config.json that claims more than its weights must fail before that.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tests.model_zoo import save_hf_model
from velotune.errors import CheckpointError, VelotuneError
from velotune.io.load import load_model
from velotune.io.safetensors_reader import DTYPE_SIZES, read_header

# Derandomized (a fixed seed per test, no example database) and bounded: the budgets below take a
# few seconds each on one CPU core. The examples can still shift a little with what ran earlier in
# the same process (seen under pytest-xdist), so the counts checked after each run have wide margins.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HARD_LIMIT_S = 20  # per example: far above any honest load of the tiny model (~10 ms)


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the loader swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"the loader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def allocation_at_most(limit: int):
    """Fails if the loader allocates a model with more parameter and buffer bytes than `limit`."""
    original = torch.nn.Module.to_empty

    def checked(self, *args, **kwargs):
        size = sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])
        assert size <= limit, f"the loader allocated {size} bytes for a checkpoint of {limit} bytes"
        return original(self, *args, **kwargs)

    with mock.patch.object(torch.nn.Module, "to_empty", checked):
        yield


def folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")
    )


def load_or_refuse(folder: str) -> str:
    """'loaded' or 'refused'; anything but a VelotuneError, a hang or an oversized allocation fails."""
    with time_limit(HARD_LIMIT_S), allocation_at_most(folder_bytes(folder)):
        try:
            load_model(folder, dtype=torch.float32, device_map="cpu", progress=False)
        except VelotuneError:
            return "refused"
    return "loaded"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", str(folder))  # float32, 8 shards of ~40 kB
    return str(folder)


# ------------------------------------------------------------------------------------ strategies

# Values that break type, sign or size assumptions, for header fields and config.json keys alike.
HOSTILE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**12, 10**30, -(2**63)]
)
BOGUS = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        HOSTILE_NUMBERS,
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from([*DTYPE_SIZES, "F8_E8M0", "F4", "Q4_K", "f32", ""]),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode("utf-8", "surrogatepass")
    return len(text).to_bytes(8, "little") + text + data


SAME_SIZE = [["F32", "I32", "U32"], ["F16", "BF16", "I16", "U16"], ["I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]]


def valid_variant(data, raw: bytes) -> bytes:
    """A header that breaks no rule but differs from what the safetensors writer produces: entries
    reordered, metadata added, a dtype of the same size, a reshape, zero-size tensors at tensor
    boundaries, whitespace padding; then, half of the time, one hostile edit on top (so that a
    rule is probed right at the edge of valid input)."""
    header, body = split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        change = data.draw(st.sampled_from(["reorder", "metadata", "dtype", "reshape", "empty"]))
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = header[name]
        if change == "reorder":
            order = data.draw(st.permutations(list(header)))
            header = {k: header[k] for k in order}
        elif change == "metadata":
            header["__metadata__"] = data.draw(
                st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
            )
        elif change == "dtype":
            group = next(g for g in SAME_SIZE if entry["dtype"] in g)
            entry["dtype"] = data.draw(st.sampled_from(group))
        elif change == "reshape":
            numel = 1
            for d in entry["shape"]:
                numel *= d
            entry["shape"] = data.draw(
                st.sampled_from([[numel], [1, numel], [numel, 1], [*entry["shape"], 1]])
            )
        elif change == "empty":
            at = data.draw(st.sampled_from([0, *(header[n]["data_offsets"][1] for n in names)]))
            shape = data.draw(st.sampled_from([[0], [0, 7], [3, 0, 2]]))
            header[f"empty.{len(header)}"] = {"dtype": data.draw(st.sampled_from(list(DTYPE_SIZES))),
                                               "shape": shape, "data_offsets": [at, at]}  # fmt: skip
    text = json.dumps(header).encode() + b" " * data.draw(st.integers(0, 9), label="padding")
    raw = len(text).to_bytes(8, "little") + text + body
    return hostile_edit(data, raw) if data.draw(st.booleans(), label="spoil") else raw


def mutate_safetensors(data, raw: bytes) -> bytes:
    """One of: byte flips in the prefix/header, truncation, a hostile header length, hostile edits of
    the parsed header, or a valid variant (possibly with one hostile edit on top)."""
    header_end = 8 + int.from_bytes(raw[:8], "little")
    kind = data.draw(
        st.sampled_from(["flip", "truncate", "length", "edit", "edit", "valid", "valid"]), label="kind"
    )
    if kind == "valid":
        return valid_variant(data, raw)
    if kind == "flip":
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, header_end - 1), label="at")
            out[at] ^= data.draw(st.integers(1, 255), label="xor")
        return bytes(out)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    if kind == "length":
        value = data.draw(
            st.sampled_from(
                [
                    0,
                    1,
                    2,
                    header_end - 9,
                    header_end - 7,
                    len(raw) - 8,
                    len(raw),
                    100_000_001,
                    2**63,
                    2**64 - 1,
                ]
            )
            | st.integers(0, 2**64 - 1),
            label="length",
        )
        return max(value, 0).to_bytes(8, "little") + raw[8:]
    return hostile_edit(data, raw)


def hostile_edit(data, raw: bytes) -> bytes:
    """Edits of the parsed header (a field set to a bogus value or a neighbour's, offsets shifted,
    deleted, a tensor added or removed), re-serialised with a consistent length and a possibly
    resized data section."""
    header, body = split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        edit = data.draw(
            st.sampled_from(["set", "set", "copy", "shift", "delete_field", "drop", "add", "metadata"])
        )
        name = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if edit == "set":
            entry[field] = data.draw(BOGUS, label="value")
        elif edit == "copy":  # a neighbour's value: plausible, and wrong
            other = header.get(data.draw(st.sampled_from(names)))
            if isinstance(other, dict) and field in other:
                entry[field] = other[field]
        elif (
            edit == "shift"
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
        ):
            d = data.draw(st.integers(-16, 16), label="shift")
            which = data.draw(st.sampled_from([[1, 1], [1, 0], [0, 1]]))
            entry["data_offsets"] = [
                o + d * w if isinstance(o, int) else o for o, w in zip(entry["data_offsets"], which)
            ]
        elif edit == "delete_field":
            entry.pop(field, None)
        elif edit == "drop":
            header.pop(name, None)
        elif edit == "add":
            header[data.draw(st.sampled_from(["evil", name + ".x", "__metadata__"]))] = data.draw(BOGUS)
        elif edit == "metadata":
            header["__metadata__"] = data.draw(BOGUS)
    resize = data.draw(st.sampled_from([0, 0, 0, -4, -1, 1, 4]), label="resize")
    body = body[: len(body) + resize] if resize < 0 else body + b"\0" * resize
    return join_safetensors(header, body)


CONFIG_KEYS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "tie_word_embeddings", "model_type", "hidden_act", "attention_bias",
    "mlp_bias", "sliding_window", "layer_types", "quantization_config", "text_config", "partial_rotary_factor",
    "num_local_experts", "num_experts_per_tok", "torch_dtype", "unknown_key",
]  # fmt: skip
CONFIG_VALUES = st.one_of(
    BOGUS,
    HOSTILE_NUMBERS,
    st.sampled_from([10**12, 10**9, -48, 48, 49, 96, 2, 3, 7, 0.5, 1e-5, 1e308, float("nan")]),
    st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "gpt2"]),
    st.fixed_dictionaries(
        {
            "rope_type": st.sampled_from(
                ["default", "llama3", "linear", "dynamic", "yarn", "longrope", "su", "x"]
            )
        },
        optional={
            "factor": BOGUS,
            "rope_theta": BOGUS,
            "low_freq_factor": BOGUS,
            "original_max_position_embeddings": BOGUS,
            "short_factor": BOGUS,
            "partial_rotary_factor": BOGUS,
        },
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"quant_method": st.sampled_from(["bitsandbytes", "gptq"])},
        optional={"bnb_4bit_quant_type": st.sampled_from(["nf4", "fp4"]), "load_in_8bit": st.booleans()},
    ),
)


def mutate_config(data, cfg: dict) -> bytes:
    kind = data.draw(st.sampled_from(["edit", "edit", "edit", "edit", "raw"]), label="kind")
    if kind == "raw":  # not JSON, or not an object, or cut short
        text = json.dumps(cfg).encode()
        return data.draw(
            st.binary(max_size=64)
            | st.builds(lambda n: text[:n], st.integers(0, len(text) - 1))
            | st.sampled_from([b"[]", b"null", b'"llama"', b"\xff\xfe\x00", b"[" * 100_000]),
            label="raw",
        )
    cfg = dict(cfg)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
        if data.draw(st.booleans(), label="delete"):
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(CONFIG_VALUES, label="value")
    return json.dumps(cfg).encode()


# ------------------------------------------------------------------------------------------ tests


def test_every_safetensors_header_the_reader_accepts_reads_back_exactly(llama_folder, tmp_path):
    """The reader's rules are complete: a header it accepts never makes the safetensors library
    fail, and every tensor reads back with the dtype and shape the header declares."""
    shards = sorted(n for n in os.listdir(llama_folder) if n.endswith(".safetensors"))
    originals = [open(os.path.join(llama_folder, n), "rb").read() for n in shards]
    path = str(tmp_path / "x.safetensors")
    outcomes = Counter()

    @settings(FUZZ, max_examples=300)
    @given(data=st.data())
    def run(data):
        raw = mutate_safetensors(data, data.draw(st.sampled_from(originals), label="shard"))
        with open(path, "wb") as f:
            f.write(raw)
        with time_limit(HARD_LIMIT_S):
            try:
                header = read_header(path)
            except CheckpointError:
                outcomes["refused"] += 1
                return
            outcomes["accepted"] += 1
            with safe_open(path, framework="pt", device="cpu") as f:
                assert sorted(f.keys()) == sorted(header)
                for name, info in header.items():
                    tensor = f.get_tensor(name)
                    assert list(tensor.shape) == info["shape"]
                    assert tensor.element_size() == DTYPE_SIZES[info["dtype"]]

    run()
    # Both sides of the property were exercised (seen: 212-240 refused, 60-88 accepted).
    assert outcomes["refused"] > 100 and outcomes["accepted"] > 30, outcomes


def test_a_folder_with_a_mutated_shard_loads_or_fails_with_a_velotune_error(llama_folder):
    shards = sorted(n for n in os.listdir(llama_folder) if n.endswith(".safetensors"))
    outcomes = Counter()

    @settings(FUZZ, max_examples=150)
    @given(data=st.data())
    def run(data):
        shard = data.draw(st.sampled_from(shards), label="shard")
        raw = open(os.path.join(llama_folder, shard), "rb").read()
        with tempfile.TemporaryDirectory() as tmp:
            folder = shutil.copytree(llama_folder, os.path.join(tmp, "m"))
            with open(os.path.join(folder, shard), "wb") as f:
                f.write(mutate_safetensors(data, raw))
            outcomes[load_or_refuse(folder)] += 1

    run()
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 5, outcomes  # seen: 116-124 and 26-34


def test_a_mutated_config_json_loads_or_fails_with_a_velotune_error_before_allocating_beyond_its_weights(
    llama_folder,
):
    cfg = json.load(open(os.path.join(llama_folder, "config.json")))
    outcomes = Counter()

    @settings(FUZZ, max_examples=200)
    @given(data=st.data())
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            folder = shutil.copytree(llama_folder, os.path.join(tmp, "m"))
            with open(os.path.join(folder, "config.json"), "wb") as f:
                f.write(mutate_config(data, cfg))
            outcomes[load_or_refuse(folder)] += 1

    run()
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes  # seen: 171-174 and 26-29
