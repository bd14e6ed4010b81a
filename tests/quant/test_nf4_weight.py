"""NF4Weight: a frozen 4-bit weight made of per-checkpoint-tensor NF4 blocks, dense only inside a GEMM."""

import pytest
import torch

from velotune.errors import KernelError
from velotune.kernels import lora as lora_kernels
from velotune.kernels.lora import lora_projection, lora_projection_reference
from velotune.quant.nf4 import dequantize_nf4_reference, quantize_nf4_reference
from velotune.quant.nf4_weight import NF4Weight, scratch_buffer


def _weight(parts=((0, 40), (40, 24), (64, 24)), in_features=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = sum(rows for _, rows in parts)
    w = NF4Weight(out, in_features, torch.float32, device="cpu")
    dense = torch.empty(out, in_features)
    for row0, rows in parts:
        q = quantize_nf4_reference(torch.randn(rows, in_features, generator=gen))
        w.set_part(row0, q)
        dense[row0 : row0 + rows] = dequantize_nf4_reference(q)
    return w, dense


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("parts", [((0, 40), (40, 24), (64, 24)), ((0, 88),)])
@pytest.mark.parametrize("whole", [False, True])
def test_products_equal_those_of_the_dequantized_weight(parts, whole):
    w, dense = _weight(parts)
    # whole: the parts fit the limit, so the GEMMs run once over the weight dequantized whole.
    w.whole_numel_limit = w.numel() if whole else w.numel() - 1
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(7, 96, generator=gen), torch.randn(7, 88, generator=gen)
    assert torch.equal(w.dequantize(), dense)
    calls = []
    real = w.dequantize
    w.dequantize = lambda *a, **k: calls.append(1) or real(*a, **k)
    assert _rel(w.linear(x), x @ dense.t()) < 1e-6
    assert _rel(w.grad_input(dy), dy @ dense) < 1e-6
    assert len(calls) == (2 if whole and len(parts) > 1 else 0)


@pytest.mark.parametrize("parts", [((0, 40), (40, 24), (64, 24)), ((0, 88),)])
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("triton", [False, True])
def test_the_folded_product_equals_that_of_the_dequantized_weight_with_its_extra_columns(
    parts, whole, triton, monkeypatch
):
    # x_wide @ [W | cols]^T, W dequantized into the first columns of scratch rows [rows, in + R].
    if triton:
        monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    w, dense = _weight(parts, in_features=128)
    w.whole_numel_limit = w.numel() if whole else w.numel() - 1
    gen = torch.Generator().manual_seed(3)
    x_wide, cols = torch.randn(9, 136, generator=gen), torch.randn(88, 8, generator=gen)
    calls = []
    real = w.dequantize
    w.dequantize = lambda *a, **k: calls.append(1) or real(*a, **k)
    want = x_wide @ torch.cat((dense, cols), 1).t()
    got = w.linear_folded(x_wide, cols)
    assert _rel(got, want) < 1e-6
    out = torch.full_like(got, float("nan"))
    assert w.linear_folded(x_wide, cols, out=out) is out and torch.equal(out, got)  # into a given tensor
    assert len(calls) == 0  # never a dense copy of the whole weight outside the scratch rows
    with pytest.raises(KernelError, match="linear_folded"):
        w.linear_folded(x_wide, cols[:, :5])
    assert w.folds(9) and not w.folds(8)  # a decoding step's few rows take the packed kernel instead
    unaligned, _ = _weight(parts)  # rows of 96 = 1.5 quantization blocks
    assert not unaligned.folds(9)


def test_the_loader_lets_fused_weights_no_larger_than_the_largest_block_dequantize_whole():
    from velotune.io.load import build_spec, meta_model

    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5)  # fmt: skip
    model = meta_model(build_spec(cfg, "<test>"), torch.float32, load_in_4bit=True)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    # The largest block is gate_proj (or up_proj): 80 x 32. q/k/v (64 x 32) fits it, gate/up does not.
    assert {p.weight.whole_numel_limit for p in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)} == {
        80 * 32
    }
    assert attn.qkv.weight.numel() <= 80 * 32 < mlp.gate_up.weight.numel()


def test_parts_may_arrive_in_any_order():
    w, dense = _weight(((40, 24), (0, 40), (64, 24)))
    assert [r0 for r0, _ in w.parts()] == [0, 40, 64]
    assert torch.equal(w.dequantize(), dense)


def test_scratch_buffer_is_reused_across_calls_and_grows_when_needed():
    a = scratch_buffer(100, torch.device("cpu"), torch.float16)
    b = scratch_buffer(60, torch.device("cpu"), torch.float16)
    assert a.data_ptr() == b.data_ptr()
    c = scratch_buffer(1000, torch.device("cpu"), torch.float16)
    assert (
        c.numel() == 1000
        and scratch_buffer(10, torch.device("cpu"), torch.float16).data_ptr() == c.data_ptr()
    )


