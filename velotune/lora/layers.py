"""LoRA on the decoder's fused projections and on sparse-MoE experts.

`LoraProjection` replaces a `Projection` (q/k/v, o, gate/up, down) and keeps the same base weight
and bias objects. Each named block of the projection may carry its own LoRA pair: the A_i are
stored stacked in one parameter `lora_A` [sum r_i, in] so the forward runs one GEMM for all of
them, and each B_i [out_i, r_i] lives in `lora_B[name]`. `LoraSparseMoE` replaces a `SparseMoE`
and adds LoRA per expert on the fused gate/up and down tensors, and on the router.

The math lives in `velotune.kernels.lora`; these modules hold the parameters, their
initialisation, and merge / unmerge (W += s B A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import AdapterError
from velotune.kernels.activations import gated_activation
from velotune.kernels.lora import LoraLayout, lora_layout, lora_project, lora_projection
from velotune.models.layers import Projection, SparseMoE
from velotune.models.spec import ArchSpec

MOE_UNITS = ("router", "gate_up", "down")


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_dtype_for(base_dtype: torch.dtype) -> torch.dtype:
    # As PEFT does by default: 16-bit bases get float32 adapters, the optimizer state follows them.
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


@dataclass
class LoraFactors:
    """One LoRA pair before it is placed: A [..., r, in] and B [..., out, r], with its rank and alpha."""

    a: torch.Tensor
    b: torch.Tensor
    r: int
    alpha: float
    scale: float


def init_factors(
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    r: int,
    init: bool | str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's initialisations, drawn on the CPU from `generator` so that a seed gives the same
    adapter on every device. True: A kaiming-uniform(a=sqrt(5)), B zeros. "gaussian": A normal with
    std 1/r, B zeros. False: both as nn.Linear's default (B random too: the adapter starts non-zero)."""
    a = torch.empty(a_shape, dtype=torch.float32)
    b = torch.zeros(b_shape, dtype=torch.float32)
    # kaiming_uniform_(a=sqrt(5)) on a [rows, fan_in] matrix is uniform(+-1/sqrt(fan_in)).
    if init is True or init is False:
        a.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
    elif isinstance(init, str) and init.lower() == "gaussian":
        a.normal_(0.0, 1.0 / r, generator=generator)
    else:
        raise AdapterError(f"init_lora_weights={init!r} is not supported; use True, False or 'gaussian'.")
    if init is False:
        b.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=generator)
    return a, b


class MergeToggle:
    """merge() folds s B A into the base weights (computed in float32, rounded once); unmerge() takes
    it back out. Subclasses say how in `_add_deltas(sign)`."""

    merged: bool

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._add_deltas(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._add_deltas(-1.0)
        self.merged = False


class LoraProjection(MergeToggle, Projection):
    """A `Projection` whose named blocks may each carry a LoRA pair (see the module docstring)."""

    def __init__(self, base: Projection):
        with torch.device("meta"):
            super().__init__(base.in_features, base.out_sizes, base.names, bias=False)
        del self.weight  # the base's weight object may be a quantized weight module, not a Parameter
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A: nn.Parameter | None = None
        self.lora_B = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.lora_dropout = 0.0
        self.merged = False
        # Worked out once in set_lora, read by every forward: (layout, names of the blocks with LoRA).
        self._layout: LoraLayout | None = None
        self._b_names: tuple[str, ...] = ()

    def lora_blocks(self) -> list[str]:
        """Names of the blocks that carry LoRA, in the order their A rows are stacked."""
        return [name for name in self.names if name in self.rank]

    def lora_a(self, name: str) -> torch.Tensor:
        start = 0
        for other in self.lora_blocks():
            if other == name:
                return self.lora_A[start : start + self.rank[name]]
            start += self.rank[other]
        raise KeyError(name)

    def set_lora(self, factors: dict[str, LoraFactors], requires_grad: bool = True) -> None:
        """Places (or replaces) the LoRA pairs of the given blocks; the other blocks keep theirs."""
        if self.merged:
            raise AdapterError("cannot change LoRA weights of a merged projection; unmerge it first.")
        unknown = set(factors) - set(self.names)
        if unknown:
            raise AdapterError(f"{sorted(unknown)} are not blocks of this projection ({self.names}).")
        kept = {name: self.lora_a(name).detach() for name in self.lora_blocks() if name not in factors}
        for name, f in factors.items():
            out = self.out_sizes[self.names.index(name)]
            if tuple(f.a.shape) != (f.r, self.in_features) or tuple(f.b.shape) != (out, f.r):
                raise AdapterError(
                    f"LoRA for {name}: expected A [{f.r}, {self.in_features}] and B [{out}, {f.r}], got "
                    f"{list(f.a.shape)} and {list(f.b.shape)}."
                )
            self.rank[name], self.alpha[name], self.scale[name] = f.r, f.alpha, f.scale
        stacked = [factors[n].a if n in factors else kept[n] for n in self.lora_blocks()]
        with torch.no_grad():
            self.lora_A = nn.Parameter(torch.cat(stacked).contiguous(), requires_grad=requires_grad)
            for name, f in factors.items():
                self.lora_B[name] = nn.Parameter(f.b.detach().clone(), requires_grad=requires_grad)
        ranks = [self.rank.get(n, 0) for n in self.names]
        self._layout = lora_layout(
            self.in_features, self.out_sizes, [self.scale.get(n, 0.0) for n in self.names], ranks
        )
        self._b_names = tuple(self.lora_blocks())

    def lora_parts(self) -> tuple:
        if self.merged or not self._b_names:
            return super().lora_parts()
        lora_b = self.lora_B
        bs = tuple(getattr(lora_b, n) for n in self._b_names)
        return (
            self.weight,
            self.bias,
            self.lora_A,
            bs,
            self._layout,
            self.lora_dropout if self.training else 0.0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._b_names:
            return super().forward(x)
        weight, bias, lora_a, lora_bs, layout, dropout = self.lora_parts()
        return lora_project(x, weight, bias, lora_a, lora_bs, layout, dropout=dropout, training=self.training)

    def _delta(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].float() @ self.lora_a(name).float()) * self.scale[name]

    def _add_deltas(self, sign: float) -> None:
        start = 0
        for name, size in zip(self.names, self.out_sizes):
            if name in self.rank:
                rows = self.weight[start : start + size]
                rows.copy_((rows.float() + sign * self._delta(name)).to(rows.dtype))
            start += size

    def to_base(self) -> Projection:
        """A plain `Projection` over the same weight and bias objects (LoRA dropped, merged or not)."""
        with torch.device("meta"):
            plain = Projection(self.in_features, self.out_sizes, self.names, bias=False)
        del plain.weight
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank[n]} s={self.scale[n]:g}" for n in self.lora_blocks())
        return f"{super().extra_repr()}, lora=({ranks})"


