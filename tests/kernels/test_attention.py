import pytest
import torch

from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels import attention as attention_module
from velotune.kernels.attention import attention, attention_reference, attention_sdpa, attention_triton

BLOCKS = (16, 16)  # small tiles so that tiny sequences still span several blocks


def _inputs(batch, q_len, kv_len, n_heads, n_kv, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, n_heads, head_dim, generator=gen) * 1.5
    k = torch.randn(batch, kv_len, n_kv, head_dim, generator=gen) * 1.5
    v = torch.randn(batch, kv_len, n_kv, head_dim, generator=gen)
    dout = torch.randn(batch, q_len, n_heads, head_dim, generator=gen)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _run(fn, q, k, v, dout, **kwargs):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, scale=q.shape[-1] ** -0.5, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _triton(blocks=BLOCKS):
    def fn(q, k, v, **kwargs):
        return attention_triton(q, k, v, blocks=blocks, **kwargs)

    return fn


def _compare(shape, dtype=torch.float32, tol=1e-5, blocks=BLOCKS, seed=0, tensors=None, **kwargs):
    q, k, v, dout = tensors or _inputs(*shape, dtype=dtype, seed=seed)
    got = _run(_triton(blocks), q, k, v, dout, **kwargs)
    if dtype == torch.float32:
        want = _run(attention_reference, q, k, v, dout, **kwargs)
    else:  # half precision is judged against the exact result, not the reference's own rounding
        want = _run(attention_reference, q.double(), k.double(), v.double(), dout.double(), **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel_err(a, b) < tol, (name, _rel_err(a, b))
    return got


# shape = (batch, q_len, kv_len, q_heads, kv_heads, head_dim)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
def test_causal_attention_matches_reference_when_length_is_not_a_multiple_of_the_block(blocks):
    _compare((2, 37, 37, 2, 2, 16), blocks=blocks)


def test_grouped_query_attention_with_three_query_heads_per_kv_head_matches_reference():
    _compare((1, 33, 33, 6, 2, 16))


@pytest.mark.parametrize("head_dim", [24, 40])
def test_head_dim_that_is_not_a_power_of_two_matches_reference(head_dim):
    _compare((1, 21, 21, 2, 1, head_dim))


@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (5, 21), (18, 40)])
def test_queries_align_bottom_right_when_there_are_more_keys_than_queries(q_len, kv_len):
    _compare((2, q_len, kv_len, 2, 1, 16))


def test_a_single_token_returns_its_value_and_passes_gradient_only_to_it():
    q, k, v, dout = _inputs(1, 1, 1, 3, 1, 16)
    out, dq, dk, dv = _run(_triton(), q, k, v, dout)
    assert torch.equal(out, v.expand_as(out))
    assert _rel_err(dv, dout.sum(2, keepdim=True)) < 1e-6
    # Its softmax is the constant 1, so q and k get no gradient (up to rounding of dO.v - dO.O).
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_left_and_right_padded_batches_match_reference(batch):
    kv_len = 29
    mask = torch.ones(batch, kv_len, dtype=torch.long)
    mask[0, :6] = 0  # left padding: the first queries see no real key at all
    if batch > 1:
        mask[1, 20:] = 0  # right padding
        mask[2, 3:5] = 0  # holes anywhere are masked too
    out, dq, _, _ = _compare((batch, kv_len, kv_len, 4, 2, 16), key_padding_mask=mask)
    # Query rows before the first real key see nothing: zeros, and no gradient reaches them.
    assert (out[0, :6] == 0).all() and (dq[0, :6] == 0).all()


def test_very_negative_scores_after_a_fully_masked_block_do_not_underflow():
    # Query block 16..31 starts at document 1 (keys 0..19), so queries 20..31 of document 2 see
    # nothing in key block 0..15. Their real keys then all score about -200, far below exp's float32
    # range unless the running max stays -inf through the empty block.
    q, k, v, dout = _inputs(1, 40, 40, 2, 1, 16)
    q = q.abs() / 4 + 6.0
    k = -(k.abs() / 4 + 6.0)
    cu_seqlens = torch.tensor([0, 20, 40], dtype=torch.int32)
    # Scores this large carry ~1e-5 relative rounding in float32 (the reference's own error too).
    out, *_ = _compare((1, 40, 40, 2, 1, 16), cu_seqlens=cu_seqlens, tensors=(q, k, v, dout), tol=5e-5)
    assert (out[0, 20:].abs().sum(-1) > 0).all()


def test_packed_documents_of_uneven_length_match_reference():
    cu_seqlens = torch.tensor([0, 13, 14, 40], dtype=torch.int32)  # the middle document has one token
    _compare((1, 40, 40, 3, 1, 16), cu_seqlens=cu_seqlens)


def test_empty_documents_in_cu_seqlens_change_nothing():
    cu_seqlens = torch.tensor([0, 0, 13, 13, 30], dtype=torch.int32)
    _compare((1, 30, 30, 2, 1, 16), cu_seqlens=cu_seqlens)