def test_dtype_casts_change_the_compute_dtype_but_never_the_stored_format():
    w, dense = _weight()
    storage = {name: buf.dtype for name, buf in w.named_buffers()}
    w.to(torch.float16)
    assert w.dtype == torch.float16 and {name: buf.dtype for name, buf in w.named_buffers()} == storage
    assert torch.equal(w.dequantize(), dense.half())
    w.double().float()
    assert w.dtype == torch.float32 and torch.equal(w.dequantize(), dense)


def test_stored_as_parameters_for_fsdp2_the_codes_and_scales_keep_their_bytes():
    # Odd byte counts (1,093 code bytes, 35 absmax codes in the middle part): the float32 carriers are padded.
    w, dense = _weight(((0, 40), (40, 23), (63, 24)), in_features=95)
    fields = ("data", "absmax", "nested_absmax", "code", "nested_code", "nested_offset")
    before = [{f: getattr(q, f).clone() for f in fields} for _, q in w.parts()]
    w.store_as_parameters()
    params = dict(w.named_parameters())
    # FSDP2 (before torch 2.12) shards floating-point parameters only, and none of these may get a gradient.
    assert len(params) == 3 * 3 and all(
        p.dtype == torch.float32 and not p.requires_grad for p in params.values()
    )
    assert all("code" in name or "offset" in name for name, _ in w.named_buffers())
    for (_, q), saved in zip(w.parts(), before):
        for f in fields:
            got = getattr(q, f)
            assert got.dtype == saved[f].dtype and torch.equal(got, saved[f]), f
    assert torch.equal(w.dequantize(), dense)
    w.to(torch.float16)
    assert all(p.dtype == torch.float32 for p in w.parameters()) and torch.equal(w.dequantize(), dense.half())


def test_misplaced_missing_or_sliced_parts_are_refused():
    w = NF4Weight(64, 96, torch.float32, device="cpu")
    w.set_part(0, quantize_nf4_reference(torch.randn(40, 96)))
    with pytest.raises(KernelError, match="overlap"):
        w.set_part(32, quantize_nf4_reference(torch.randn(8, 96)))
    with pytest.raises(KernelError, match="does not fit"):
        w.set_part(40, quantize_nf4_reference(torch.randn(24, 64)))
    with pytest.raises(KernelError, match="40 of its 64 rows"):
        w.dequantize()
    with pytest.raises(KernelError, match="cannot be sliced"):
        w[0:8]


@pytest.mark.parametrize(
    "with_lora,in_features,ranks",
    [(True, 96, (3, 2)), (False, 96, (3, 2)), (True, 128, (3, 5)), (True, 128, (3, 4))],
)
def test_the_projection_op_on_a_4bit_weight_matches_the_reference_on_its_dense_weight(
    with_lora, in_features, ranks, monkeypatch
):
    # in 128 with ranks summing to 8: the Function folds the LoRA into the base GEMM
    # (velotune.kernels.lora.fold_width); 96 (not whole blocks) or ranks summing to 7: it adds it after.
    w, dense = _weight(in_features=in_features)
    gen = torch.Generator().manual_seed(2)
    sizes = (40, 24, 24)
    a = torch.randn(sum(ranks), in_features, generator=gen) * 0.1 if with_lora else None
    bs = (
        [torch.randn(40, ranks[0], generator=gen) * 0.1, None, torch.randn(24, ranks[1], generator=gen) * 0.1]
        if with_lora
        else [None] * 3
    )
    bias = torch.randn(88, generator=gen)
    x = torch.randn(2, 5, in_features, generator=gen)
    dy = torch.randn(2, 5, 88, generator=gen)

    def run(fn, weight):
        xx = x.clone().requires_grad_(True)
        aa = a.clone().requires_grad_(True) if with_lora else None
        bb = [b.clone().requires_grad_(True) if b is not None else None for b in bs]
        y = fn(xx, weight, bias, aa, bb, sizes, (2.0, 0.0, 0.5))
        y.backward(dy)
        grads = [xx.grad] + ([aa.grad] + [b.grad for b in bb if b is not None] if with_lora else [])
        return y.detach(), grads

    y_ref, g_ref = run(lora_projection_reference, dense)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")  # the Function, dequantizing into the scratch buffer
    saved, folded = [], []
    real_folded = lora_kernels._folded_forward
    monkeypatch.setattr(lora_kernels, "_folded_forward", lambda *a: folded.append(1) or real_folded(*a))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, grads = run(lora_projection, w)
    assert bool(folded) == (with_lora and in_features % 64 == 0 and sum(ranks) % 8 == 0)
    assert dense.numel() not in saved and max(saved) < dense.numel()  # no dense weight waits for backward
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    y_cpu, g_cpu = run(lora_projection, w)
    for got, got_grads in ((y, grads), (y_cpu, g_cpu)):
        assert _rel(got, y_ref) < 1e-5
        for g, r in zip(got_grads, g_ref):
            assert _rel(g, r) < 1e-5
