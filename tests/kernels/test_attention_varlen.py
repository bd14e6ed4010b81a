"""The glue between `attention` and PyTorch's FlashAttention varlen kernel, checked on CPU.

varlen_attn itself only runs on CUDA, so its place is taken by `_flash_semantics`: FlashAttention's
documented contract (documents given by offsets, query i of a document sees keys i - left ... i + right
of the same document, -1 meaning unbounded, kv head h // (Hq / Hk) for query head h) in plain PyTorch.
What these tests decide is the translation: offsets, longest document, window convention, scale, GQA
flag, layout and the dispatch choice. The kernel's own numbers are checked on the GPU by
tests/kernels/gpu_check_varlen_attention.py.
"""

import pytest
import torch

from tests.kernels.checks import norm_rel_err
from velotune.errors import KernelError
from velotune.kernels import attention as attention_module
from velotune.kernels.attention import (
    attention,
    attention_mask_reference,
    attention_reference,
    attention_varlen,
    select_backend,
    varlen_documents,
    varlen_window,
)


class _FlashSemantics:
    """Stands in for torch.nn.attention.varlen.varlen_attn and records how it was called."""

    def __init__(self, takes_gqa: bool = True):
        self.calls: list[dict] = []
        self.takes_gqa = takes_gqa

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, **kwargs):
        if not self.takes_gqa and "enable_gqa" in kwargs:
            raise TypeError("varlen_attn() got an unexpected keyword argument 'enable_gqa'")
        self.calls.append(
            dict(query=query, key=key, value=value, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k, max_q=max_q,
                 max_k=max_k, scale=scale, window_size=window_size, **kwargs)
        )  # fmt: skip
        total, n_heads, _ = query.shape
        n_kv = key.shape[1]
        if n_heads != n_kv and self.takes_gqa:
            assert kwargs.get("enable_gqa"), "PyTorch >= 2.12 refuses fewer kv heads without enable_gqa"
        offsets = cu_seq_q.tolist()
        assert offsets[0] == 0 and offsets[-1] == total and torch.equal(cu_seq_q, cu_seq_k)
        assert all(a < b for a, b in zip(offsets, offsets[1:])), "offsets must strictly increase"
        left, right = window_size
        outs = []
        for start, end in zip(offsets, offsets[1:]):
            n = end - start
            assert n <= max_q and n <= max_k
            i = torch.arange(n)[:, None]
            j = torch.arange(n)[None, :]
            visible = torch.ones(n, n, dtype=torch.bool)
            if left >= 0:
                visible &= j >= i - left
            if right >= 0:
                visible &= j <= i + right
            qd = query[start:end].transpose(0, 1)
            kd = key[start:end].transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)
            vd = value[start:end].transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)
            scores = (qd @ kd.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
            outs.append((torch.softmax(scores, dim=-1) @ vd).transpose(0, 1))
        return torch.cat(outs, dim=0)


@pytest.fixture
def flash(monkeypatch):
    """Installs `_FlashSemantics` as varlen_attn on a flash-capable device; returns it."""
    fake = _FlashSemantics()
    monkeypatch.setattr(attention_module, "_varlen_api", lambda: (fake, fake.takes_gqa))
    monkeypatch.setattr(attention_module, "_flash_device_ok", lambda device: True)
    monkeypatch.setattr(attention_module, "_last_documents", [None])
    return fake


def _inputs(total, n_heads, n_kv, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, total, n_heads, head_dim, generator=gen)
    k = torch.randn(1, total, n_kv, head_dim, generator=gen)
    v = torch.randn(1, total, n_kv, head_dim, generator=gen)
    dout = torch.randn(1, total, n_heads, head_dim, generator=gen)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _run(fn, q, k, v, dout, **kwargs):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _cu(offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def _doc_ids_of(bounds, total):
    return torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())[:total]


# --- argument translation, pure functions


@pytest.mark.parametrize(
    "cu_seqlens, total",
    [
        ([0, 5, 6, 17], 17),  # a document of length 1 in the middle
        ([0, 1, 2, 3, 9], 9),  # leading documents of length 1
        ([0, 4, 4, 9], 9),  # repeated offsets are empty documents
        ([0, 9, 3, 12], 12),  # unsorted offsets
        ([0, 12], 12),  # one document
        ([0, 0, 12, 40, 12], 12),  # offsets at or past the end start nothing (the Triton path's rule)
    ],
)
def test_varlen_offsets_describe_the_same_documents_as_the_reference(cu_seqlens, total):
    bounds, longest = varlen_documents(cu_seqlens, total)
    assert bounds[0] == 0 and bounds[-1] == total
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert longest == max(b - a for a, b in zip(bounds, bounds[1:]))
    ids = _doc_ids_of(bounds, total)
    same_doc = ids[:, None] == ids[None, :]
    # Two positions share a document in the offsets iff they share one in the Triton path ...
    doc_start, _ = attention_module._document_bounds(_cu(cu_seqlens), total)
    assert torch.equal(same_doc, doc_start[:, None] == doc_start[None, :])
    # ... and in the reference, which takes inner offsets inside the sequence only.
    if all(0 <= c < total for c in cu_seqlens[1:-1]):
        mask = attention_mask_reference(1, total, total, torch.device("cpu"), cu_seqlens=_cu(cu_seqlens))
        assert torch.equal(same_doc, mask[0, 0] | mask[0, 0].T)


def test_longest_document_is_found_wherever_it_sits():
    assert varlen_documents([0, 3, 20, 22], 22) == ([0, 3, 20, 22], 17)
    assert varlen_documents([0, 3, 5, 22], 22)[1] == 17
    assert varlen_documents([0, 15, 22], 22)[1] == 15


@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_flash_window_sees_exactly_the_keys_our_sliding_window_sees(window):
    total = 16
    left, right = varlen_window(window, longest=total)
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    flash_visible = (j <= i + right) & ((j >= i - left) if left >= 0 else True)
    ours = attention_mask_reference(1, total, total, torch.device("cpu"), sliding_window=window)[0, 0]
    assert torch.equal(flash_visible, ours)


def test_a_window_no_document_fills_is_plain_causal_as_an_exact_tuple():
    # varlen_attn tests `window_size == (-1, 0)` to take FlashAttention's causal path: a list fails that.
    assert varlen_window(None, 100) == (-1, 0) and type(varlen_window(None, 100)) is tuple
    assert varlen_window(100, 100) == (-1, 0)
    assert varlen_window(99, 100) == (98, 0) and type(varlen_window(99, 100)) is tuple


def test_a_window_that_hides_every_key_is_refused():
    with pytest.raises(KernelError, match="hides every key"):
        varlen_window(0, 10)


# --- the glue through attention_varlen, with FlashAttention's semantics in place of the kernel


@pytest.mark.parametrize(
    "offsets, n_heads, n_kv, window",
    [
        ([0, 7, 8, 21, 30], 4, 2, None),  # GQA, a length-1 document
        ([0, 1, 2, 3, 30], 2, 2, None),  # length-1 documents first
        ([0, 11, 30], 6, 2, 4),  # sliding window smaller than the documents
        ([0, 5, 30], 2, 1, 1),  # window 1: each query sees only itself
        ([0, 9, 30], 2, 2, 21),  # window as long as the longest document: plain causal
        ([0, 30], 3, 1, 7),
    ],
)
def test_varlen_glue_matches_reference_outputs_and_gradients(flash, offsets, n_heads, n_kv, window):
    q, k, v, dout = _inputs(30, n_heads, n_kv, 16)
    scale = 0.3  # not 1/sqrt(D): the scale must be passed, not defaulted
    cu = _cu(offsets)
    got = _run(attention_varlen, q, k, v, dout, scale=scale, cu_seqlens=cu, sliding_window=window)
    want = _run(attention_reference, q, k, v, dout, scale=scale, cu_seqlens=cu, sliding_window=window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        assert norm_rel_err(a, b) < 1e-5, (name, norm_rel_err(a, b))
    (call,) = flash.calls
    assert call["scale"] == scale
    assert call["max_q"] == call["max_k"] == max(b - a for a, b in zip(offsets, offsets[1:]))
    assert isinstance(call["max_q"], int) and call["cu_seq_q"].dtype == torch.int32


def test_strided_views_of_a_fused_qkv_projection_reach_varlen_without_a_copy(flash):
    total, n_heads, n_kv, head_dim = 13, 4, 2, 8
    qkv = torch.randn(1, total, (n_heads + 2 * n_kv) * head_dim, dtype=torch.bfloat16)
    q, k, v = qkv.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1)
    q = q.view(1, total, n_heads, head_dim)
    k = k.view(1, total, n_kv, head_dim)
    v = v.view(1, total, n_kv, head_dim)
    out = attention_varlen(q, k, v, scale=0.5, cu_seqlens=_cu([0, 6, 13]))
    (call,) = flash.calls
    for name, given, seen in (("q", q, call["query"]), ("k", k, call["key"]), ("v", v, call["value"])):
        assert seen.data_ptr() == given.data_ptr() and seen.stride() == given.stride()[1:], name
    assert out.shape == (1, total, n_heads, head_dim)


def test_enable_gqa_is_passed_only_to_a_varlen_attn_that_takes_it(monkeypatch):
    monkeypatch.setattr(attention_module, "_last_documents", [None])
    q, k, v, _ = _inputs(10, 4, 2, 8)
    cu = _cu([0, 4, 10])
    new = _FlashSemantics(takes_gqa=True)
    monkeypatch.setattr(attention_module, "_varlen_api", lambda: (new, True))
    attention_varlen(q, k, v, scale=1.0, cu_seqlens=cu)
    attention_varlen(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), scale=1.0, cu_seqlens=cu)
    assert [c["enable_gqa"] for c in new.calls] == [True, False]
    old = _FlashSemantics(takes_gqa=False)  # torch 2.11: kv heads go to FlashAttention as they are
    monkeypatch.setattr(attention_module, "_varlen_api", lambda: (old, False))
    want = attention_reference(q, k, v, scale=1.0, cu_seqlens=cu)
    assert norm_rel_err(attention_varlen(q, k, v, scale=1.0, cu_seqlens=cu), want) < 1e-5
    assert "enable_gqa" not in old.calls[0]


