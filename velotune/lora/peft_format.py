"""PEFT's adapter format: the one place that spells PEFT's module names, keys and config fields.

A LoRA *site* is one place an adapter can sit: a named block of a `Projection` (q_proj, ...) or one
of a sparse MoE's tensors (router, gate/up, down). Its PEFT name is derived from the family's
checkpoint tensor names (`Family.tensor_slots`), which already say which Hugging Face tensor
fills which internal parameter: the HF module whose `.weight` fills block `q_proj` of
`layers.0.attn.qkv` is PEFT's `model.layers.0.self_attn.q_proj`.

PEFT writes, for a module target, `base_model.model.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r]. With Transformers 5, MoE experts are 3-D parameters that PEFT adapts as
`target_parameters` through nested `ParamWrapper`s: the module's targeted parameters wrap it in
their declaration order, the first innermost, so its keys carry one `.base_layer` per wrapper
above it. Expert weights are stacked: lora_A [E*r, in] expert-major, lora_B [out, r*E] with
column j*E + e holding rank j of expert e. PEFT fuses Mixtral's w1 and w3 into one gate_up pair
of rank 2r and alpha 2*alpha (its `rank_pattern` / `alpha_pattern`), and we do the same.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from velotune.errors import AdapterError
from velotune.lora.layers import LoraFactors, lora_scale
from velotune.models.families import family_of
from velotune.models.layers import Projection, SparseMoE
from velotune.paths import plain_file_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
_MAX_CONFIG_BYTES = 16 * 1024 * 1024  # an adapter_config.json is a few kB
KEY_PREFIX = "base_model.model."

# How target_modules names a sparse MoE's tensors: (names that must all be targeted, rank multiplier).
# PEFT's (Transformers 4's) names: the router is `gate`, the experts' gate / up / down projections are
# w1 / w3 / w2; PEFT adapts the fused gate/up tensor with rank 2r and alpha 2*alpha when w1 and w3 are
# targeted, and with rank r when its own name is. gate_proj / up_proj / down_proj are accepted as
# well, so the usual seven-name target list adapts a MoE model's experts too.
MOE_SPELLINGS = {
    "router": [(("gate",), 1)],
    "gate_up": [(("w1", "w3"), 2), (("gate_proj", "up_proj"), 2), (("gate_up_proj",), 1)],
    "down": [(("w2",), 1), (("down_proj",), 1)],
}
# Checkpoints that store projections fused (Phi-3): the names of what each fused tensor holds.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ALL_LINEAR = "all-linear"
# PEFT's bias modes: no base bias trains, every one does, or those of the adapted modules.
BIAS_MODES = ("none", "all", "lora_only")

# adapter_config.json features velotune cannot honour: loading would silently change the model.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA adapters with a bias on lora_B (lora_bias=True)",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "adapters with trainable token indices",
    "layer_replication": "adapters with layer_replication",
    "use_qalora": "QA-LoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 Conv1D layout)",
}


@dataclass(frozen=True)
class LoraSite:
    module: str  # internal module path: "layers.0.attn.qkv", "layers.0.mlp"
    unit: str  # a Projection block name ("q_proj"), or "router" | "gate_up" | "down" of a sparse MoE
    peft_module: str  # "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts"
    peft_param: str | None = None  # for PEFT parameter targets: "gate_up_proj", "down_proj", "weight"
    num_experts: int = 0  # > 0: PEFT's stacked 3-D expert layout

    @property
    def peft_key(self) -> str:
        """The key PEFT matches target / rank / alpha patterns against."""
        return self.peft_module if self.peft_param is None else f"{self.peft_module}.{self.peft_param}"

    @property
    def target_name(self) -> str:
        """The entry of target_modules (module sites) or target_parameters (parameter sites)."""
        leaf = self.peft_module.rsplit(".", 1)[-1]
        if self.peft_param is None:
            return leaf
        # A bare "weight" would match every parameter of the model.
        return f"{leaf}.{self.peft_param}" if self.peft_param in ("weight", "bias") else self.peft_param


@dataclass
class LoraSettings:
    """What adapter_config.json says about a LoRA adapter, velotune's subset of PEFT's LoraConfig."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    # As read from a file; a save writes patterns computed from each site's own rank and alpha.
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    # As read from a file (it tells nested ParamWrappers apart); a save writes the adapted sites' own.
    target_parameters: list | None = None


