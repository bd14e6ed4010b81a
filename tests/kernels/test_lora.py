"""The fused LoRA projection's hand-written backward gives the reference path's outputs and gradients."""

import pytest
import torch

from tests.model_zoo import rel_err
from velotune.errors import KernelError
from velotune.kernels.lora import LoraProjectionFunction, lora_projection, lora_projection_reference


def make_case(out_sizes, ranks, in_features, lead, seed, dtype=torch.float32, lora_dtype=None, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen) * scale).to(dt)

    lora_dtype = lora_dtype or dtype
    return dict(
        x=rnd(*lead, in_features),
        weight=rnd(sum(out_sizes), in_features, scale=in_features**-0.5),
        bias=rnd(sum(out_sizes), scale=0.1) if bias else None,
        lora_a=rnd(sum(r for r in ranks if r), in_features, scale=in_features**-0.5, dt=lora_dtype),
        lora_bs=[rnd(size, r, scale=0.3, dt=lora_dtype) if r else None for size, r in zip(out_sizes, ranks)],
        out_sizes=tuple(out_sizes),
        scales=tuple(0.5 + i for i in range(len(out_sizes))),
    )


def run(fn, case, train_weight=False, dy_seed=3, **kw):
    """Output and the gradient of every differentiable input (None where it needs none)."""
    x = case["x"].clone().requires_grad_(True)
    w = case["weight"].clone().requires_grad_(train_weight)
    b = None if case["bias"] is None else case["bias"].clone().requires_grad_(train_weight)
    a = case["lora_a"].clone().requires_grad_(True)
    bs = [None if t is None else t.clone().requires_grad_(True) for t in case["lora_bs"]]
    y = fn(x, w, b, a, bs, case["out_sizes"], case["scales"], **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
    y.backward(dy)
    grads = {"x": x.grad, "weight": w.grad, "bias": None if b is None else b.grad, "lora_a": a.grad}
    grads.update({f"lora_b{i}": t.grad for i, t in enumerate(bs) if t is not None})
    return y.detach(), grads


def function_path(x, w, b, a, bs, out_sizes, scales, x_lora=None):
    has = tuple(t is not None for t in bs)
    return LoraProjectionFunction.apply(
        x, x_lora, w, b, a, out_sizes, scales, has, *[t for t in bs if t is not None]
    )


def assert_same(case, tol=1e-5, train_weight=False):
    y, grads = run(function_path, case, train_weight)
    y_ref, grads_ref = run(lora_projection_reference, case, train_weight)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel_err(y.float(), y_ref.float()) < tol
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        if grads_ref[name] is None:
            assert g is None, f"{name} got a gradient it does not need"
            continue
        assert g.dtype == grads_ref[name].dtype and g.shape == grads_ref[name].shape, name
        assert rel_err(g.float(), grads_ref[name].float()) < tol, name


@pytest.mark.parametrize(
    "out_sizes, ranks, in_features, lead",
    [
        ((120, 40, 40), (4, 4, 4), 48, (3, 13)),  # q/k/v, GQA
        ((120, 40, 40), (5, 0, 3), 48, (2, 7)),  # k without LoRA, unequal ranks
        ((72, 72), (8, 8), 48, (37,)),  # gate/up, 2-D input
        ((48,), (16,), 72, (1, 1)),  # one block, batch 1, sequence 1
        ((33,), (1,), 17, (2, 5)),  # rank 1, odd sizes
    ],
)
def test_fused_function_matches_reference_outputs_and_gradients(out_sizes, ranks, in_features, lead):
    assert_same(make_case(out_sizes, ranks, in_features, lead, seed=sum(out_sizes) + in_features))


def test_frozen_base_weight_and_bias_get_no_gradient():
    case = make_case((40, 20), (4, 4), 24, (2, 3), seed=1)
    _, grads = run(function_path, case, train_weight=False)
    assert grads["weight"] is None and grads["bias"] is None
    assert all(grads[k] is not None for k in ("x", "lora_a", "lora_b0", "lora_b1"))


def test_full_finetuning_gets_weight_and_bias_gradients_matching_reference():
    assert_same(make_case((40, 20, 20), (4, 0, 2), 24, (2, 5), seed=2), train_weight=True)


def test_without_any_lora_block_the_function_is_the_plain_projection():
    case = make_case((30, 10), (0, 0), 16, (3, 4), seed=4)
    case["lora_a"] = torch.empty(0, 16)
    assert_same(case, train_weight=True)


def test_input_that_needs_no_gradient_gets_none_and_lora_still_trains():
    case = make_case((40,), (4,), 24, (2, 3), seed=5)
    a = case["lora_a"].clone().requires_grad_(True)
    b = case["lora_bs"][0].clone().requires_grad_(True)
    y = function_path(case["x"], case["weight"], case["bias"], a, [b], case["out_sizes"], case["scales"])
    y.sum().backward()
    a_ref = case["lora_a"].clone().requires_grad_(True)
    b_ref = case["lora_bs"][0].clone().requires_grad_(True)
    lora_projection_reference(case["x"], case["weight"], case["bias"], a_ref, [b_ref], case["out_sizes"],
                              case["scales"]).sum().backward()  # fmt: skip
    assert rel_err(a.grad, a_ref.grad) < 1e-5 and rel_err(b.grad, b_ref.grad) < 1e-5


def test_float32_lora_weights_on_half_activations_compute_in_half_and_return_float32_gradients():
    case = make_case((40, 20), (4, 4), 32, (3, 5), seed=6, dtype=torch.float16, lora_dtype=torch.float32)
    y, grads = run(function_path, case)
    y_ref, grads_ref = run(lora_projection_reference, case)
    assert y.dtype == torch.float16 and grads["lora_a"].dtype == torch.float32
    assert grads["lora_b0"].dtype == torch.float32 and grads["x"].dtype == torch.float16
    assert rel_err(y.float(), y_ref.float()) < 2e-3
    for name in ("x", "lora_a", "lora_b0", "lora_b1"):
        assert rel_err(grads[name].float(), grads_ref[name].float()) < 5e-3, name


def test_every_output_and_gradient_element_is_written(monkeypatch):
    """Buffers the backward allocates start as NaN: an element it forgets to write shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    case = make_case((120, 40, 40), (4, 0, 4), 48, (2, 9), seed=7)
    y_ref, grads_ref = run(lora_projection_reference, case)
    monkeypatch.setattr(torch, "empty", nan_empty)
    y, grads = run(function_path, case)
    assert torch.isfinite(y).all()
    for name, g in grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), name
            assert rel_err(g, grads_ref[name]) < 1e-5, name


def test_dropout_touches_only_the_lora_branch_and_matches_reference_under_one_seed(monkeypatch):
    case = make_case((40, 24), (4, 4), 32, (3, 6), seed=8)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    torch.manual_seed(11)
    y, grads = run(lora_projection, case, dropout=0.3, training=True)
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    torch.manual_seed(11)
    y_ref, grads_ref = run(lora_projection, case, dropout=0.3, training=True)
    assert rel_err(y, y_ref) < 1e-5
    for name in grads:
        if grads_ref[name] is not None:
            assert rel_err(grads[name], grads_ref[name]) < 1e-5, name
    # The base output is untouched by dropout, and dropout did change the LoRA branch.
    without_lora = dict(case, lora_bs=[None, None], lora_a=case["lora_a"][:0])
    base, _ = run(lora_projection_reference, without_lora)
    no_dropout, _ = run(lora_projection_reference, case)
    assert rel_err(y, no_dropout) > 1e-3
    torch.manual_seed(11)
    x_lora = torch.nn.functional.dropout(case["x"], 0.3, training=True)
    manual, _ = run(lora_projection_reference, case, x_lora=x_lora)
    assert rel_err(y, manual) < 1e-5 and rel_err(y - base, manual - base) < 1e-5


def test_dropout_is_off_outside_training(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    case = make_case((40,), (4,), 32, (3, 6), seed=9)
    y, _ = run(lora_projection, case, dropout=0.5, training=False)
    y_ref, _ = run(lora_projection_reference, case)
    assert rel_err(y, y_ref) < 1e-6


def test_public_function_takes_the_hand_written_path_only_when_asked(monkeypatch):
    case = make_case((40,), (4,), 32, (2, 3), seed=10)
    x = case["x"].clone().requires_grad_(True)
    args = (case["weight"], None, case["lora_a"], case["lora_bs"], case["out_sizes"], case["scales"])
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert "LoraProjectionFunction" in type(lora_projection(x, *args).grad_fn).__name__
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert "LoraProjectionFunction" not in type(lora_projection(x, *args).grad_fn).__name__


def test_mismatched_layout_is_refused():
    case = make_case((40, 20), (4, 4), 24, (2, 3), seed=12)
    with pytest.raises(KernelError, match="stacked A"):
        lora_projection(case["x"], case["weight"], None, case["lora_a"][:5], case["lora_bs"], case["out_sizes"],
                        case["scales"])  # fmt: skip
    with pytest.raises(KernelError, match="one B"):
        lora_projection(case["x"], case["weight"], None, case["lora_a"], case["lora_bs"][:1], case["out_sizes"],
                        case["scales"])  # fmt: skip
