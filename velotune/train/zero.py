"""DeepSpeed ZeRO-2 / ZeRO-3 through DeepSpeed's own config file, for clusters that already run it.

    training:
      deepspeed: ds_config.json      # the standard DeepSpeed JSON config

    deepspeed --num_gpus 8 --module velotune train config.yaml

The trainer hands its model and its AdamW (with the weight-decay groups) to `deepspeed.initialize`,
calls the engine for forwards, and `engine.backward` + `engine.step` after every micro-batch, as
Accelerate does: the engine reduces (ZeRO-2: reduce-scatters) gradients, clips them and steps the
optimizer on its own partition at the last micro-batch of each optimizer step. The learning-rate
schedule stays the trainer's (it sets the learning rate of the same optimizer's groups).

The config is DeepSpeed's; velotune fills what the training settings already say, the way the
Hugging Face Trainer does: `train_micro_batch_size_per_gpu` (batch_size), `gradient_accumulation_steps`,
`train_batch_size` (their product with the world size) and `gradient_clipping` (max_grad_norm) when
they are missing or "auto", and refuses values that contradict the training settings. `bf16` / `fp16`
"enabled": "auto" follows mixed_precision. The optimizer and scheduler come from the training
settings, so an "optimizer" or "scheduler" section is refused.

Loss and gradient scaling: each rank's loss is already its share of the step's mean (see
`velotune.train.distributed`), so the engine's division by the accumulation steps is turned off
(scale_wrt_gas=False); DeepSpeed averages gradients over ranks as DDP does.

Checkpoints keep velotune's one-process layout (whole trainable tensors and AdamW state, written by
rank 0), read out of and written into ZeRO's partitions with DeepSpeed's `safe_get_full_*` /
`safe_set_full_*` calls, so a ZeRO run resumes on any world size, with or without DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from velotune.errors import ConfigError

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _is_auto(value) -> bool:
    return value is None or value == _AUTO


def build_config(
    source: str | dict,
    *,
    batch_size: int,
    accumulation: int,
    world_size: int,
    max_grad_norm: float | None,
    mixed_precision: str,
    optim: str,
) -> dict:
    """The DeepSpeed config of this run: the user's file (or dict) with the training settings filled in.

    Raises ConfigError when the file is missing or not JSON, or contradicts the training settings.
    """
    if not isinstance(source, (str, os.PathLike)):
        config = json.loads(json.dumps(source))  # a deep copy that is also JSON-clean
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(
                f"training.deepspeed={path!r}: no such file (paths are relative to the working folder)."
            )
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"training.deepspeed={path!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError("the DeepSpeed config must be a JSON object.")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"the DeepSpeed config has a {section!r} section; velotune builds AdamW and the learning-rate "
                "schedule from the training: settings (learning_rate, weight_decay, lr_scheduler, warmup_steps). "
                f"Remove the {section!r} section."
            )
    if optim != "adamw":
        raise ConfigError(f"optim={optim!r} with DeepSpeed: ZeRO partitions torch's AdamW; use optim: adamw.")
    if mixed_precision == "fp16":
        raise ConfigError(
            "mixed_precision: fp16 with DeepSpeed: use DeepSpeed's own loss scaling instead, with "
            '"fp16": {"enabled": true} in the DeepSpeed config and mixed_precision: no (or bf16).'
        )
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} in the DeepSpeed config: use 0, 1, 2 or 3.")

    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": batch_size * accumulation * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    where = {
        "train_micro_batch_size_per_gpu": "training.batch_size",
        "gradient_accumulation_steps": "training.gradient_accumulation_steps",
        "train_batch_size": "training.batch_size x gradient_accumulation_steps x world size",
        "gradient_clipping": "training.max_grad_norm",
    }
    for key, value in wanted.items():
        given = config.get(key)
        if _is_auto(given):
            config[key] = value
        elif float(given) != float(value):
            raise ConfigError(
                f'the DeepSpeed config sets {key}={given}, but {where[key]} gives {value}; set it to "auto" '
                "(or leave it out) and velotune fills it in."
            )
    for kind in ("bf16", "fp16"):
        section = config.get(kind)
        if isinstance(section, dict) and _is_auto(section.get("enabled", False)):
            section["enabled"] = mixed_precision == kind
    return config


def stage_of(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """The DeepSpeed engine over `model`, wrapping `optimizer` (whose parameter groups it partitions)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "training.deepspeed needs DeepSpeed: `DS_BUILD_OPS=0 pip install deepspeed` (velotune uses none of "
            "its compiled ops), or remove training.deepspeed to train with DDP / FSDP2."
        ) from exc
    if stage_of(config) == 3:
        _check_zero3(model)
        # Tied (or merely head-less) models read the LM head's weight in the model's own forward, not in
        # the module that owns it; ZeRO-3 gathers it for that forward when told so.
        deepspeed.zero.register_external_parameter(model, model.lm_head_weight)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _check_zero3(model: nn.Module) -> None:
    if getattr(model, "gradient_checkpointing", False) or getattr(model, "mlp_tile_tokens", None):
        # velotune.memory's recompute hands a layer's parameters to its autograd function as inputs; under
        # ZeRO-3 they are empty partitions outside the submodule that owns them, so their gradients cannot
        # be returned. FSDP2 (parallel: fsdp) runs the same recompute on whole parameters.
        raise ConfigError(
            "DeepSpeed ZeRO-3 with gradient checkpointing or MLP sequence tiling is not supported: set "
            "training.gradient_checkpointing: false (and lora.gradient_checkpointing: false), or use ZeRO-2, or "
            "parallel: fsdp (FSDP2 shards like ZeRO-3 and supports both)."
        )
    from velotune.quant.nf4_weight import NF4Weight

    if any(isinstance(m, NF4Weight) for m in model.modules()):
        raise ConfigError(
            "DeepSpeed ZeRO-3 with a 4-bit (QLoRA) base is not supported: ZeRO-3 partitions parameters, and the "
            "4-bit weights are frozen buffers it would not shard. Use ZeRO-2, or parallel: fsdp (FSDP2 shards the "
            "4-bit weights)."
        )