def test_documents_are_worked_out_once_per_batch_and_again_after_an_edit(flash, monkeypatch):
    seen = []
    real = attention_module.varlen_documents
    monkeypatch.setattr(
        attention_module, "varlen_documents", lambda cu, t: seen.append(list(cu)) or real(cu, t)
    )
    q, k, v, _ = _inputs(12, 2, 2, 8)
    cu = _cu([0, 5, 12])
    for _ in range(3):  # three layers of one step
        attention_varlen(q, k, v, scale=1.0, cu_seqlens=cu)
    assert seen == [[0, 5, 12]]
    cu[1] = 7  # the same tensor edited in place
    out = attention_varlen(q, k, v, scale=1.0, cu_seqlens=cu)
    assert seen == [[0, 5, 12], [0, 7, 12]]
    assert norm_rel_err(out, attention_reference(q, k, v, scale=1.0, cu_seqlens=cu)) < 1e-5
    attention_varlen(q, k, v, scale=1.0, cu_seqlens=_cu([0, 7, 12]))  # an equal but new tensor
    assert len(seen) == 3


def test_varlen_refuses_more_keys_than_queries(flash):
    q, _, _, _ = _inputs(5, 2, 2, 8)
    _, k, v, _ = _inputs(9, 2, 2, 8)
    with pytest.raises(KernelError, match="as many keys as queries"):
        attention_varlen(q, k, v, scale=1.0, cu_seqlens=_cu([0, 5]))