def lora_sites(model) -> list[LoraSite]:
    """Every place of `model` that can carry LoRA, with its PEFT name, in model order."""
    slots = family_of(model.spec.model_type).tensor_slots(model.spec)
    by_internal: dict[str, list[tuple[str, tuple]]] = {}
    for hf_name, slot in slots.items():
        by_internal.setdefault(slot.internal, []).append((hf_name, slot.index))
    sites = []
    for path, module in model.named_modules():
        if isinstance(module, Projection):
            for name in module.names:
                hf = [n for n, _ in by_internal.get(f"{path}.weight", []) if n.endswith(f".{name}.weight")]
                if len(hf) != 1:
                    raise AdapterError(f"no unique checkpoint name for block {name} of {path}: {hf}")
                sites.append(LoraSite(path, name, hf[0][: -len(".weight")]))
        elif isinstance(module, SparseMoE):
            sites.extend(_moe_sites(path, module, by_internal))
    return sites


def _moe_sites(path: str, module: SparseMoE, by_internal) -> list[LoraSite]:
    # Transformers 5 names the whole (unsliced) tensors; the per-expert names of older checkpoints
    # map to slices and PEFT no longer targets them.
    def whole(attr: str) -> list[str]:
        return [n for n, index in by_internal.get(f"{path}.{attr}", []) if index == ()]

    experts = {attr: whole(attr) for attr in ("gate_up", "down")}
    if any(len(v) != 1 for v in experts.values()):
        raise AdapterError(f"no unique checkpoint names for the experts of {path}: {experts}")
    experts_module, gate_up_param = experts["gate_up"][0].rsplit(".", 1)
    down_module, down_param = experts["down"][0].rsplit(".", 1)
    block = experts_module.rsplit(".", 1)[0]
    # The router's tensor is the one beside the experts (model.layers.N.mlp.gate.weight).
    router = [n for n in whole("router") if n.rsplit(".", 2)[0] == block]
    if len(router) != 1:
        raise AdapterError(f"no unique checkpoint name for the router of {path}: {whole('router')}")
    router_module, router_param = router[0].rsplit(".", 1)
    n = module.moe.num_experts
    return [
        LoraSite(path, "router", router_module, router_param),
        LoraSite(path, "gate_up", experts_module, gate_up_param, n),
        LoraSite(path, "down", down_module, down_param, n),
    ]


def spellings(site: LoraSite) -> list[tuple[tuple[str, ...], int]]:
    """The ways target_modules can select a site: (names that must all be targeted, rank multiplier).
    The first is what "all-linear" selects."""
    if site.peft_param is not None:
        return MOE_SPELLINGS[site.unit]
    fused = FUSED_PROJECTIONS.get(site.unit)
    return [((site.unit,), 1)] + ([(fused, 1)] if fused else [])


def _pseudo_path(site: LoraSite, name: str) -> str:
    # Where a module of that name would sit: beside the site's module for projections (so
    # "self_attn.q_proj" selects Phi-3's qkv_proj too), inside the experts module for MoE names.
    if site.num_experts:
        return f"{site.peft_module}.{name}"
    return f"{site.peft_module.rsplit('.', 1)[0]}.{name}"


