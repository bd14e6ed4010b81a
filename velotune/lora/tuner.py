"""Putting LoRA on a model, taking it off, and moving adapters in and out in PEFT's format.

Injection swaps each adapted `Projection` for a `LoraProjection` (and a `SparseMoE` for a
`LoraSparseMoE`) that shares the base weight objects, as PEFT swaps nn.Linear for lora.Linear.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from velotune.errors import AdapterError
from velotune.lora import peft_format as fmt
from velotune.lora.layers import (
    LoraFactors,
    LoraProjection,
    LoraSparseMoE,
    init_factors,
    lora_dtype_for,
    lora_scale,
)
from velotune.lora.peft_format import LoraSettings, LoraSite
from velotune.models.layers import Projection, SparseMoE

logger = logging.getLogger(__name__)


def lora_modules(model: nn.Module) -> dict[str, LoraProjection | LoraSparseMoE]:
    return {p: m for p, m in model.named_modules() if isinstance(m, (LoraProjection, LoraSparseMoE))}


def has_lora(model: nn.Module) -> bool:
    return any(m.rank for m in lora_modules(model).values())


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _lora_module(model: nn.Module, path: str) -> LoraProjection | LoraSparseMoE:
    """The module at `path`, swapped for its LoRA form on first use."""
    module = model.get_submodule(path)
    if isinstance(module, (LoraProjection, LoraSparseMoE)):
        return module
    if isinstance(module, Projection):
        wrapped = LoraProjection(module)
    elif isinstance(module, SparseMoE):
        wrapped = LoraSparseMoE(module, model.spec)
    else:
        raise AdapterError(f"{path} ({type(module).__name__}) cannot carry LoRA.")
    wrapped.train(module.training)
    _set_submodule(model, path, wrapped)
    return wrapped


def _place(
    model: nn.Module, factors: dict[LoraSite, LoraFactors], requires_grad: bool, dropout: float
) -> None:
    by_module: dict[str, dict[str, LoraFactors]] = {}
    for site, f in factors.items():
        by_module.setdefault(site.module, {})[site.unit] = f
    for path, units in by_module.items():
        module = _lora_module(model, path)
        module.set_lora(units, requires_grad=requires_grad)
        if isinstance(module, LoraProjection):
            module.lora_dropout = dropout


def _a_params(module) -> list[nn.Parameter]:
    if isinstance(module, LoraProjection):
        return [module.lora_A] if module.lora_A is not None else []
    return list(module.lora_A.values())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (*_a_params(m), *m.lora_B.values())]


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    bias: str = "none",
    random_state: int = 3407,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    lora_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Freezes the base and adds fresh LoRA pairs to the sites `target_modules` names (PEFT's names).

    The initialisation is drawn in site order from one CPU generator seeded with `random_state`.
    """
    if bias not in fmt.BIAS_MODES:
        raise AdapterError(f"bias={bias!r} is not one of PEFT's {fmt.BIAS_MODES}.")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"r must be a positive integer, got {r!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise AdapterError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    if has_lora(model):
        raise AdapterError(
            "this model already has LoRA adapters; merge them (model.merge_and_unload()) or load another "
            "adapter with model.load_adapter(folder) instead of calling get_peft_model again."
        )
    sites = fmt.lora_sites(model)
    chosen = fmt.resolve_targets(sites, target_modules)
    if bias == "lora_only":
        _check_whole_biases(model, chosen)
    moe = [s for s in chosen if s.peft_param is not None]
    if lora_dropout > 0 and moe:
        raise AdapterError(
            f"lora_dropout={lora_dropout} cannot apply to the MoE router / experts ({moe[0].target_name}, ...): "
            "PEFT adapts those tensors directly and refuses dropout there, so such an adapter would not load in "
            "PEFT. Use lora_dropout=0, or target only the attention projections."
        )
    settings = LoraSettings(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        bias=bias,
        init_lora_weights=init_lora_weights,
        base_model_name_or_path=getattr(model, "name_or_path", None),
    )
    generator = torch.Generator().manual_seed(random_state)
    dtype = lora_dtype or lora_dtype_for(model.dtype)
    factors = {}
    for site in sites:  # model order, so the same seed gives the same adapter
        if site not in chosen:
            continue
        rank, alpha = r * chosen[site], lora_alpha * chosen[site]
        a_shape, b_shape, fan_in = fmt.site_shapes(model, site, rank)
        a, b = init_factors(a_shape, b_shape, fan_in, rank, init_lora_weights, generator)
        device = model.device  # a 4-bit projection may hold no parameter of its own
        factors[site] = LoraFactors(
            a.to(device, dtype), b.to(device, dtype), rank, alpha, lora_scale(rank, alpha, use_rslora)
        )
    for p in model.parameters():
        p.requires_grad_(False)
    _place(model, factors, requires_grad=True, dropout=lora_dropout)
    for p in trainable_biases(model, bias):
        p.requires_grad_(True)
    model.lora_settings = settings
    logger.info(trainable_summary(model))
    return model