def test_varlen_without_a_usable_pytorch_says_what_to_do(monkeypatch):
    monkeypatch.setattr(attention_module, "_varlen_api", lambda: None)
    q, k, v, _ = _inputs(5, 2, 2, 8)
    with pytest.raises(KernelError, match="PyTorch 2.11"):
        attention_varlen(q, k, v, scale=1.0, cu_seqlens=_cu([0, 5]))


# --- which PyTorch has a usable varlen_attn


def _torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("never called")


def _torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):  # fmt: skip
    raise AssertionError("never called")


def _torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    raise AssertionError("never called")


def test_varlen_is_recognised_by_its_keywords_not_by_the_torch_version():
    assert attention_module._varlen_features(_torch_2_10) is None
    assert attention_module._varlen_features(_torch_2_11) == (_torch_2_11, False)
    assert attention_module._varlen_features(_torch_2_12) == (_torch_2_12, True)


# --- dispatch


def _case(dtype=torch.bfloat16, head_dim=64, total=24, n_kv=2, kv_total=None):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, total, 4, head_dim, generator=gen).to(dtype)
    k = torch.randn(1, kv_total or total, n_kv, head_dim, generator=gen).to(dtype)
    return q, k, k.clone()


PACKED = dict(cu_seqlens=_cu([0, 10, 24]))


