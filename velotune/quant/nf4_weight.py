"""`NF4Weight`: a frozen [out, in] weight kept in NF4, dequantized only inside the GEMMs that use it.

The weight is a stack of row blocks, each one `NF4Tensor` quantized on its own: one per checkpoint
tensor (q_proj, k_proj and v_proj of a fused q/k/v projection), exactly as bitsandbytes quantizes
them, so a pre-quantized checkpoint loads without requantizing and saves back byte for byte.

Where the dense weight goes: each GEMM dequantizes one block at a time into a scratch buffer shared
by every NF4Weight on the device (per dtype), then runs cuBLAS on it; the buffer is overwritten by
the next block, so no dense copy outlives the call, and the forward and backward both re-dequantize.
Why a scratch buffer and not dequantization fused into a Triton GEMM's tiles: at training shapes
(thousands of tokens) the GEMM is compute-bound and cuBLAS runs it near the tensor-core peak, while
dequantizing costs ~2.5 bytes of memory traffic per weight element against 2 x tokens FLOPs (a few
percent of the GEMM's time at 4k tokens on an H100); a tiled Triton GEMM would have to match cuBLAS
to win that back. Going block by block bounds the buffer by the largest block (one projection of
the checkpoint, e.g. 117 MB in bf16 for Llama-3-8B's gate_proj) instead of the whole fused weight.
A fused weight whose parts together fit that bound (`whole_numel_limit`, set by the loader to the
model's largest block: Llama-3-8B's q/k/v, 50 MB) is dequantized whole instead, so its GEMMs run
once over all its rows: one [T, 6144] GEMM instead of three (4,096, 1,024 and 1,024 wide, the
narrow ones well below the tensor cores' rate), and in the backward no accumulation pass per part.
`linear_folded` runs a LoRA projection's forward as one GEMM: each part is dequantized into the first
columns of wider scratch rows whose last columns hold the scaled LoRA B's (`velotune.kernels.lora`).
The buffer is not stream-aware: it assumes the projections run on one CUDA stream, in order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton
from velotune.quant import nf4_matmul
from velotune.quant.nf4 import NF4Tensor, dequantize_nf4

_FIELDS = ("data", "absmax", "code", "nested_absmax", "nested_code", "nested_offset")
# The fields with one value per element or per block; the others are small tables (273 floats).
_PER_ELEMENT = ("data", "absmax", "nested_absmax")
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# Bumped whenever a scratch buffer is (re)allocated or released: CUDA graphs that captured one
# (velotune.memory.layer_graphs) are stale after that.
_scratch_generation = 0


def scratch_generation() -> int:
    return _scratch_generation


def scratch_buffer(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused by every caller on (device, dtype); its
    contents are valid only until the next call."""
    global _scratch_generation
    key = (torch.device(device), dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)  # release the smaller one before allocating
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
        _scratch_generation += 1
    return buf[:numel]


def _float32_bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as a flat float32 tensor (a copy, zero-padded to a multiple of 4 bytes)."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    pad = -raw.numel() % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.clone().view(torch.float32)


def release_scratch() -> None:
    """Frees the scratch buffers (they are re-allocated on next use)."""
    global _scratch_generation
    _scratch.clear()
    _scratch_generation += 1