def test_packed_attention_equals_running_each_document_alone():
    bounds = [0, 19, 22, 47]
    q, k, v, dout = _inputs(1, 47, 47, 4, 2, 24, seed=3)
    packed = _run(_triton(), q, k, v, dout, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = [t[:, start:end] for t in (q, k, v, dout)]
        alone = _run(_triton(), *piece)
        for a, b in zip(packed, alone):
            assert _rel_err(a[:, start:end], b) < 1e-5


def test_sliding_window_smaller_than_the_document_matches_reference():
    _compare((2, 45, 45, 2, 1, 16), sliding_window=7)
    _compare(
        (1, 45, 45, 2, 1, 16), sliding_window=20, cu_seqlens=torch.tensor([0, 30, 45], dtype=torch.int32)
    )


def test_sliding_window_with_more_keys_than_queries_matches_reference():
    _compare((1, 9, 40, 2, 2, 16), sliding_window=12)


def test_logit_softcap_and_its_gradient_match_reference():
    _compare((1, 35, 35, 4, 2, 16), softcap=1.5)  # a small cap so tanh saturates
    _compare((2, 20, 20, 2, 1, 24), softcap=50.0, sliding_window=9)


def test_every_option_at_once_matches_reference():
    mask = torch.ones(1, 50, dtype=torch.long)
    mask[0, 30:33] = 0
    _compare(
        (1, 50, 50, 6, 2, 40),
        sliding_window=11,
        softcap=5.0,
        cu_seqlens=torch.tensor([0, 1, 26, 50], dtype=torch.int32),
        key_padding_mask=mask,
    )


def test_float16_inputs_match_the_exact_result_within_half_precision():
    _compare((2, 33, 33, 4, 2, 24), dtype=torch.float16, tol=3e-3, softcap=20.0)


def test_bfloat16_inputs_match_the_exact_result_within_bfloat16_precision():
    _compare((1, 33, 33, 2, 1, 16), dtype=torch.bfloat16, tol=2e-2, cu_seqlens=torch.tensor([0, 10, 33]))


def test_every_output_and_gradient_element_is_written(poisoned_buffers):
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, 17:] = 0
    _compare((2, 19, 23, 4, 2, 24), key_padding_mask=mask, sliding_window=6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN poison is on purpose
def test_keys_outside_the_window_are_never_read():
    # Keys 0..15 fill one whole key block; with window 16 no query from position 32 on can see them.
    q, k, v, dout = _inputs(1, 64, 64, 2, 1, 16, seed=5)
    poisoned_v = v.clone()
    poisoned_v[:, :16] = float("nan")
    out = attention_triton(q, k, poisoned_v, scale=0.25, sliding_window=16, blocks=BLOCKS)
    want = attention_reference(q, k, v, scale=0.25, sliding_window=16)
    assert torch.isfinite(out[:, 32:]).all()
    assert _rel_err(out[:, 32:], want[:, 32:]) < 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN poison is on purpose
def test_other_documents_are_never_read():
    # Two block-aligned documents: the second one's queries must not load the first one's keys,
    # and the first one's keys must not load the second one's queries in the backward pass.
    q, k, v, dout = _inputs(1, 64, 64, 2, 1, 16, seed=6)
    cu_seqlens = torch.tensor([0, 32, 64], dtype=torch.int32)
    poisoned = [t.clone() for t in (q, k, v, dout)]
    for t in poisoned[1:3]:
        t[:, :32] = float("nan")
    out, dq, _, _ = _run(_triton(), *poisoned, cu_seqlens=cu_seqlens)
    assert torch.isfinite(out[:, 32:]).all() and torch.isfinite(dq[:, 32:]).all()
    poisoned = [t.clone() for t in (q, k, v, dout)]
    poisoned[0][:, 32:] = float("nan")
    poisoned[3][:, 32:] = float("nan")
    _, _, dk, dv = _run(_triton(), *poisoned, cu_seqlens=cu_seqlens)
    assert torch.isfinite(dk[:, :32]).all() and torch.isfinite(dv[:, :32]).all()


def test_strided_views_of_a_fused_projection_are_read_in_place():
    gen = torch.Generator().manual_seed(9)
    batch, seq, n_heads, n_kv, head_dim = 2, 27, 4, 2, 16
    qkv = torch.randn(batch, seq, (n_heads + 2 * n_kv) * head_dim, generator=gen)
    q, k, v = qkv.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1)
    q = q.view(batch, seq, n_heads, head_dim)
    k = k.view(batch, seq, n_kv, head_dim)
    v = v.view(batch, seq, n_kv, head_dim)
    assert not k.is_contiguous()
    dout = torch.randn(batch, seq, n_heads, head_dim, generator=gen)
    got = _run(_triton(), q, k, v, dout)
    want = _run(attention_reference, q, k, v, dout)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5


def test_public_attention_runs_the_triton_path_when_forced(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    called = []
    monkeypatch.setattr(attention_module.AttentionFunction, "apply", lambda *a: called.append(1) or a[0] * 0)
    q, k, v, _ = _inputs(1, 5, 5, 2, 1, 16)
    attention(q, k, v, scale=0.25)
    assert called == [1]


def test_public_attention_matches_reference_under_forced_triton(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    q, k, v, dout = _inputs(2, 20, 20, 2, 1, 16)
    got = _run(attention, q, k, v, dout, sliding_window=5)
    want = _run(attention_reference, q, k, v, dout, sliding_window=5)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5


def test_sdpa_path_matches_reference_for_plain_causal_attention():
    q, k, v, dout = _inputs(2, 19, 19, 4, 2, 16)
    got = _run(attention_sdpa, q, k, v, dout)
    want = _run(attention_reference, q, k, v, dout)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5


def test_fewer_keys_than_queries_is_refused():
    q, k, v, _ = _inputs(1, 8, 4, 2, 1, 16)
    with pytest.raises(KernelError, match="S >= T"):
        attention_triton(q, k, v, scale=0.25)


def test_packed_batch_with_more_than_one_row_is_refused():
    q, k, v, _ = _inputs(2, 8, 8, 2, 1, 16)
    with pytest.raises(KernelError, match="batch 1"):
        attention_triton(q, k, v, scale=0.25, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