def _check_whole_biases(model: nn.Module, chosen) -> None:
    """bias="lora_only" trains the biases of adapted modules; one bias tensor shared by several
    projections (fused q/k/v) cannot train for some of them only."""
    blocks: dict[str, set[str]] = {}
    for site in chosen:
        if site.peft_param is None:
            blocks.setdefault(site.module, set()).add(site.unit)
    for path, names in blocks.items():
        module = model.get_submodule(path)
        if module.bias is not None and names != set(module.names):
            raise AdapterError(
                f"bias='lora_only' would train the bias of {sorted(names)} but not of "
                f"{sorted(set(module.names) - names)}, which share one bias tensor here ({path}.bias). Target "
                "all of them, or use bias='all' or 'none'."
            )


def trainable_biases(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """The base biases PEFT's `bias` mode trains: none, all, or those of the adapted projections."""
    if mode == "none":
        return []
    out = []
    for module in model.modules():
        if isinstance(module, Projection) and module.bias is not None:
            if mode == "all" or (isinstance(module, LoraProjection) and module.rank):
                out.append(module.bias)
    return out


def adapted_sites(model: nn.Module) -> list[tuple[LoraSite, nn.Module]]:
    """(site, its LoRA module) for every site that carries LoRA, in model order."""
    out = []
    for site in fmt.lora_sites(model):
        module = model.get_submodule(site.module)
        if isinstance(module, (LoraProjection, LoraSparseMoE)) and site.unit in module.rank:
            out.append((site, module))
    return out


def _factors_of(site: LoraSite, module, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of one site (or their gradients), in velotune's layout."""
    if isinstance(module, LoraProjection):
        a, b = module.lora_A, module.lora_B[site.unit]
    else:
        a, b = module.lora_A[site.unit], module.lora_B[site.unit]
    if grad:
        if a.grad is None or b.grad is None:
            raise AdapterError(f"LoRA at {site.peft_key} has no gradient; run a backward pass first.")
        a, b = a.grad, b.grad
    if isinstance(module, LoraProjection):
        start = sum(module.rank[n] for n in module.lora_blocks()[: module.lora_blocks().index(site.unit)])
        a = a[start : start + module.rank[site.unit]]
    return a, b


def adapter_tensors(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors (or their gradients) under PEFT's keys and in PEFT's layout."""
    adapted = adapted_sites(model)
    keys = fmt.weight_keys([s for s, _ in adapted])
    tensors = {}
    for site, module in adapted:
        a, b = fmt.to_peft_layout(site, *_factors_of(site, module, grad))
        key_a, key_b = keys[site]
        tensors[key_a], tensors[key_b] = a, b
    settings = getattr(model, "lora_settings", None)
    mode = settings.bias if settings is not None else "none"
    for site, key in fmt.bias_keys(fmt.lora_sites(model), {s for s, _ in adapted}, mode).items():
        module = model.get_submodule(site.module)
        if module.bias is None:
            continue
        if grad:
            if module.bias.grad is None:
                raise AdapterError(
                    f"the bias of {site.peft_module} has no gradient; run a backward pass first."
                )
            rows = module.bias.grad
        else:
            rows = module.bias
        start = sum(module.out_sizes[: module.names.index(site.unit)])
        tensors[key] = rows[start : start + module.out_sizes[module.names.index(site.unit)]]
    return tensors


def save_adapter(model: nn.Module, folder: str) -> None:
    """Writes adapter_config.json and adapter_model.safetensors exactly as PEFT names them."""
    adapted = adapted_sites(model)
    if not adapted:
        raise AdapterError("this model has no LoRA adapter to save.")
    if any(m.merged for _, m in adapted):
        raise AdapterError("the adapter is merged into the base weights; save before merging, or unmerge.")
    values = {site: (module.rank[site.unit], module.alpha[site.unit]) for site, module in adapted}
    rank_pattern, alpha_pattern = fmt.patterns_for(
        values, model.lora_settings.r, model.lora_settings.lora_alpha
    )
    settings = dataclasses.replace(
        model.lora_settings, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    config = fmt.config_dict(settings, [s for s, _ in adapted])
    fmt.write_adapter(folder, config, adapter_tensors(model))


def load_adapter(model: nn.Module, folder: str, is_trainable: bool = False) -> nn.Module:
    """Loads a PEFT-format LoRA adapter; on sites that already carry LoRA, the loaded weights replace it."""
    settings = fmt.read_settings(folder)
    tensors = fmt.read_adapter_weights(folder)
    try:
        loaded = fmt.adapter_factors(model, settings, tensors)
    except AdapterError as exc:
        raise AdapterError(f"{folder}: {exc}") from exc
    if not loaded:
        raise AdapterError(f"{folder} holds no LoRA weights.")
    existing = lora_modules(model)
    kept = [s for s, _ in adapted_sites(model) if s not in loaded]
    if kept and model.lora_settings.use_rslora != settings.use_rslora:
        raise AdapterError(
            f"{folder} has use_rslora={settings.use_rslora} but the model keeps LoRA with "
            f"use_rslora={model.lora_settings.use_rslora} on {len(kept)} other site(s); one adapter cannot mix both."
        )
    dtypes = [p.dtype for m in existing.values() for p in m.lora_B.values()]
    dtype = dtypes[0] if dtypes else lora_dtype_for(model.dtype)
    factors = {}
    for site, f in loaded.items():
        device = model.device  # a 4-bit projection may hold no parameter of its own
        factors[site] = LoraFactors(f.a.to(device, dtype), f.b.to(device, dtype), f.r, f.alpha, f.scale)
    if settings.lora_dropout > 0 and any(s.peft_param is not None for s in factors):
        raise AdapterError(
            f"{folder}: lora_dropout > 0 with MoE parameter targets is not a valid PEFT adapter."
        )
    biases = _loaded_biases(model, tensors, folder)
    for p in model.parameters():
        p.requires_grad_(False)
    _place(model, factors, requires_grad=is_trainable, dropout=settings.lora_dropout)
    with torch.no_grad():
        for rows, tensor in biases:
            rows.copy_(tensor)
    for p in lora_parameters(model) + trainable_biases(model, settings.bias):
        p.requires_grad_(is_trainable)
    if not kept:
        model.lora_settings = settings
    else:
        # The model's settings still describe the sites it kept; save gives the loaded ones exact patterns.
        model.lora_settings.lora_dropout = settings.lora_dropout
    if not model.lora_settings.base_model_name_or_path:
        model.lora_settings.base_model_name_or_path = getattr(model, "name_or_path", None)
    logger.info(
        "loaded LoRA adapter from %s on %d site(s); %s", folder, len(factors), trainable_summary(model)
    )
    return model


def _loaded_biases(model: nn.Module, tensors: dict[str, torch.Tensor], folder: str) -> list[tuple]:
    """(bias rows of the model, tensor) for every projection bias the adapter file carries."""
    _, biases = fmt.group_lora_keys(tensors)
    sites = {s.peft_module: s for s in fmt.lora_sites(model) if s.peft_param is None}
    out = []
    for path, tensor in biases.items():
        site = sites.get(path)
        bias = model.get_submodule(site.module).bias if site is not None else None
        rows = bias[fmt.block_rows(model, site)] if bias is not None else None
        if rows is None or rows.shape != tensor.shape:
            raise AdapterError(
                f"{folder}: the adapter carries a bias for {path} {list(tensor.shape)}, which this model "
                f"{'has no bias for' if rows is None else f'has with shape {list(rows.shape)}'}."
            )
        out.append((rows, tensor.to(rows.device, rows.dtype)))
    return out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every LoRA pair into its base weight (W += s B A) and puts the plain modules back."""
    for path, module in lora_modules(model).items():
        module.merge()
        plain = module.to_base() if isinstance(module, LoraProjection) else module.to_base(model.spec)
        plain.train(module.training)
        _set_submodule(model, path, plain)
    model.lora_settings = None
    return model