class LoraSparseMoE(MergeToggle, SparseMoE):
    """A `SparseMoE` with LoRA per expert on gate/up (one pair over the fused tensor, as PEFT adapts
    Transformers 5's fused expert tensor) and down, and LoRA on the router.

    Per expert e: lora_A["gate_up"][e] [R, hidden], lora_B["gate_up"][e] [2I, R];
    lora_A["down"][e] [r, I], lora_B["down"][e] [hidden, r]; router: A [r, hidden], B [E, r].
    """

    def __init__(self, base: SparseMoE, spec: ArchSpec):
        with torch.device("meta"):
            super().__init__(spec)
        self.router, self.gate_up, self.down = base.router, base.gate_up, base.down
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.merged = False

    def base_shape(self, unit: str) -> tuple[int, ...]:
        return tuple({"router": self.router, "gate_up": self.gate_up, "down": self.down}[unit].shape)

    def set_lora(self, factors: dict[str, LoraFactors], requires_grad: bool = True) -> None:
        if self.merged:
            raise AdapterError("cannot change LoRA weights of merged experts; unmerge them first.")
        for unit, f in factors.items():
            if unit not in MOE_UNITS:
                raise AdapterError(f"{unit!r} is not one of the sparse-MoE LoRA units {MOE_UNITS}.")
            shape = self.base_shape(unit)
            lead, out, inp = shape[:-2], shape[-2], shape[-1]
            if tuple(f.a.shape) != (*lead, f.r, inp) or tuple(f.b.shape) != (*lead, out, f.r):
                raise AdapterError(
                    f"LoRA for experts' {unit}: expected A {[*lead, f.r, inp]} and B {[*lead, out, f.r]}, got "
                    f"{list(f.a.shape)} and {list(f.b.shape)}."
                )
            self.rank[unit], self.alpha[unit], self.scale[unit] = f.r, f.alpha, f.scale
            with torch.no_grad():
                self.lora_A[unit] = nn.Parameter(
                    f.a.detach().clone().contiguous(), requires_grad=requires_grad
                )
                self.lora_B[unit] = nn.Parameter(
                    f.b.detach().clone().contiguous(), requires_grad=requires_grad
                )

    def _project(self, unit: str, x: torch.Tensor, weight: torch.Tensor, expert: int | None) -> torch.Tensor:
        if self.merged or unit not in self.rank:
            return F.linear(x, weight)
        a, b = self.lora_A[unit], self.lora_B[unit]
        if expert is not None:
            a, b = a[expert], b[expert]
        return lora_projection(x, weight, None, a, [b], (weight.shape[0],), (self.scale[unit],))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("router", x, self.router, None)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        h = gated_activation(self._project("gate_up", x, self.gate_up[expert], expert), self.activation)
        return self._project("down", h, self.down[expert], expert)

    def _add_deltas(self, sign: float) -> None:
        for unit in self.rank:
            weight = {"router": self.router, "gate_up": self.gate_up, "down": self.down}[unit]
            delta = torch.matmul(self.lora_B[unit].float(), self.lora_A[unit].float()) * self.scale[unit]
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def to_base(self, spec: ArchSpec) -> SparseMoE:
        with torch.device("meta"):
            plain = SparseMoE(spec)
        plain.router, plain.gate_up, plain.down = self.router, self.gate_up, self.down
        return plain