@pytest.mark.parametrize(
    "case, options, expected",
    [
        (_case(), PACKED, "varlen"),
        (_case(), dict(PACKED, sliding_window=4), "varlen"),
        (_case(torch.float16, head_dim=256, n_kv=4), PACKED, "varlen"),
        (_case(head_dim=72), PACKED, "varlen"),
        (_case(), dict(PACKED, softcap=50.0), "triton"),  # Gemma-2: FlashAttention has no softcap here
        (_case(), dict(PACKED, sliding_window=0), "triton"),  # hides every key
        (_case(torch.float32), PACKED, "triton"),
        (_case(head_dim=20), PACKED, "triton"),  # not a multiple of 8
        (_case(head_dim=264), PACKED, "triton"),  # above FlashAttention's 256
        (_case(total=24, kv_total=30), dict(cu_seqlens=_cu([0, 10, 30])), "triton"),  # S > T
        (_case(), dict(key_padding_mask=torch.ones(1, 24, dtype=torch.long)), "triton"),
        (_case(), {}, "triton"),  # plain causal on a CPU tensor: neither SDPA nor varlen
    ],
)
def test_packed_causal_attention_goes_to_varlen_only_where_it_computes_the_same(
    flash, monkeypatch, case, options, expected
):
    monkeypatch.setattr(attention_module, "PACKED_BACKEND", "varlen")
    assert select_backend(*case, **options) == expected


def test_packed_attention_stays_on_triton_when_varlen_is_not_chosen_or_cannot_run(flash, monkeypatch):
    case = _case()
    monkeypatch.setattr(attention_module, "PACKED_BACKEND", "triton")
    assert select_backend(*case, **PACKED) == "triton"
    monkeypatch.setattr(attention_module, "PACKED_BACKEND", "varlen")
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert select_backend(*case, **PACKED) == "triton"
    monkeypatch.setenv("VELOTUNE_KERNELS", "auto")
    monkeypatch.setattr(attention_module, "_flash_device_ok", lambda device: False)  # e.g. pre-Ampere
    assert select_backend(*case, **PACKED) == "triton"
    monkeypatch.setattr(attention_module, "_flash_device_ok", lambda device: True)
    monkeypatch.setattr(attention_module, "_varlen_api", lambda: None)  # torch without a usable varlen_attn
    assert select_backend(*case, **PACKED) == "triton"


def test_a_cpu_tensor_is_never_flash_capable():
    assert attention_module._flash_device_ok(torch.device("cpu")) is False


def test_public_attention_runs_varlen_for_packed_rows_and_the_reference_when_asked(flash, monkeypatch):
    monkeypatch.setattr(attention_module, "PACKED_BACKEND", "varlen")
    monkeypatch.setattr(attention_module, "use_triton", lambda *tensors: True)  # as with CUDA tensors
    q, k, v, _ = _inputs(24, 4, 2, 16, dtype=torch.bfloat16)
    out = attention(q, k, v, scale=0.25, sliding_window=5, **PACKED)
    assert len(flash.calls) == 1 and flash.calls[0]["window_size"] == (4, 0)
    want = attention_reference(q.float(), k.float(), v.float(), scale=0.25, sliding_window=5, **PACKED)
    assert norm_rel_err(out.float(), want) < 1e-2  # bf16 inputs, float32 reference
    monkeypatch.setattr(attention_module, "use_triton", lambda *tensors: False)  # VELOTUNE_KERNELS=reference
    attention(q, k, v, scale=0.25, sliding_window=5, **PACKED)
    assert len(flash.calls) == 1