class NF4Weight(nn.Module):
    """A frozen weight of shape [out_features, in_features] stored as NF4 row blocks (see the module
    docstring). It computes in `dtype`, which follows the module's dtype casts (`model.to(bf16)`),
    while the NF4 parts themselves always keep their storage dtypes.

    The parts are buffers (they move with the model and appear in its state_dict). `shape`, `dtype`,
    `device` and `is_cuda` let it stand where a weight tensor is expected by the projection op.
    """

    def __init__(
        self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str = "meta"
    ):
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.compute_dtype = dtype
        self._device = torch.device(device)
        # Per part: (first row, rows, original dtype, blocksize, nested_blocksize); tensors are buffers.
        self._parts: list[tuple[int, int, torch.dtype, int, int]] = []
        self._views: list[tuple[int, NF4Tensor]] | None = None  # parts() built once per placement or move
        self._bitcast: dict[str, tuple[torch.dtype, int]] = {}  # see store_as_parameters
        # Dequantized whole (not part by part) when it has at most this many elements; see the module
        # docstring. Fixed per weight, so a recomputation runs the same GEMMs as the forward did.
        self.whole_numel_limit = 0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_cuda(self) -> bool:
        return self._device.type == "cuda"

    @property
    def requires_grad(self) -> bool:
        return False

    def numel(self) -> int:
        return self.out_features * self.in_features

    def rows_filled(self) -> int:
        return sum(rows for _, rows, *_ in self._parts)

    def set_part(self, row0: int, q: NF4Tensor) -> None:
        """Places `q` (shape [rows, in_features]) at rows [row0, row0 + rows), on this weight's device."""
        if (
            len(q.shape) != 2
            or q.shape[1] != self.in_features
            or not 0 <= row0 <= self.out_features - q.shape[0]
        ):
            raise KernelError(
                f"an NF4 part of shape {list(q.shape)} at row {row0} does not fit a weight of shape {list(self.shape)}."
            )
        rows = q.shape[0]
        for start, n, *_ in self._parts:
            if start < row0 + rows and row0 < start + n:
                raise KernelError(
                    f"rows [{row0}, {row0 + rows}) overlap the part already at [{start}, {start + n})."
                )
        q = q.to(self._device)
        index = len(self._parts)
        for field in _FIELDS:
            self.register_buffer(f"part{index}_{field}", getattr(q, field))
        self._parts.append((row0, rows, q.dtype, q.blocksize, q.nested_blocksize))
        self._views = None

    def store_as_parameters(self) -> None:
        """Keeps the packed codes and block scales as frozen parameters (requires_grad=False) instead of
        buffers, under the same names, so that FSDP2 shards them over the ranks like any weight (1-D, so
        along their length); the code tables and offset stay buffers, whole on every rank. Sharded, the
        parameters are whole inside the layer's forward and backward only, which is when they are read.

        FSDP2 before torch 2.12 shards floating-point parameters only, so the uint8 codes are stored as
        float32 bit patterns (4 bytes per value, zero-padded at the end): they are copied and gathered,
        never converted, and read back as the original bytes."""
        for index in range(len(self._parts)):
            for field in _PER_ELEMENT:
                name = f"part{index}_{field}"
                t = self._buffers.get(name)
                if t is None:
                    continue
                del self._buffers[name]
                if not t.is_floating_point():
                    self._bitcast[name] = (t.dtype, t.numel())
                    t = _float32_bits(t)
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        self._views = None

    def _field(self, index: int, field: str) -> torch.Tensor | None:
        name = f"part{index}_{field}"
        t = getattr(self, name)
        if name in self._bitcast:
            dtype, numel = self._bitcast[name]
            t = t.view(dtype)[:numel]
        return t

    def parts(self) -> list[tuple[int, NF4Tensor]]:
        """(first row, NF4Tensor) of every part, in row order."""
        # Parameters may be swapped for other tensors (FSDP2 swaps shards and whole tensors around each
        # forward): only buffers are read once.
        if self._views is not None and not self._parameters:
            return self._views
        out = []
        for index, (row0, rows, dtype, blocksize, nested_blocksize) in enumerate(self._parts):
            tensors = {field: self._field(index, field) for field in _FIELDS}
            q = NF4Tensor(shape=(rows, self.in_features), dtype=dtype, blocksize=blocksize,
                          nested_blocksize=nested_blocksize, **tensors)  # fmt: skip
            out.append((row0, q))
        self._views = sorted(out, key=lambda item: item[0])
        return self._views

    def _check_complete(self) -> None:
        if self.rows_filled() != self.out_features:
            raise KernelError(
                f"this 4-bit weight holds {self.rows_filled()} of its {self.out_features} rows; load every part first."
            )

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (default: the compute dtype): a new tensor, or `out`."""
        self._check_complete()
        dtype = dtype or self.compute_dtype
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self._device)
        for row0, q in self.parts():
            dequantize_nf4(q, out=out[row0 : row0 + q.shape[0]])
        return out

    def _part_in_scratch(self, q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = scratch_buffer(q.numel(), self._device, dtype)
        return dequantize_nf4(q, out=buf).view(q.shape)

    def _dequantized_whole(self) -> bool:
        """Whether the GEMMs dequantize this weight whole: one part, or several that together fit
        `whole_numel_limit` (else they go part by part)."""
        return len(self.parts()) == 1 or self.numel() <= self.whole_numel_limit

    def _whole_in_scratch(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The whole [out, in] weight of several parts dequantized into the scratch buffer, where it is
        dequantized whole (`_dequantized_whole`); else None (a single part goes by `_part_in_scratch`,
        several by part)."""
        if len(self.parts()) == 1 or not self._dequantized_whole():
            return None
        return self.dequantize(dtype, out=scratch_buffer(self.numel(), self._device, dtype).view(self.shape))

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [T, in] @ W^T -> [T, out] in x2's dtype, dequantizing one part at a time into the scratch buffer;
        up to `nf4_matmul.MAX_ROWS` rows (a decoding step) multiply the packed parts directly instead."""
        self._check_complete()
        parts = self.parts()
        if use_triton(x2) and all(nf4_matmul.applies(x2, q) for _, q in parts):
            # A few rows (a decoding step) are bound by the weight's bytes: read it packed, once.
            y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
            for row0, q in parts:
                nf4_matmul.nf4_matmul_triton(x2, q, out=y[:, row0 : row0 + q.shape[0]])
            return y
        if len(parts) == 1:
            return torch.mm(x2, self._part_in_scratch(parts[0][1], x2.dtype).t())
        whole = self._whole_in_scratch(x2.dtype)
        if whole is not None:
            return torch.mm(x2, whole.t())
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        for row0, q in parts:
            w = self._part_in_scratch(q, x2.dtype)
            y[:, row0 : row0 + q.shape[0]].addmm_(x2, w.t(), beta=0)
        return y

    def folds(self, rows: int) -> bool:
        """Whether a product with this many rows of x takes `linear_folded`: not the packed kernel of a
        decoding step (`linear`'s few-row path), and rows made of whole quantization blocks (true of
        every checkpoint; the dequantization writes rows into wider scratch rows block by block)."""
        return rows > nf4_matmul.MAX_ROWS and all(q.shape[1] % q.blocksize == 0 for _, q in self.parts())

    def linear_folded(self, x_wide: torch.Tensor, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x_wide [T, in + R] @ [W | cols]^T -> [T, out]: x W^T plus the rank-R term x_wide[:, in:] cols^T
        (a LoRA up-projection: cols holds the scaled B's, x_wide's last R columns x A^T), in one GEMM
        per part rather than a GEMM and an accumulating pass over the output. Each part is dequantized
        into the first `in` columns of scratch rows [rows, in + R] whose last R columns take its rows of
        cols; whole, where `linear` dequantizes it whole (`whole_numel_limit`). out: a [T, out] tensor
        to write the product into (a CUDA graph's static buffer) instead of a new one."""
        self._check_complete()
        t, width = x_wide.shape if x_wide.dim() == 2 else (0, 0)
        extra = width - self.in_features
        if extra < 1 or cols.shape != (self.out_features, extra):
            raise KernelError(
                f"linear_folded: x [T, {self.in_features} + R] and cols [{self.out_features}, R] expected, got "
                f"{list(x_wide.shape)} and {list(cols.shape)}."
            )
        parts = self.parts()
        dtype = x_wide.dtype
        if self._dequantized_whole():
            w = scratch_buffer(self.out_features * width, self._device, dtype).view(self.out_features, width)
            for row0, q in parts:
                dequantize_nf4(q, out=w[row0 : row0 + q.shape[0], : self.in_features])
            w[:, self.in_features :].copy_(cols)
            return torch.mm(x_wide, w.t(), out=out)
        y = out if out is not None else torch.empty(t, self.out_features, dtype=dtype, device=x_wide.device)
        for row0, q in parts:
            rows = q.shape[0]
            w = scratch_buffer(rows * width, self._device, dtype).view(rows, width)
            dequantize_nf4(q, out=w[:, : self.in_features])
            w[:, self.in_features :].copy_(cols[row0 : row0 + rows])
            y[:, row0 : row0 + rows].addmm_(x_wide, w.t(), beta=0)
        return y

    def grad_input(self, dy2: torch.Tensor) -> torch.Tensor:
        """dy2 [T, out] @ W -> [T, in], accumulated part by part (each dequantized into the scratch buffer)."""
        self._check_complete()
        whole = self._whole_in_scratch(dy2.dtype)
        if whole is not None:
            return torch.mm(dy2, whole)
        dx = None
        for row0, q in self.parts():
            w = self._part_in_scratch(q, dy2.dtype)
            dy_part = dy2[:, row0 : row0 + q.shape[0]]
            dx = torch.mm(dy_part, w) if dx is None else dx.addmm_(dy_part, w)
        return dx

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply to the parts; dtype casts change only the compute dtype, never the
        # storage dtypes of the format (uint8 codes, float32 tables and scales).
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        for key, param in self._parameters.items():  # after store_as_parameters
            if param is not None:
                moved = fn(param.data)
                moved = moved if moved.dtype == param.dtype else param.data.to(moved.device)
                self._parameters[key] = nn.Parameter(moved, requires_grad=False)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._device))
        self.compute_dtype, self._device = probe.dtype, probe.device
        self._views = None
        return self

    def __getitem__(self, index):
        raise KernelError(
            "a 4-bit weight cannot be sliced or changed in place (e.g. to merge LoRA into it): dequantize it "
            "(weight.dequantize()) or load the model in 16-bit."
        )

    def nbytes(self) -> int:
        return sum(q.nbytes() for _, q in self.parts())

    def extra_repr(self) -> str:
        return (
            f"out={self.out_features}, in={self.in_features}, dtype={self.compute_dtype}, nf4 parts="
            f"{[(r0, q.shape[0]) for r0, q in self.parts()]}, {math.ceil(self.nbytes() / 2**20)} MiB"
        )