def whole_parameter(p: nn.Parameter) -> torch.Tensor:
    """A trainable parameter's whole value in its own dtype, from ZeRO's fp32 partitions (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    whole = safe_get_full_fp32_param(p)
    shape = getattr(p, "ds_shape", p.shape)
    return whole.reshape(shape).to(p.dtype)


def _flat_partitions(engine, optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(flat fp32 partition, its parameter group) for each tensor ZeRO steps the optimizer on: ZeRO-1/2 put
    them in the groups, ZeRO-3 puts each in its group only while it steps it."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return [(flat, optimizer.param_groups[zero.sub_group_to_group_id[i]])
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]  # fmt: skip
    return [(flat, group) for group in optimizer.param_groups for flat in group["params"]]


def optimizer_state(engine, optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]]) -> dict:
    """The AdamW state in the one-process layout (what `optimizer.state_dict()` of an unwrapped AdamW over
    `groups` gives), gathered out of ZeRO's partitions (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_state_fragments(engine)
    flat_states = [
        optimizer.state[flat] for flat, _ in _flat_partitions(engine, optimizer) if optimizer.state.get(flat)
    ]
    state: dict[int, dict] = {}
    param_groups, index = [], 0
    for group, params in zip(optimizer.param_groups, groups):
        param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": list(range(index, index + len(params)))})  # fmt: skip
        for p in params:
            if flat_states:  # none before the first step
                first = flat_states[0]
                shape = getattr(p, "ds_shape", p.shape)
                values = {"step": first["step"].detach().to("cpu", torch.float32).clone()}
                for key, value in first.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        values[key] = safe_get_full_optimizer_state(p, key).reshape(shape).to("cpu")
                state[index] = values
            index += 1
    return {"state": state, "param_groups": param_groups}


def _link_state_fragments(engine) -> None:
    """ZeRO-1/2 map each parameter to its fragment of the flat optimizer state once, right after stepping
    the first parameter group for the first time: the other groups' states do not exist yet then, and
    their parameters stay unmapped (safe_get/set_full_optimizer_state fail on them). Mapping again once
    every group has its state fixes that (ZeRO-3 needs no mapping)."""
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked") and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(
    engine, optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]], saved: dict
):
    """Writes a one-process AdamW state into ZeRO's partitions (each rank keeps its own part)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError("the checkpoint's optimizer has other parameter groups than this run's.")
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if not saved["state"]:
        return
    first = next(iter(saved["state"].values()))
    per_element = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
    for flat, group in _flat_partitions(engine, optimizer):
        st = optimizer.state[flat]
        # AdamW creates its state at the first step; a resumed run needs it before.
        for key in per_element:
            if key not in st:
                st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        on_device = group.get("fused") or group.get("capturable")
        st["step"] = first["step"].detach().to(flat.device if on_device else "cpu", torch.float32).clone()
    _link_state_fragments(engine)
    index = 0
    for params in groups:
        for p in params:
            values = saved["state"].get(index, saved["state"].get(str(index)))
            for key in per_element:
                safe_set_full_optimizer_state(p, values[key].reshape(-1), key)
            index += 1


def load_parameters(engine, tensors: dict[nn.Parameter, torch.Tensor]) -> None:
    """Writes whole values into ZeRO's copies of the trainable parameters (the model's and the fp32 ones)."""
    import deepspeed

    params = list(tensors)
    if any(
        hasattr(p, "ds_id") for p in params
    ):  # ZeRO-3: partitioned; gathered, set on rank 0, scattered back
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    for p, value in tensors.items():
                        p.copy_(value.reshape(p.shape))
    else:
        with torch.no_grad():
            for p, value in tensors.items():
                p.copy_(value.reshape(p.shape))
    engine.optimizer.refresh_fp32_params()
