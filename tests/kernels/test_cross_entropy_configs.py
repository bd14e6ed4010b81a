"""Every chunking / launch configuration of the fused loss gives the reference's loss and gradients
(the sweep in benchmarks/kernel_sweep.py times only configurations tested here)."""

import dataclasses
import math

import pytest
import torch

from benchmarks.kernel_sweep import CE_CANDIDATES, CHUNK_MIB
from tests.kernels.checks import norm_rel_err as _rel_err
from tests.kernels.test_cross_entropy import _AllocationRecorder
from velotune.errors import KernelError
from velotune.kernels import cross_entropy as ce
from velotune.kernels.cross_entropy import (
    CEConfig,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)


def _inputs(n, h, v, seed, ignored=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (3.0 / math.sqrt(h))
    bias = torch.randn(v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -100
    labels[0] = v - 1  # the last vocabulary entry: the tail of the final, partial block
    return hidden, weight, bias, labels


def _run(fn, hidden, weight, bias, labels, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _assert_match(got, want, tol=1e-5):
    for name, g, w in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        assert _rel_err(g, w) < tol, f"{name}: {_rel_err(g, w):.2e}"


@pytest.mark.parametrize("config", CE_CANDIDATES, ids=lambda c: c.label())
@pytest.mark.parametrize("skip_ignored", [True, False])
def test_every_swept_kernel_launch_matches_the_reference(config, skip_ignored):
    # 11 tokens in chunks of 4: with programs_per_sm the interpreter's 2 "SMs" give programs several rows.
    hidden, weight, bias, labels = _inputs(11, 19, 4099, seed=3)
    kw = dict(logit_softcap=3.0)
    got = _run(
        linear_cross_entropy_chunked, hidden, weight, bias, labels,
        chunk_rows=4, skip_ignored=skip_ignored, config=config, **kw,
    )  # fmt: skip
    want = _run(linear_cross_entropy_reference, hidden, weight, bias, labels, **kw)
    _assert_match(got, want)


@pytest.mark.parametrize("mib", CHUNK_MIB)
def test_every_swept_chunk_size_sets_the_chunk_rows_it_promises(mib):
    config = CEConfig(chunk_bytes=mib * 2**20)
    rows = ce._rows_per_chunk(8192, 128256, 2, config.chunk_bytes)
    assert rows * 128256 * 2 <= config.chunk_bytes < (rows + 1) * 128256 * 2 * 1.5
    n_chunks = math.ceil(8192 / rows)
    assert n_chunks * rows - 8192 < n_chunks  # balanced: the last chunk is at most n_chunks rows short


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_chunk_bytes_decides_the_logits_buffer_and_results_stay_equal(rows_per_chunk):
    n, h, v = 7, 13, 301
    hidden, weight, bias, labels = _inputs(n, h, v, seed=5, ignored=0.0)
    config = CEConfig(chunk_bytes=rows_per_chunk * v * 4)
    want = _run(linear_cross_entropy_reference, hidden, weight, bias, labels)
    recorder = _AllocationRecorder()
    with recorder:
        got = _run(linear_cross_entropy_chunked, hidden, weight, bias, labels, config=config)
    _assert_match(got, want)
    chunk = math.ceil(n / math.ceil(n / rows_per_chunk))
    assert (chunk, v) in recorder.shapes
    assert not any(len(s) == 2 and s[1] == v and s[0] > chunk for s in recorder.shapes)


def test_hidden_gradient_chunks_are_written_straight_into_the_gradient():
    # No ignored labels: chunks are row ranges of d_hidden, which the GEMM fills through out=.
    n, h, v = 9, 21, 500
    hidden, weight, bias, labels = _inputs(n, h, v, seed=7, ignored=0.0)
    hidden.requires_grad_(True)
    recorder = _AllocationRecorder()
    with recorder:
        loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_rows=4)
        loss.backward()
    assert (n, h) in recorder.shapes  # d_hidden itself
    assert (4, h) not in recorder.shapes and (1, h) not in recorder.shapes  # no per-chunk temporary
    want = _run(linear_cross_entropy_reference, hidden.detach(), weight, bias * 0, labels)
    assert _rel_err(hidden.grad, want[1]) < 1e-5


def test_the_l2_hint_and_strided_rows_also_work_without_a_gradient():
    hidden, weight, _, labels = _inputs(10, 16, 777, seed=9)
    config = CEConfig(block_v=256, num_warps=4, l2_hint=True, programs_per_sm=1)
    with torch.no_grad():
        loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_rows=5, config=config)
    assert _rel_err(loss, linear_cross_entropy_reference(hidden, weight, labels)) < 1e-5


def test_chunk_kernel_with_fewer_programs_than_rows_fills_every_row():
    torch.manual_seed(13)
    logits = torch.randn(9, 1100)
    labels = torch.tensor([3, -100, 1099, 0, 5, -100, 7, 8, 9])
    logits[labels == -100] = float("nan")  # ignored rows are written without being read
    loss = torch.full((9,), float("nan"))
    want, want_loss = logits.clone(), torch.full((9,), float("nan"))
    scale = torch.tensor([0.5])
    ce._softmax_ce_inplace_torch(want, labels, want_loss, scale, -100, None, True)
    config = CEConfig(block_v=512, programs_per_sm=1)  # 2 programs (interpreter "SMs") for 9 rows
    ce._softmax_ce_inplace_triton(logits, labels, loss, scale, -100, None, True, config)
    assert _rel_err(loss, want_loss) < 1e-6 and _rel_err(logits, want) < 1e-6


def test_invalid_configs_are_rejected_with_what_is_expected():
    with pytest.raises(KernelError, match="chunk_bytes"):
        CEConfig(chunk_bytes=0)
    with pytest.raises(KernelError, match="power of two"):
        CEConfig(block_v=3000)
    with pytest.raises(KernelError, match="num_warps"):
        CEConfig(num_warps=6)
    with pytest.raises(KernelError, match="programs_per_sm"):
        dataclasses.replace(CEConfig(), programs_per_sm=-1)
