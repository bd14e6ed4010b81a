import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels import cross_entropy as ce
from velotune.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
    plan_labels,
)


def _inputs(n, h, v, *, seed, ignored=0.3, bias=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    # Logits with a spread of a few units, so that soft-capping at 3 bends them noticeably.
    weight = torch.randn(v, h, generator=gen) * (3.0 / math.sqrt(h))
    b = torch.randn(v, generator=gen) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    drop = torch.rand(n, generator=gen) < ignored
    if drop.all() and ignored < 1.0:
        drop[0] = False
    labels[drop] = -100
    b = None if b is None else b.to(dtype)
    return hidden.to(dtype), weight.to(dtype), b, labels


def _run(fn, hidden, weight, bias, labels, *, train_weight=True, train_bias=True, grad_scale=1.0, **kw):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(train_weight)
    if bias is not None:
        bias = bias.clone().requires_grad_(train_bias)
    loss = fn(hidden, weight, labels, bias=bias, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad, None if bias is None else bias.grad


def _assert_match(got, want, tol=1e-5):
    names = ("loss", "d_hidden", "d_weight", "d_bias")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype, name
        err = _rel_err(g, w)
        assert err < tol, f"{name}: relative error {err:.2e}"


def _chunked(backend, **fixed):
    def fn(hidden, weight, labels, **kw):
        return linear_cross_entropy_chunked(hidden, weight, labels, backend=backend, **fixed, **kw)

    return fn


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "n,h,v,chunk_rows,bias",
    [(7, 33, 1001, 3, False), (1, 17, 515, None, True), (13, 40, 4099, 4, True), (5, 9, 3, 2, False)],
)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_loss_and_gradients_match_reference(backend, n, h, v, chunk_rows, bias, softcap):
    hidden, weight, b, labels = _inputs(n, h, v, seed=n * 1000 + v, bias=bias)
    kw = dict(logit_softcap=softcap)
    got = _run(_chunked(backend, chunk_rows=chunk_rows), hidden, weight, b, labels, **kw)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, **kw)
    _assert_match(got, want)


@pytest.mark.parametrize("skip_ignored", [True, False])
def test_vocab_151936_with_softcap_and_ignored_labels_matches_reference(skip_ignored):
    hidden, weight, b, labels = _inputs(7, 24, 151936, seed=3, bias=True, ignored=0.4)
    labels[1] = -100
    labels[2] = 151935  # last vocab entry: the tail of the final, partial block
    kw = dict(logit_softcap=30.0)
    fn = _chunked("triton", chunk_rows=3, skip_ignored=skip_ignored)
    got = _run(fn, hidden, weight, b, labels, **kw)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, **kw)
    _assert_match((got[0], None, got[2], got[3]), (want[0], None, want[2], want[3]))
    # d_hidden is a float32 dot product of length 151,936 per element; the float32 reference's own
    # rounding of it varies with the BLAS thread count, so judge against float64 instead.
    exact = _run(linear_cross_entropy_reference, hidden.double(), weight.double(), b.double(), labels, **kw)
    assert _rel_err(got[1], exact[1]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_run_through_the_kernel_give_the_same_result_as_skipped_rows(backend):
    hidden, weight, b, labels = _inputs(11, 19, 777, seed=5, bias=True, ignored=0.5)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels)
    for skip in (True, False):
        got = _run(_chunked(backend, chunk_rows=4, skip_ignored=skip), hidden, weight, b, labels)
        _assert_match(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_divides_the_summed_loss(backend, as_tensor):
    hidden, weight, _, labels = _inputs(9, 21, 333, seed=11)
    num = torch.tensor(37) if as_tensor else 37
    kw = dict(num_items_in_batch=num)
    got = _run(_chunked(backend, chunk_rows=4), hidden, weight, None, labels, **kw)
    want = _run(linear_cross_entropy_reference, hidden, weight, None, labels, **kw)
    _assert_match(got, want)


def test_backward_scales_the_stored_gradients_by_grad_output():
    hidden, weight, b, labels = _inputs(6, 13, 300, seed=13, bias=True)
    got = _run(_chunked("triton", chunk_rows=4), hidden, weight, b, labels, grad_scale=-2.5)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, grad_scale=-2.5)
    _assert_match(got, want)


