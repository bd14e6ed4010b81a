"""The fused LoRA projection's hand-written backward gives the reference path's outputs and gradients."""

import pytest
import torch

import velotune.kernels.lora as lora_kernel
from tests.model_zoo import random_batch, rel_err, save_hf_model, velotune_lora_model
from velotune.errors import KernelError
from velotune.kernels.lora import (
    LoraLayout,
    LoraProjectionFunction,
    lora_layout,
    lora_project,
    lora_projection,
    lora_projection_reference,
)
from velotune.lora import LoraProjection


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
    layout = lora_layout(x.shape[-1], out_sizes, scales, [0 if t is None else t.shape[1] for t in bs])
    return LoraProjectionFunction.apply(x, x_lora, w, b, a, layout, *[t for t in bs if t is not None])


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


# The per-call path of modules that own their LoRA weights: the layout is prepared once (`lora_layout`),
# each call passes only the B of the blocks that carry LoRA (`lora_project`).


def prepared_path(x, w, b, a, bs, out_sizes, scales, **kw):
    layout = lora_layout(x.shape[-1], out_sizes, scales, [0 if t is None else t.shape[1] for t in bs])
    return lora_project(x, w, b, a, [t for t in bs if t is not None], layout, **kw)


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize(
    "out_sizes, ranks, lead",
    [((120, 40, 40), (4, 0, 3), (2, 7)), ((72, 72), (8, 8), (37,)), ((48,), (16,), (1, 1))],
)
def test_prepared_layout_gives_bitwise_the_outputs_and_gradients_of_the_public_function(
    mode, out_sizes, ranks, lead, monkeypatch
):
    monkeypatch.setenv("VELOTUNE_KERNELS", mode)
    case = make_case(out_sizes, ranks, 48, lead, seed=20)
    for train_weight in (False, True):
        y, grads = run(prepared_path, case, train_weight)
        y_ref, grads_ref = run(lora_projection, case, train_weight)
        assert torch.equal(y, y_ref) and grads.keys() == grads_ref.keys()
        for name, g in grads.items():
            assert (g is None) == (grads_ref[name] is None), name
            assert g is None or torch.equal(g, grads_ref[name]), name
    # And the reference path agrees with the hand-written one to float32 rounding.
    y_fn, grads_fn = run(function_path, case, True)
    assert rel_err(y, y_fn) < 1e-5
    for name, g in grads.items():
        assert g is None or rel_err(g, grads_fn[name]) < 1e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize(
    "dtype, lora_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)]
)
def test_a_forward_without_grad_skips_the_autograd_function_and_gives_bitwise_its_output(
    dropout, dtype, lora_dtype, monkeypatch
):
    """As the first forward of a checkpointed layer: the same numbers as the recorded forward, no graph."""
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    case = make_case((120, 40, 40), (4, 0, 4), 48, (2, 9), seed=21, dtype=dtype, lora_dtype=lora_dtype)
    applied = []
    real_apply = LoraProjectionFunction.apply
    monkeypatch.setattr(LoraProjectionFunction, "apply", lambda *a: applied.append(1) or real_apply(*a))
    args = dict(dropout=dropout, training=True)
    torch.manual_seed(5)
    y_graph, _ = run(prepared_path, case, **args)
    assert len(applied) == 1
    x = case["x"].clone().requires_grad_(True)
    a = case["lora_a"].clone().requires_grad_(True)
    bs = [None if t is None else t.clone().requires_grad_(True) for t in case["lora_bs"]]
    torch.manual_seed(5)
    with torch.no_grad():
        y_free = prepared_path(
            x, case["weight"], case["bias"], a, bs, case["out_sizes"], case["scales"], **args
        )
    assert len(applied) == 1, "the no-grad forward must not build an autograd Function"
    assert y_free.grad_fn is None and not y_free.requires_grad
    assert y_free.shape == y_graph.shape and y_free.dtype == y_graph.dtype
    assert torch.equal(y_free, y_graph)


def test_layouts_are_worked_out_once_and_refuse_mismatched_blocks():
    layout = lora_layout(48, [120, 40, 40], [2, 0.0, 0.5], [4, 0, 3])
    assert lora_layout(48, (120, 40, 40), (2.0, 0.0, 0.5), (4, 0, 3)) is layout  # shared, not rebuilt
    assert layout.blocks == ((0, 2.0), (2, 0.5)) and layout.lora_ranks == (4, 3)
    assert layout.out_features == 200 and layout.in_features == 48
    with pytest.raises(KernelError, match="one output size, one scale and one rank"):
        LoraLayout(48, (120, 40), (1.0, 1.0), (4,))
    with pytest.raises(KernelError, match="one output size, one scale and one rank"):
        lora_layout(48, (120,), (1.0,), (-1,))


