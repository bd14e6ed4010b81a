"""Linear (LM head) + cross-entropy loss without materialising the [tokens, vocab] logits.

hidden [N, H] and labels [N] are already aligned (the caller shifts: hidden of token t predicts
label t+1). The loss is the sum of per-token losses over labels != ignore_index divided by
`num_items_in_batch` when given (gradient accumulation over several micro-batches), else by the
number of non-ignored labels: the same convention as Transformers' causal-LM loss. With every
label ignored and no `num_items_in_batch`, the mean is 0 / 0 = nan (as in Transformers) and every
gradient is zero; both paths behave so.

The fused path runs over chunks of tokens. Per chunk: logits = hidden_chunk @ W.T (+ b) by cuBLAS
into one reused buffer; a Triton kernel turns each row, in place, into d(loss)/d(logits); then
dH_chunk = dlogits @ W and dW += dlogits.T @ hidden_chunk. The gradients are thus ready at the
end of the forward, and the backward only scales them by grad_output (a scalar). Rows whose label
is ignored are left out of the GEMMs altogether (their gradient is zero), which matters with
response-only masking where half the tokens or more are ignored.

Passes over a chunk's [rows, V] logits (frozen head): the GEMM writes them once; the kernel reads
them twice (logsumexp, then the gradient) and writes the gradient over them once, already scaled
by 1/n and by the soft-cap derivative; the dH GEMM reads them once, writing straight into dH's
rows. A trainable head adds one read (dW, accumulated in place with addmm_), a bias one more.
No float32 copy, .contiguous() or scaling pass touches the logits. The chunk size and the kernel's
launch are a `CEConfig` so that `benchmarks/kernel_sweep.py` can time alternatives.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton

# Largest logits chunk buffer (bytes, in the input dtype). At vocab 128,256 in bf16 this is 1,046
# rows (8,192 tokens run as 8 chunks of 1,024); at vocab 262,144, 512 rows.
CHUNK_BYTES = 256 * 1024 * 1024
MAX_BLOCK_V = 4096


@dataclasses.dataclass(frozen=True)
class CEConfig:
    """Chunking and kernel launch of the chunked loss.

    chunk_bytes: largest logits chunk buffer (bytes, in the input dtype); bigger chunks mean
        larger GEMMs (and fewer read-modify-writes of a trainable head's dW) for more memory.
    block_v: vocabulary entries per step of the chunk kernel's row loop (capped at next_power_of_2(V)).
    num_warps: of the chunk kernel; 0 means 8 for blocks of 2048 or more, else 4.
    l2_hint: the logsumexp pass asks L2 to keep the row (evict_last) and the gradient pass, which
        reads it again, to drop it (evict_first), so the second read can hit L2.
    programs_per_sm: 0 launches one program per row; k > 0 launches k programs per SM, each taking
        every (k * SMs)-th row, which bounds the rows in flight (and so the L2 they need).
    """

    chunk_bytes: int = CHUNK_BYTES
    block_v: int = MAX_BLOCK_V
    num_warps: int = 0
    l2_hint: bool = False
    programs_per_sm: int = 0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise KernelError(f"CEConfig.chunk_bytes={self.chunk_bytes}: expected a positive byte count.")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise KernelError(f"CEConfig.block_v={self.block_v}: expected a power of two >= 16.")
        if self.num_warps not in (0, 1, 2, 4, 8, 16, 32):
            raise KernelError(
                f"CEConfig.num_warps={self.num_warps}: expected 0 (auto) or a power of two <= 32."
            )
        if self.programs_per_sm < 0:
            raise KernelError(
                f"CEConfig.programs_per_sm={self.programs_per_sm}: expected 0 (a row each) or more."
            )

    def label(self) -> str:
        warps = self.num_warps or "auto"
        hint = "/l2" if self.l2_hint else ""
        grid = f"/p{self.programs_per_sm}" if self.programs_per_sm else ""
        return f"{self.chunk_bytes // 2**20}MiB/v{self.block_v}/w{warps}{grid}{hint}"


# Picked by benchmarks/kernel_sweep.py on an H100 (results/h100-2026-11-24-s4/kernel_sweep-*.md): the
# chunk kernel walks a row in 32,768-wide steps with 32 warps, 0.260 ms per 1,024-row chunk against
# 0.283 ms at 4,096; the whole loss at 8,192 tokens x 128,256 26.95 ms against 27.67 (Liger 31.17).
# Chunks stay 256 MiB: 384 MiB measured 1% faster still, for 83 MiB more peak memory.
DEFAULT_CE_CONFIG = CEConfig(block_v=32768, num_warps=32)


@triton.jit
def _tanh(y):
    # Triton has no portable tanh (libdevice does not run under the interpreter). A Taylor series near
    # zero avoids the cancellation in (1 - e) / (1 + e); both branches stay within a few float32 ulp.
    a = tl.abs(y)
    a2 = a * a
    series = 0.021869488536155203  # 62/2835, then 17/315, 2/15, 1/3 (Horner)
    series = -0.05396825396825397 + a2 * series
    series = 0.13333333333333333 + a2 * series
    series = -0.3333333333333333 + a2 * series
    series = y * (1.0 + a2 * series)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0.0, -big, big)
    return tl.where(a < 0.3, series, big)


# Per-row softmax cross-entropy over a chunk of logits, a row at a time per program, gradient in place.
#   z = cap * tanh(x / cap) (with soft-capping) else x,   lse = logsumexp(z)   (online, over vocab blocks)
#   loss[row] = lse - z[label]
#   x[row, :] <- scale * (softmax(z) - onehot(label)) * (1 - tanh^2 when soft-capped)
# Rows whose label == ignore_index get loss 0 and an all-zero gradient (written without reading).
# All arithmetic in float32; `scale` (1 / number of items) is read from device memory so that the
# mean's denominator never needs a host sync.
# Floor: read the chunk's logits twice and write them once (3 * rows * V * itemsize bytes), or read
# them once when no gradient is wanted; with L2_HINT the second read may come from L2.
# Saves nothing: the gradient is the output.
@triton.jit
def _softmax_ce_row(
    row_ptr,
    label,
    loss_ptr,
    scale_ptr,
    vocab,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    L2_HINT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                tl.store(row_ptr + idx, zero.to(row_ptr.dtype.element_ty), mask=idx < vocab)
    else:
        m = -float("inf")
        d = 0.0
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            mask = idx < vocab
            # Literal eviction strings (not a constexpr string) keep this valid on Triton 3.6 and 3.9.
            if L2_HINT and COMPUTE_GRAD:
                z = tl.load(row_ptr + idx, mask=mask, other=0.0, eviction_policy="evict_last")
            else:
                z = tl.load(row_ptr + idx, mask=mask, other=0.0)
            z = z.to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_label = tl.load(row_ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        tl.store(loss_ptr, lse - z_label)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr)
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                mask = idx < vocab
                if L2_HINT:
                    x = tl.load(row_ptr + idx, mask=mask, other=0.0, eviction_policy="evict_first")
                else:
                    x = tl.load(row_ptr + idx, mask=mask, other=0.0)
                x = x.to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    g = tl.exp(softcap * t - lse)
                    g = tl.where(idx == label, g - 1.0, g) * (1.0 - t * t)
                else:
                    g = tl.exp(x - lse)
                    g = tl.where(idx == label, g - 1.0, g)
                tl.store(row_ptr + idx, (g * scale).to(row_ptr.dtype.element_ty), mask=mask)


# Rows are spread over the programs: one row each (the grid is the row count), or, with a smaller
# grid, every n-th row, so that fewer rows are in flight at once and a row read by the first pass
# can still be in L2 when the second pass reads it again (a [rows, 128256] bf16 row is 256 KB).
@triton.jit
def _softmax_ce_inplace_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    scale_ptr,
    n_rows,
    row_stride,
    vocab,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    L2_HINT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)  # the interpreter hands the loop a Python int
        _softmax_ce_row(
            logits_ptr + row64 * row_stride,
            tl.load(labels_ptr + row64),
            loss_ptr + row64,
            scale_ptr,
            vocab,
            ignore_index,
            softcap,
            HAS_SOFTCAP,
            COMPUTE_GRAD,
            L2_HINT,
            BLOCK_V,
        )


def _grad_hidden(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # CPU BLAS sums a vocabulary-long dot product nearly sequentially when a chunk has few rows
    # (~2e-5 relative error in float32 at 150k entries, against 2e-6 for the same data in one
    # large GEMM). The CPU path exists to check the chunking, so it accumulates in float64 there;
    # cuBLAS accumulates tile by tile and keeps the single GEMM in the input dtype.
    # Blocks of the vocabulary keep the float64 copies far smaller than the weight.
    # `out` (contiguous rows of dH) takes the GEMM's result directly: no [rows, H] temporary and copy.
    vocab, block = weight.shape[0], 8192
    if grad.is_cuda or grad.dtype != torch.float32 or vocab <= block:
        return torch.mm(grad, weight, out=out) if out is not None else grad @ weight
    acc = torch.zeros(grad.shape[0], weight.shape[1], dtype=torch.float64)
    for v0 in range(0, vocab, block):
        acc.addmm_(grad[:, v0 : v0 + block].double(), weight[v0 : v0 + block].double())
    return out.copy_(acc) if out is not None else acc.float()


def _sm_count(device: torch.device) -> int:
    # The interpreter (CPU) has no SMs; 2 stands in, so that programs there still take several rows.
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _softmax_ce_inplace_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    compute_grad: bool,
    config: CEConfig = DEFAULT_CE_CONFIG,
) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    if logits.stride(1) != 1 or not labels.is_contiguous() or not loss.is_contiguous():
        raise KernelError("cross-entropy chunk kernel needs row-major logits and contiguous labels/loss.")
    block = min(config.block_v, triton.next_power_of_2(vocab))
    programs = rows
    if config.programs_per_sm:
        programs = min(rows, config.programs_per_sm * _sm_count(logits.device))
    _softmax_ce_inplace_kernel[(programs,)](
        logits,
        labels,
        loss,
        scale,
        rows,
        logits.stride(0),
        vocab,
        ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        L2_HINT=config.l2_hint,
        BLOCK_V=block,
        num_warps=config.num_warps or (8 if block >= 2048 else 4),
    )


def _softmax_ce_inplace_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    compute_grad: bool,
    config: CEConfig = DEFAULT_CE_CONFIG,
) -> None:
    """The chunk kernel's math in PyTorch (float32 temporaries), so the chunked driver runs without Triton."""
    z = logits.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    loss.copy_(torch.where(valid, lse - z.gather(1, safe).squeeze(1), torch.zeros_like(lse)))
    if not compute_grad:
        return
    g = torch.exp(z - lse.unsqueeze(1))
    g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
    if softcap is not None:
        g = g * (1.0 - t * t)
    # where(), not a multiply by a zero/one mask: scale is inf when nothing is counted.
    logits.copy_(torch.where(valid.unsqueeze(1), g * scale, torch.zeros_like(g)))


def _rows_per_chunk(n_rows: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    # Equal chunks (not full chunks plus a sliver): the last GEMM is as efficient as the others.
    cap = max(1, chunk_bytes // (vocab * itemsize))
    n_chunks = max(1, math.ceil(n_rows / cap))
    return max(1, math.ceil(n_rows / n_chunks))


@dataclasses.dataclass(frozen=True)
class LabelPlan:
    """What the chunked loss reads from the labels before its first chunk (`plan_labels`)."""

    labels: torch.Tensor  # [N] int64, on the loss's device
    valid_count: torch.Tensor  # 0-d, the count of labels != ignore_index (the mean's denominator)
    n_valid: int
    rows: torch.Tensor | None  # indices of the counted rows, when some are ignored and skipped
    ignore_index: int


def plan_labels(
    labels: torch.Tensor, vocab: int, ignore_index: int, device: torch.device, skip_ignored: bool = True
) -> LabelPlan:
    """Counts the labels, checks their range and finds the counted rows: the loss's one host sync.

    Called by the model at the start of its forward rather than by the loss, after the layers: there
    the sync would wait for the whole forward to finish on the GPU, and the backward would then start
    with the host no longer ahead of the GPU, so every host-bound stretch of it would leave the GPU
    idle. At the start of a step it waits for (at most) the previous optimizer step."""
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    valid_count = valid.sum()
    bad = valid & ((labels < 0) | (labels >= vocab))
    # It decides the chunking, and catches out-of-range labels, which the kernel would otherwise
    # read out of bounds.
    n_valid, n_bad = (int(v) for v in torch.stack([valid_count, bad.sum()]).tolist())
    if n_bad:
        raise KernelError(
            f"{n_bad} label(s) lie outside [0, {vocab}) and are not ignore_index={ignore_index}; "
            "check the tokenizer's vocabulary against the model's LM head."
        )
    rows = valid.nonzero().squeeze(1) if skip_ignored and n_valid < labels.numel() else None
    move = lambda t: t if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return LabelPlan(move(labels), move(valid_count), n_valid, move(rows), ignore_index)


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    num_items_in_batch: int | torch.Tensor | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_rows: int | None,
    backend: str,
    skip_ignored: bool,
    config: CEConfig = DEFAULT_CE_CONFIG,
    plan: LabelPlan | None = None,
):
    """Loss and the (unscaled by grad_output) gradients of hidden, weight and bias, chunk by chunk."""
    n, _ = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    chunk_fn = _softmax_ce_inplace_triton if backend == "triton" else _softmax_ce_inplace_torch
    compute_grad = need_dh or need_dw or need_db

    if plan is None:
        plan = plan_labels(labels, vocab, ignore_index, device, skip_ignored)
    labels, valid_count, n_valid, rows = plan.labels, plan.valid_count, plan.n_valid, plan.rows
    if num_items_in_batch is None:
        denominator = valid_count.to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(device)
    scale = torch.reciprocal(denominator).reshape(1)

    # Row selection: all rows as views, or (when some labels are ignored) only the counted ones.
    n_work = n_valid if rows is not None else n
    step = chunk_rows or _rows_per_chunk(n_work, vocab, hidden.element_size(), config.chunk_bytes)

    dh = None
    if need_dh:
        dh = torch.zeros_like(hidden) if rows is not None else torch.empty_like(hidden)
    dw = torch.zeros_like(weight) if need_dw and n_work == 0 else None
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if need_db else None
    row_loss = torch.empty(n_work, dtype=torch.float32, device=device)
    buf = torch.empty(min(step, n_work), vocab, dtype=hidden.dtype, device=device) if n_work else None
    w_t = weight.t()

    for start in range(0, n_work, step):
        end = min(start + step, n_work)
        if rows is None:
            h_c, lab_c = hidden[start:end], labels[start:end]
        else:
            idx = rows[start:end]
            h_c, lab_c = hidden.index_select(0, idx), labels.index_select(0, idx)
        logits = buf[: end - start]
        if bias is not None:
            torch.addmm(bias, h_c, w_t, out=logits)
        else:
            torch.matmul(h_c, w_t, out=logits)
        chunk_fn(
            logits,
            lab_c.contiguous(),
            row_loss[start:end],
            scale,
            ignore_index,
            softcap,
            compute_grad,
            config,
        )
        grad = logits  # overwritten in place by the chunk kernel
        if need_dh:
            if rows is None:
                _grad_hidden(grad, weight, out=dh[start:end])
            else:
                dh.index_copy_(0, idx, _grad_hidden(grad, weight))
        if need_dw:
            # In the weight's dtype: cuBLAS accumulates each chunk in float32 and rounds once per chunk.
            if dw is None:
                dw = grad.t() @ h_c
            else:
                dw.addmm_(grad.t(), h_c)
        if need_db:
            db += grad.sum(dim=0, dtype=torch.float32)

    loss = row_loss.sum() * scale[0]
    if db is not None:
        db = db.to(bias.dtype)
    return loss, dh, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked LM head + cross-entropy; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        ignore_index: int,
        softcap: float | None,
        num_items_in_batch: int | torch.Tensor | None,
        need_dh: bool,
        need_dw: bool,
        need_db: bool,
        chunk_rows: int | None,
        backend: str,
        skip_ignored: bool,
        config: CEConfig = DEFAULT_CE_CONFIG,
        plan: LabelPlan | None = None,
    ) -> torch.Tensor:
        loss, dh, dw, db = _chunked_forward(
            hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch,
            need_dh, need_dw, need_db, chunk_rows, backend, skip_ignored, config, plan,
        )  # fmt: skip
        ctx.grads = (dh, dw, db)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise KernelError(
                "fused_linear_cross_entropy's backward ran twice (retain_graph=True); its stored gradients "
                "are scaled in place and freed by the first backward. Recompute the loss instead."
            )
        dh, dw, db = ctx.grads
        ctx.grads = None
        # In place: the stored gradients are ours alone, and a second [N, H] / [V, H] buffer is avoided.
        out = tuple(None if g is None else g.mul_(grad_output) for g in (dh, dw, db))
        return (*out, None, None, None, None, None, None, None, None, None, None, None, None)


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "triton",
    skip_ignored: bool = True,
    config: CEConfig = DEFAULT_CE_CONFIG,
    label_plan: LabelPlan | None = None,
) -> torch.Tensor:
    """The chunked algorithm on any device: `backend="triton"` (GPU, or CPU under TRITON_INTERPRET=1)
    or `"torch"` (the same per-chunk math in PyTorch). `chunk_rows` overrides the chunk size (tests)
    and `config.chunk_bytes`; `config` sets the kernel's launch; `skip_ignored=False` runs ignored
    rows through the GEMMs and the kernel too; `label_plan` is `plan_labels(labels, ...)` made
    earlier (None: made here)."""
    if backend not in ("triton", "torch"):
        raise KernelError(f"backend={backend!r}: expected 'triton' or 'torch'.")
    _check_inputs(hidden, weight, labels, bias)
    _check_plan(label_plan, labels, ignore_index, skip_ignored)
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        logit_softcap,
        num_items_in_batch,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        chunk_rows,
        backend,
        skip_ignored,
        config,
        label_plan,
    )


