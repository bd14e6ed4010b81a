"""`velotune train config.yaml`: the YAML schema, its validation, and the run it describes.

    model:                       # the base model
      name: path/to/hf-folder    # required: a local Hugging Face folder
      max_seq_length: 2048
      dtype: auto                # auto | bfloat16 | float16 | float32
      device_map: auto
      full_finetuning: false     # true: every weight trains, no LoRA
    lora:                        # ignored with full_finetuning
      r: 16
      alpha: 16
      dropout: 0.0
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      use_rslora: false
      gradient_checkpointing: true
    data:
      train: data/train.jsonl    # required: .jsonl / .json / .csv / .parquet
      eval: null
      format: auto               # auto | text | alpaca | messages | sharegpt
      text_field: text
      chat_template: null        # null: the tokenizer's own; or llama-3 | chatml | mistral | gemma | phi-3 | qwen-2.5
      train_on_responses_only: true
      overlong: truncate         # rows longer than max_seq_length: truncate | drop | error
    training:                    # every field of velotune.train.TrainingArguments
      output_dir: outputs
      ...
    resume_from_checkpoint: null # a checkpoint folder, or true for the newest in output_dir

Relative paths are relative to the folder the command runs in. Command-line overrides
`--training.learning_rate=1e-4` take YAML values. An unknown key is an error naming its line and
the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field

import yaml

from velotune.errors import ConfigError, TrainingInterrupted
from velotune.train.trainer import TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    name: str = ""
    max_seq_length: int = 2048
    dtype: str = "auto"
    device_map: str = "auto"
    full_finetuning: bool = False


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = False
    gradient_checkpointing: bool = True


@dataclass
class DataSection:
    train: str = ""
    eval: str | None = None
    format: str = "auto"
    text_field: str = "text"
    chat_template: str | None = None
    train_on_responses_only: bool = True
    overlong: str = "truncate"


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    resume_from_checkpoint: str | bool | None = None


_SECTIONS = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "training": TrainingArguments}
_HIDDEN = {"extra"}  # TrainingArguments fields that the YAML does not set


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _HIDDEN]


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _coerce(value, hint, where: str):
    """`value` as the field's type: YAML reads 2e-4 as a string, and ints stand in for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    target = origin or hint
    if target is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is bool and isinstance(value, bool):
        return value
    if target in (str, list, dict) and isinstance(value, target):
        return value
    raise ConfigError(f"{where}: expected {getattr(target, '__name__', target)}, got {value!r}.")


def _line_of(node: yaml.Node | None, path: tuple[str, ...]) -> int | None:
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if k.value == key:
                if key == path[-1]:
                    return k.start_mark.line + 1
                node = v
                break
        else:
            return None
    return None


def _set_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} should look like --section.key=value")
    dotted, value = item.lstrip("-").split("=", 1)
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value else ""


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Reads and validates a YAML config (plus --section.key=value overrides)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path!r}") from None
    try:
        raw = yaml.safe_load(text) or {}
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(_SECTIONS)}).")
    for item in overrides:
        _set_override(raw, item)

    def where(*keys: str) -> str:
        line = _line_of(tree, keys)
        return f"{path} line {line}" if line else f"{path} (override {'.'.join(keys)})"

    config = Config()
    top = [*_SECTIONS, "resume_from_checkpoint"]
    for key, value in raw.items():
        if key not in top:
            raise _unknown(key, top, where(key))
        if key == "resume_from_checkpoint":
            config.resume_from_checkpoint = _coerce(value, str | bool | None, where(key))
            continue
        cls = _SECTIONS[key]
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}: {key!r} must be a mapping of keys.")
        hints = typing.get_type_hints(cls)
        valid = _keys(cls)
        values = {}
        for sub, v in value.items():
            if sub not in valid:
                raise _unknown(sub, valid, where(key, sub))
            values[sub] = _coerce(v, hints[sub], where(key, sub))
        try:
            setattr(config, key, cls(**values))
        except ConfigError as exc:
            raise ConfigError(f"{where(key)}: {exc}") from None
    if not config.model.name:
        raise ConfigError(f"{path}: model.name is required (a local Hugging Face model folder).")
    if not config.data.train:
        raise ConfigError(f"{path}: data.train is required (a .jsonl/.json/.csv/.parquet file).")
    return config


def run(config: Config) -> str:
    """Loads the model, prepares the data, trains, and saves; returns the folder of the result.

    The data is read and checked before the model's weights load, so a data problem costs seconds.
    SIGINT / SIGTERM end it with velotune.errors.TrainingInterrupted once a checkpoint is written
    (the trained result is not saved then).
    Under torchrun / accelerate launch every process runs this; see velotune.train.distributed.
    """
    import torch

    import velotune
    from velotune.io.tokenizer import load_tokenizer
    from velotune.train import distributed
    from velotune.train.data import prepare_dataset
    from velotune.train.trainer import Trainer

    m, d = config.model, config.data
    # Joins the launcher's process group and selects this rank's GPU before any weight loads.
    distributed.init_from_env()
    tokenizer = load_tokenizer(m.name)
    if tokenizer is None:
        raise ConfigError(
            f"{m.name} has no tokenizer; training needs the model's tokenizer files in its folder."
        )
    prep = dict(max_seq_length=m.max_seq_length, format=d.format, text_field=d.text_field,
                chat_template=d.chat_template, train_on_responses_only=d.train_on_responses_only,
                overlong=d.overlong)  # fmt: skip
    train = prepare_dataset(d.train, tokenizer, **prep)
    evaluation = prepare_dataset(d.eval, tokenizer, **prep) if d.eval else None
    logger.info("data: %d training examples (%d label tokens)", len(train), train.num_label_tokens())

    dtype = None if m.dtype == "auto" else getattr(torch, m.dtype, None)
    if m.dtype != "auto" and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype={m.dtype!r}: use auto, bfloat16, float16 or float32.")
    model, _ = velotune.FastLanguageModel.from_pretrained(
        m.name, max_seq_length=m.max_seq_length, dtype=dtype, device_map=m.device_map,
        full_finetuning=m.full_finetuning,
    )  # fmt: skip
    if not m.full_finetuning:
        lo = config.lora
        model = velotune.FastLanguageModel.get_peft_model(
            model, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
            use_rslora=lo.use_rslora, use_gradient_checkpointing=lo.gradient_checkpointing,
            random_state=config.training.seed,
        )  # fmt: skip
    trainer = Trainer(
        model, config.training, train_dataset=train, eval_dataset=evaluation, tokenizer=tokenizer
    )
    interrupted = None
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except TrainingInterrupted as exc:  # a checkpoint is written; the process group still goes down cleanly
        interrupted = exc.with_traceback(None)  # its frames would keep the trainer alive
    folder = None if interrupted else trainer.save_model()
    del trainer, model  # they hold the process group (see distributed.shutdown)
    distributed.shutdown()
    if interrupted is not None:
        raise interrupted
    return folder