def test_the_prepared_path_refuses_an_input_of_the_wrong_width_or_a_missing_b(monkeypatch):
    case = make_case((40, 20), (4, 4), 24, (2, 3), seed=22)
    layout = lora_layout(24, case["out_sizes"], case["scales"], (4, 4))
    for mode in ("triton", "reference"):
        monkeypatch.setenv("VELOTUNE_KERNELS", mode)
        with pytest.raises(KernelError, match="input width 23"):
            lora_project(case["x"][..., :23], case["weight"], None, case["lora_a"], case["lora_bs"], layout)
        with pytest.raises(KernelError, match="2 blocks with LoRA"):
            lora_project(case["x"], case["weight"], None, case["lora_a"], case["lora_bs"][:1], layout)


# The no-grad forward is what a checkpointed layer runs first; its recomputation in the backward runs
# the autograd Function. Both must give the loss and gradients of the plain forward, dropout included.


@pytest.fixture(scope="module")
def lora_llama(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama"))
    save_hf_model("llama", folder)
    return velotune_lora_model(folder, dropout=0.2)


def checkpointed_loss_and_grads(model, mode, policy, batch, monkeypatch):
    """Loss, gradients, and how many projection forwards ran: (all of them, those through the Function)."""
    model.gradient_checkpointing, model.checkpoint_policy = mode, policy
    calls = {"forward": 0, "function": 0}
    real_forward, real_apply = lora_kernel._fused_forward, LoraProjectionFunction.apply

    def forward_spy(*args):
        calls["forward"] += 1
        return real_forward(*args)

    def apply_spy(*args):
        calls["function"] += 1
        return real_apply(*args)

    with monkeypatch.context() as spies:
        spies.setattr(lora_kernel, "_fused_forward", forward_spy)
        spies.setattr(LoraProjectionFunction, "apply", apply_spy)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the dropout masks
        loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


@pytest.mark.parametrize(
    "kernels, mode, policy",
    [
        ("lora", True, "full"),
        ("lora", "offload", "full"),
        ("lora", True, "save_attn"),
        ("lora", "offload", "save_attn"),
        ("triton", "offload", "full"),
    ],
)
def test_checkpointed_lora_training_on_the_fused_path_gives_bitwise_the_plain_loss_and_gradients(
    lora_llama, kernels, mode, policy, monkeypatch
):
    """kernels="lora": the LoRA projections take the autograd Function (CUDA's path), the other ops their
    reference; "triton": every op takes its Triton path (interpreted)."""
    if kernels == "lora":
        monkeypatch.setattr(lora_kernel, "use_triton", lambda *tensors: True)
    else:
        monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    ids, mask, labels = random_batch(2, 5, seed=3, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads, ref_calls = checkpointed_loss_and_grads(
        lora_llama, False, "full", batch, monkeypatch
    )
    loss, grads, calls = checkpointed_loss_and_grads(lora_llama, mode, policy, batch, monkeypatch)
    projections = sum(isinstance(m, LoraProjection) for m in lora_llama.modules())
    mlp = sum(isinstance(m, LoraProjection) and ".mlp." in n for n, m in lora_llama.named_modules())
    assert ref_calls == {"forward": projections, "function": projections}  # every projection recorded once
    # Checkpointed: the recomputed part first runs without a graph (no Function), then again with one.
    recomputed = projections if policy == "full" else mlp
    assert calls == {"forward": projections + recomputed, "function": projections}
    trained = {n for n, p in lora_llama.named_parameters() if p.requires_grad}
    assert ref_grads.keys() == grads.keys() == trained and all("lora_" in n for n in trained)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        assert torch.equal(grads[name], ref_grads[name]), name


def test_factors_cast_in_one_go_equal_their_own_casts_and_keep_none_and_matching_dtypes():
    from velotune.kernels.lora import cast_factors, with_cast_factors

    gen = torch.Generator().manual_seed(11)
    a, b1, b2 = torch.randn(6, 9, generator=gen), torch.randn(5, 2, generator=gen), torch.randn(4, 4, generator=gen)
    half = torch.randn(3, 3, generator=gen).bfloat16()
    got = cast_factors([a, None, b1, half, b2], [torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16,
                                                 torch.float32])  # fmt: skip
    assert torch.equal(got[0], a.bfloat16()) and got[0].dtype == torch.bfloat16
    assert got[1] is None and got[3] is half and got[4] is b2  # nothing to cast: the same tensor
    assert torch.equal(got[2], b1.half())
    parts = [(None, None, a, (b1,), "layout-q", 0.0), (None, None, None, (), "layout-o", 0.0)]
    cast = with_cast_factors(parts, [torch.bfloat16, torch.bfloat16])
    assert cast[0][2].dtype == cast[0][3][0].dtype == torch.bfloat16 and cast[0][4:] == ("layout-q", 0.0)
    assert cast[1] == (None, None, None, (), "layout-o", 0.0)