class _AllocationRecorder(TorchDispatchMode):
    """Shapes of the tensors that aten ops allocate (views and out= results alias their inputs)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_weight_gets_no_gradient_and_no_weight_sized_buffer(backend):
    n, h, v = 8, 23, 611
    hidden, weight, b, labels = _inputs(n, h, v, seed=17, bias=True)
    want = _run(
        linear_cross_entropy_reference, hidden, weight, b, labels, train_weight=False, train_bias=False
    )
    hidden.requires_grad_(True)
    recorder = _AllocationRecorder()
    with recorder:
        loss = linear_cross_entropy_chunked(hidden, weight, labels, bias=b, chunk_rows=3, backend=backend)
        loss.backward()
    assert weight.grad is None and b.grad is None
    assert (v, h) not in recorder.shapes and (h, v) not in recorder.shapes and (v,) not in recorder.shapes
    assert (n, h) in recorder.shapes  # the recorder does see the hidden-state gradient being allocated
    _assert_match((loss.detach(), hidden.grad), want[:2])


def test_no_gradient_work_is_done_under_no_grad():
    n, h, v = 5, 11, 203
    hidden, weight, _, labels = _inputs(n, h, v, seed=19, ignored=0.0)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    recorder = _AllocationRecorder()
    with torch.no_grad(), recorder:
        loss = linear_cross_entropy_chunked(hidden, weight, labels, backend="triton")
    assert (v, h) not in recorder.shapes and (n, h) not in recorder.shapes
    assert (n, v) in recorder.shapes  # the one logits chunk
    assert _rel_err(loss, linear_cross_entropy_reference(hidden, weight, labels)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_labels_ignored_gives_nan_mean_and_zero_gradients_like_transformers(backend):
    hidden, weight, b, labels = _inputs(4, 8, 50, seed=23, bias=True, ignored=1.0)
    assert (labels == -100).all()
    got = _run(_chunked(backend), hidden, weight, b, labels)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(w, torch.zeros_like(w))
    summed = _run(_chunked(backend), hidden, weight, b, labels, num_items_in_batch=5)
    summed_ref = _run(linear_cross_entropy_reference, hidden, weight, b, labels, num_items_in_batch=5)
    assert summed[0].item() == summed_ref[0].item() == 0.0


@pytest.mark.parametrize("skip_ignored", [True, False])
def test_every_buffer_is_written_before_it_is_read(poisoned_buffers, skip_ignored):
    hidden, weight, b, labels = _inputs(10, 15, 1029, seed=29, bias=True, ignored=0.4)
    kw = dict(logit_softcap=3.0)
    got = _run(_chunked("triton", chunk_rows=4, skip_ignored=skip_ignored), hidden, weight, b, labels, **kw)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, **kw)
    _assert_match(got, want)


def test_chunk_kernel_zeroes_the_gradient_rows_of_ignored_labels_without_reading_them():
    torch.manual_seed(31)
    logits = torch.randn(5, 4100)
    labels = torch.tensor([3, -100, 4099, -100, 0])
    logits[labels == -100] = float("nan")
    loss = torch.full((5,), float("nan"))
    scale = torch.tensor([0.25])
    want = logits.clone()
    want_loss = torch.full((5,), float("nan"))
    ce._softmax_ce_inplace_torch(want, labels, want_loss, scale, -100, 2.0, True)
    ce._softmax_ce_inplace_triton(logits, labels, loss, scale, -100, 2.0, True)
    assert torch.equal(logits[1], torch.zeros(4100)) and torch.equal(logits[3], torch.zeros(4100))
    assert loss[1] == 0 and loss[3] == 0
    assert _rel_err(loss, want_loss) < 1e-6
    assert _rel_err(logits, want) < 1e-6


def test_fp16_and_bf16_stay_within_the_reference_own_rounding_noise():
    hidden, weight, b, labels = _inputs(9, 32, 1500, seed=37, bias=True)
    for dtype in (torch.float16, torch.bfloat16):
        args = (hidden.to(dtype), weight.to(dtype), b.to(dtype), labels)
        got = _run(_chunked("triton", chunk_rows=4), *args, logit_softcap=3.0)
        ref = _run(linear_cross_entropy_reference, *args, logit_softcap=3.0)
        exact = _run(
            linear_cross_entropy_reference, *(t.double() for t in args[:3]), labels, logit_softcap=3.0
        )
        for name, g, r, e in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, ref, exact):
            assert g.dtype == r.dtype, name
            # Per-chunk rounding of dW in the weight's dtype adds at most a few roundings over the reference.
            assert _rel_err(g, e) <= 2.0 * _rel_err(r, e) + 1e-3, name


def test_public_function_takes_the_chunked_path_when_triton_is_forced(monkeypatch):
    hidden, weight, b, labels = _inputs(6, 10, 123, seed=41, bias=True)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, logit_softcap=3.0)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    loss = fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels, bias=b, logit_softcap=3.0)
    assert "LinearCrossEntropyFunction" in type(loss.grad_fn).__name__
    got = _run(fused_linear_cross_entropy, hidden.detach(), weight, b, labels, logit_softcap=3.0)
    _assert_match(got, want)


def test_public_function_uses_the_reference_for_cpu_tensors_by_default(monkeypatch):
    monkeypatch.delenv("VELOTUNE_KERNELS", raising=False)
    hidden, weight, _, labels = _inputs(3, 4, 20, seed=43)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels)
    assert "LinearCrossEntropyFunction" not in type(loss.grad_fn).__name__


def test_mixed_dtypes_raise_a_kernel_error():
    hidden, weight, _, labels = _inputs(3, 4, 20, seed=47)
    with pytest.raises(KernelError, match="dtype"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight, labels)
    with pytest.raises(KernelError, match="dtype"):
        linear_cross_entropy_chunked(hidden, weight, labels, bias=torch.zeros(20, dtype=torch.float16))


def test_out_of_range_labels_raise_a_kernel_error():
    hidden, weight, _, labels = _inputs(3, 4, 20, seed=53)
    labels[0] = 20
    with pytest.raises(KernelError, match="outside"):
        linear_cross_entropy_chunked(hidden, weight, labels, backend="torch")


@pytest.mark.parametrize("skip_ignored", [True, False])
@pytest.mark.parametrize("ignored", [0.0, 0.5])
def test_a_label_plan_made_before_the_forward_gives_bitwise_the_same_loss_and_gradients(skip_ignored, ignored):
    hidden, weight, b, labels = _inputs(11, 19, 777, seed=61, bias=True, ignored=ignored)
    plan = plan_labels(labels, 777, -100, hidden.device, skip_ignored)
    assert plan.n_valid == int((labels != -100).sum()) and (plan.rows is None) == (not skip_ignored or ignored == 0)
    fn = _chunked("triton", chunk_rows=4, skip_ignored=skip_ignored)
    want = _run(fn, hidden, weight, b, labels)
    calls = []
    real = ce.plan_labels
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ce, "plan_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = _run(fn, hidden, weight, b, labels, label_plan=plan)
    assert calls == []  # the plan given is the one used: no second count (and no second host sync)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_a_label_plan_of_other_labels_is_refused():
    hidden, weight, _, labels = _inputs(6, 4, 20, seed=67, ignored=0.5)
    with pytest.raises(KernelError, match="same labels"):
        linear_cross_entropy_chunked(hidden, weight, labels, label_plan=plan_labels(labels[:5], 20, -100, "cpu"))
    with pytest.raises(KernelError, match="same labels"):
        linear_cross_entropy_chunked(hidden, weight, labels, ignore_index=-1,
                                     label_plan=plan_labels(labels, 20, -100, "cpu"))  # fmt: skip
    with pytest.raises(KernelError, match="skip_ignored=False"):
        linear_cross_entropy_chunked(hidden, weight, labels, skip_ignored=False,
                                     label_plan=plan_labels(labels, 20, -100, "cpu"))  # fmt: skip


def test_second_backward_through_a_retained_graph_raises_instead_of_double_scaling():
    hidden, weight, _, labels = _inputs(3, 4, 20, seed=59)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy_chunked(hidden, weight, labels, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(KernelError, match="twice"):
        loss.backward()


def test_chunks_are_bounded_in_bytes_and_balanced():
    rows = ce._rows_per_chunk(8192, 128256, 2, ce.CHUNK_BYTES)
    assert rows == 1024 and rows * 128256 * 2 <= ce.CHUNK_BYTES
    assert ce._rows_per_chunk(8192, 262144, 2, ce.CHUNK_BYTES) == 512
    assert ce._rows_per_chunk(7, 262144, 2, ce.CHUNK_BYTES) == 7
    # 1100 rows at a 1046-row cap: two chunks of 550, not 1046 + 54.
    assert ce._rows_per_chunk(1100, 128256, 2, ce.CHUNK_BYTES) == 550