def _suffix_match(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def valid_target_names(sites: list[LoraSite]) -> list[str]:
    return sorted({name for s in sites for names, _ in spellings(s) for name in names})


def resolve_targets(sites: list[LoraSite], target_modules) -> dict[LoraSite, int]:
    """The sites `target_modules` selects, each with its rank multiplier (2 for a MoE gate/up tensor
    that fuses the two projections PEFT would have adapted apart, as PEFT does).

    `target_modules` is a list of names (PEFT's rule: a name selects a module whose path ends in it),
    "all-linear", or a regular expression matched against whole module paths. A fused tensor is
    selected by its own name or by all the names it fuses (q_proj + k_proj + v_proj for qkv_proj).
    """
    valid = valid_target_names(sites) + [ALL_LINEAR]
    if isinstance(target_modules, str):
        # A bare name is taken as a one-name list (PEFT would try it as a whole-path regex and fail).
        plain = target_modules == ALL_LINEAR or target_modules in valid
        target_modules = [target_modules] if plain else re.compile(target_modules)
    if not isinstance(target_modules, re.Pattern):
        target_modules = list(target_modules)
        if not target_modules:
            raise AdapterError(f"target_modules is empty; name some of {valid}.")
        if ALL_LINEAR in target_modules:
            if len(target_modules) > 1:
                raise AdapterError(f"'{ALL_LINEAR}' already names every projection; pass it alone.")
            return {s: spellings(s)[0][1] for s in sites}

    used: set[str] = set()

    def targeted(site: LoraSite, name: str) -> bool:
        path = _pseudo_path(site, name)
        if isinstance(target_modules, re.Pattern):
            return target_modules.fullmatch(path) is not None
        hits = {t for t in target_modules if _suffix_match(path, t)}
        used.update(hits)
        return bool(hits)

    chosen = {}
    for site in sites:
        partial = []
        for names, multiplier in spellings(site):
            hit = [targeted(site, name) for name in names]  # every spelling is tried: it marks names used
            if all(hit):
                chosen.setdefault(site, multiplier)
            elif any(hit):
                partial.append(names)
        if site not in chosen and partial:
            raise AdapterError(
                f"{' and '.join(partial[0])} are one fused tensor in this model ({site.peft_key}): target all of "
                f"{list(partial[0])} or none of them."
            )
    if isinstance(target_modules, re.Pattern):
        if not chosen:
            raise AdapterError(
                f"target_modules regex {target_modules.pattern!r} matches no module of this model. Valid names: {valid}."
            )
        return chosen
    unknown = [t for t in target_modules if t not in used]
    if unknown:
        raise AdapterError(
            f"target_modules {unknown} match no module of this model. Valid names for this model: {valid}."
        )
    return chosen


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def patterns_for(values: dict[LoraSite, tuple[int, float]], r: int, alpha: float) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern that give every site its (rank, alpha) over the global r / alpha.

    PEFT takes the first pattern that matches and saves configs with sorted keys, so the patterns
    written here never overlap: one per target name (PEFT's own form, ".*\\.gate_up_proj") when all its
    sites agree, else one per site that differs, spelled out in full.
    """
    by_name: dict[str, dict[LoraSite, tuple[int, float]]] = {}
    for site, value in values.items():
        by_name.setdefault(site.target_name, {})[site] = value
    rank_pattern, alpha_pattern = {}, {}
    for name, group in by_name.items():
        distinct = set(group.values())
        if len(distinct) == 1:
            rank, site_alpha = distinct.pop()
            if (rank, site_alpha) != (r, alpha):
                pattern = rf".*\.{re.escape(name)}"
                rank_pattern[pattern], alpha_pattern[pattern] = rank, site_alpha
            continue
        for site, (rank, site_alpha) in group.items():
            if (rank, site_alpha) != (r, alpha):
                pattern = re.escape(site.peft_key)
                rank_pattern[pattern], alpha_pattern[pattern] = rank, site_alpha
    return rank_pattern, alpha_pattern


# ----------------------------------------------------------------------------------------- keys


def _param_depths(sites: list[LoraSite]) -> dict[LoraSite, int]:
    """How many ParamWrappers nest above each parameter site (sites of one module, in declaration order)."""
    by_module: dict[str, list[LoraSite]] = {}
    for s in sites:
        if s.peft_param is not None:
            by_module.setdefault(s.peft_module, []).append(s)
    return {s: len(group) - 1 - i for group in by_module.values() for i, s in enumerate(group)}


def weight_keys(sites: list[LoraSite]) -> dict[LoraSite, tuple[str, str]]:
    """PEFT's safetensors keys (lora_A, lora_B) of each adapted site; `sites` are the adapted ones, in model order."""
    depths = _param_depths(sites)
    keys = {}
    for s in sites:
        stem = KEY_PREFIX + s.peft_module + ".base_layer" * depths.get(s, 0)
        keys[s] = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
    return keys


def to_peft_layout(site: LoraSite, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """velotune's per-expert A [E, r, in], B [E, out, r] -> PEFT's stacked [E*r, in], [out, r*E]."""
    if not site.num_experts:
        return a, b
    n, r = a.shape[0], a.shape[1]
    return a.reshape(n * r, a.shape[2]), b.permute(1, 2, 0).reshape(b.shape[1], r * n)


def from_peft_layout(site: LoraSite, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not site.num_experts:
        return a, b
    n = site.num_experts
    if a.shape[0] % n or b.shape[1] % n:
        raise AdapterError(
            f"{site.peft_key}: expert LoRA shapes {list(a.shape)}, {list(b.shape)} do not split into {n} experts."
        )
    r = a.shape[0] // n
    return a.reshape(n, r, a.shape[1]), b.reshape(b.shape[0], r, n).permute(2, 0, 1)


# --------------------------------------------------------------------------------------- config


def read_settings(folder: str) -> LoraSettings:
    """Reads adapter_config.json, refusing what velotune would load wrongly."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}; point at a folder saved by PEFT or velotune.")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc}") from exc
    if len(raw) > _MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is larger than {_MAX_CONFIG_BYTES} bytes; it is not an adapter config.")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{path} is not valid UTF-8 JSON ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} must hold a JSON object.")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(
            f"{path} holds a {cfg.get('peft_type')} adapter; velotune loads LoRA adapters only."
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(f"{path}: {what} are not supported by velotune ({key}={cfg[key]!r}).")
    bias = cfg.get("bias") or "none"
    if bias not in BIAS_MODES:
        raise AdapterError(f"{path}: bias={bias!r} is not one of PEFT's {BIAS_MODES}.")
    r = cfg.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise AdapterError(f"{path}: r={r!r} must be a positive integer (the LoRA rank).")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise AdapterError(f"{path}: {key} must be a JSON object, got {cfg[key]!r:.100}.")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{path}: base_model_name_or_path must be a string, got {base!r:.100}.")
    init = cfg.get("init_lora_weights", True)
    try:
        return LoraSettings(
            r=r,
            lora_alpha=cfg.get("lora_alpha", 8),
            lora_dropout=float(cfg.get("lora_dropout") or 0.0),
            use_rslora=bool(cfg.get("use_rslora", False)),
            bias=bias,
            init_lora_weights=init if isinstance(init, (bool, str)) else True,
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            base_model_name_or_path=base,
            target_parameters=list(cfg.get("target_parameters") or []) or None,
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path} holds a value velotune cannot use ({exc}).") from exc


def config_dict(settings: LoraSettings, adapted: list[LoraSite]) -> dict:
    """adapter_config.json for the adapted sites, written by PEFT's own LoraConfig."""
    from peft import LoraConfig

    modules = sorted({s.target_name for s in adapted if s.peft_param is None})
    params = list(dict.fromkeys(s.target_name for s in adapted if s.peft_param is not None))
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        use_rslora=settings.use_rslora,
        bias=settings.bias,
        init_lora_weights=settings.init_lora_weights,
        target_modules=modules,
        target_parameters=params or None,
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern=dict(settings.alpha_pattern),
        base_model_name_or_path=settings.base_model_name_or_path,
        inference_mode=True,
    )
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def write_adapter(folder: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_weights(folder: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors. The safetensors library validates the header before mapping the file
    (sizes bounded by the file); a pickled adapter is read with weights_only=True, so no code runs."""
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{path} is not a readable safetensors file ({exc}); it is corrupt.") from exc
    path = os.path.join(folder, ADAPTER_WEIGHTS_PICKLE)
    if os.path.isfile(path):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses code with UnpicklingError; corrupt files raise others
            raise AdapterError(
                f"{path} could not be read safely ({type(exc).__name__}: {exc}). Save the adapter as "
                f"{ADAPTER_WEIGHTS} with PEFT in an environment you trust."
            ) from exc
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterError(f"{path} does not hold a mapping of names to tensors.")
        return tensors
    raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_PICKLE}).")


def check_adapter_name(adapter_name) -> str:
    """PEFT keeps a named adapter in the sub-folder `<save_directory>/<adapter_name>`: the name must
    be a plain folder name, never a path out of the save directory."""
    return plain_file_name(adapter_name, "adapter_name", AdapterError)


def group_lora_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({module path with any .base_layer segments: {"A": tensor, "B": tensor}}, {module path: bias})
    from PEFT's keys. Biases are those PEFT saves with bias="all" / "lora_only"."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    other = []
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is not None:
            groups.setdefault(m.group(1), {})[m.group(2)] = tensor
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+?)(?:\.base_layer)?\.bias", key)
        if m is not None:
            biases[m.group(1)] = tensor
            continue
        other.append(key)
    if other:
        raise AdapterError(
            f"the adapter holds tensors velotune does not know how to load, e.g. {other[:3]}; only lora_A / "
            "lora_B weights and projection biases are supported."
        )
    broken = [k for k, v in groups.items() if set(v) != {"A", "B"}]
    if broken:
        raise AdapterError(f"the adapter lacks the lora_A or lora_B half of {broken[:3]}.")
    return groups, biases


def bias_keys(sites: list[LoraSite], adapted: set[LoraSite], mode: str) -> dict[LoraSite, str]:
    """PEFT's key of the bias of each projection site whose bias an adapter with `mode` saves.
    An adapted module's bias sits under PEFT's wrapper (`.base_layer.bias`)."""
    if mode == "none":
        return {}
    chosen = [s for s in sites if s.peft_param is None and (mode == "all" or s in adapted)]
    return {s: f"{KEY_PREFIX}{s.peft_module}{'.base_layer' if s in adapted else ''}.bias" for s in chosen}


def block_rows(model, site: LoraSite) -> slice:
    """The rows of the site's projection (weight or bias) that belong to its block."""
    module = model.get_submodule(site.module)
    i = module.names.index(site.unit)
    start = sum(module.out_sizes[:i])
    return slice(start, start + module.out_sizes[i])


def site_shapes(model, site: LoraSite, r: int) -> tuple[tuple, tuple, int]:
    """Shapes of A and B (velotune's layout) for rank r at `site`, and A's fan-in."""
    module = model.get_submodule(site.module)
    if isinstance(module, Projection):
        out = module.out_sizes[module.names.index(site.unit)]
        return (r, module.in_features), (out, r), module.in_features
    base = getattr(module, site.unit).shape  # a sparse MoE's units are its tensors' attribute names
    lead, out, inp = tuple(base[:-2]), base[-2], base[-1]
    return (*lead, r, inp), (*lead, out, r), inp


def adapter_factors(
    model, settings: LoraSettings, tensors: dict[str, torch.Tensor]
) -> dict[LoraSite, LoraFactors]:
    """The LoRA pairs an adapter file holds, per site of `model`, in velotune's layout (on the CPU).

    Keys are PEFT's for this model, or, for MoE experts, the per-expert keys PEFT wrote with
    Transformers 4 (block_sparse_moe.experts.E.w1, ...), which are folded into the fused tensors'
    pairs exactly as PEFT converts them.
    """
    sites = lora_sites(model)
    groups, _ = group_lora_keys(tensors)
    matched, unknown = match_groups(sites, groups, settings.target_parameters)
    factors = {}
    for site, pair in matched.items():
        a, b = from_peft_layout(site, pair["A"], pair["B"])
        rank = a.shape[-2]
        expected = pattern_value(settings.rank_pattern, site.peft_key, settings.r)
        if rank != expected:
            raise AdapterError(
                f"{site.peft_key} has LoRA rank {rank} but adapter_config.json says {expected}."
            )
        _check_shapes(model, site, a, b)
        alpha = pattern_value(settings.alpha_pattern, site.peft_key, settings.lora_alpha)
        factors[site] = LoraFactors(a, b, rank, alpha, lora_scale(rank, alpha, settings.use_rslora))
    factors.update(_per_expert_factors(model, sites, {path: groups[path] for path in unknown}, settings))
    return factors


def _check_shapes(model, site: LoraSite, a: torch.Tensor, b: torch.Tensor) -> None:
    a_shape, b_shape, _ = site_shapes(model, site, a.shape[-2])
    if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
        raise AdapterError(
            f"LoRA for {site.peft_key} has shapes {list(a.shape)}, {list(b.shape)} but this model needs "
            f"{list(a_shape)}, {list(b_shape)}. Is the adapter for another model?"
        )


def _per_expert_factors(
    model, sites, groups: dict[str, dict], settings: LoraSettings
) -> dict[LoraSite, LoraFactors]:
    """Per-expert LoRA pairs (Transformers 4 layout) stacked into the fused MoE tensors' pairs: each
    piece's A rows are appended and its B placed at the rows it adapts, its own scale folded into B."""
    if not groups:
        return {}
    slots = family_of(model.spec.model_type).tensor_slots(model.spec)
    moe_sites = {f"{s.module}.{s.unit}": s for s in sites if s.peft_param is not None}
    pieces: dict[LoraSite, list] = {}
    unknown = []
    for path, pair in groups.items():
        slot = slots.get(f"{path}.weight")
        site = moe_sites.get(slot.internal) if slot is not None else None
        if site is None:
            unknown.append(path)
            continue
        rank = pair["A"].shape[0]
        expected = pattern_value(settings.rank_pattern, path, settings.r)
        if rank != expected:
            raise AdapterError(f"{path} has LoRA rank {rank} but adapter_config.json says {expected}.")
        alpha = pattern_value(settings.alpha_pattern, path, settings.lora_alpha)
        pieces.setdefault(site, []).append(
            (slot.index, pair["A"], pair["B"], lora_scale(rank, alpha, settings.use_rslora))
        )
    if unknown:
        raise AdapterError(
            f"the adapter adapts modules this model does not have, e.g. {unknown[:3]}. Is it an adapter for "
            "another model (see base_model_name_or_path in adapter_config.json)?"
        )
    factors = {}
    for site, parts in pieces.items():
        scale = parts[0][3]
        lead = [index[0] for index, *_ in parts if index]
        experts = sorted(set(lead)) if lead else [None]
        per_expert = {e: [p for p in parts if (p[0][0] if p[0] else None) == e] for e in experts}
        ranks = {sum(p[1].shape[0] for p in group) for group in per_expert.values()}
        if len(ranks) != 1 or (lead and len(experts) != site.num_experts):
            raise AdapterError(
                f"the per-expert LoRA weights of {site.peft_key} do not cover every expert alike."
            )
        rank = ranks.pop()
        a_shape, b_shape, _ = site_shapes(model, site, rank)
        a, b = torch.zeros(a_shape, dtype=parts[0][1].dtype), torch.zeros(b_shape, dtype=parts[0][2].dtype)
        for e, group in per_expert.items():
            a_e, b_e = (a, b) if e is None else (a[e], b[e])
            col = 0
            for index, pa, pb, piece_scale in group:
                rows = index[1] if len(index) > 1 else slice(None)
                r = pa.shape[0]
                if a_e[col : col + r].shape != pa.shape or b_e[rows, col : col + r].shape != pb.shape:
                    raise AdapterError(
                        f"per-expert LoRA for {site.peft_key} does not fit the expert's shape."
                    )
                a_e[col : col + r] = pa
                b_e[rows, col : col + r] = pb * (piece_scale / scale)
                col += r
        alpha = scale * (rank**0.5 if settings.use_rslora else rank)
        factors[site] = LoraFactors(a, b, rank, alpha, scale)
    return factors


def match_groups(sites: list[LoraSite], groups: dict[str, dict], target_parameters) -> tuple[dict, list[str]]:
    """Pairs PEFT key groups with sites; returns (site -> group, paths of groups that fit no site).
    Parameter sites are told apart by their ParamWrapper depth, which depends on which parameters of
    their module the adapter targets."""
    by_module = {s.peft_module: s for s in sites if s.peft_param is None}
    targeted = [
        s for s in sites
        if s.peft_param is not None and any(_suffix_match(s.peft_key, t) for t in (target_parameters or ()))
    ]  # fmt: skip
    by_wrapped = {
        key[0][len(KEY_PREFIX) : -len(".lora_A.weight")]: s for s, key in weight_keys(targeted).items()
    }
    out, unknown = {}, []
    for path, pair in groups.items():
        site = by_module.get(path) or by_wrapped.get(path)
        if site is None:
            unknown.append(path)
        else:
            out[site] = pair
    return out, unknown