def _check_plan(plan: LabelPlan | None, labels: torch.Tensor, ignore_index: int, skip_ignored: bool) -> None:
    if plan is None:
        return
    if plan.labels.shape != (labels.numel(),) or plan.ignore_index != ignore_index:
        raise KernelError(
            f"label_plan was made for {plan.labels.numel()} labels with ignore_index={plan.ignore_index}, "
            f"not these {labels.numel()} with ignore_index={ignore_index}: make it from the same labels."
        )
    if not skip_ignored and plan.rows is not None:
        raise KernelError("label_plan selects counted rows, but skip_ignored=False: make it with skip_ignored=False.")


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise KernelError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}; "
            "flatten the batch and sequence dimensions of hidden first."
        )
    if labels.shape != (hidden.shape[0],):
        raise KernelError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}.")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise KernelError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}.")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise KernelError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share one dtype; cast hidden "
            "to the LM head's dtype (or the head to the compute dtype) before the loss."
        )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    label_plan: LabelPlan | None = None,
) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy of softmax(hidden @ weight.T + bias) vs labels.

    label_plan: `plan_labels` of these labels, made before the forward so the fused path does not
    wait for the GPU at the loss (the reference path does not use it)."""
    _check_inputs(hidden, weight, labels, bias)
    if use_triton(hidden, weight, labels, bias):
        return linear_cross_entropy_chunked(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=ignore_index,
            logit_softcap=logit_softcap,
            num_items_in_batch=num_items_in_batch,
            label_plan=label_plan,
        )
    return linear_cross_entropy_reference(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        logit_softcap=logit_softcap,
        num_items_in_batch=num_items_in_batch,
    )
