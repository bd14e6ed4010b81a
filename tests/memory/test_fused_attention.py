"""The hand-written attention half (velotune.memory.fused_attention): its recomputation and backward
give bitwise the autograd output and gradients of `layer.attention_block` (padded, packed, sliding
windows, biases, partial rotary, grouped-query heads, a single token, no input gradient), checkpointed
training through it gives bitwise the plain model's loss and gradients under every policy, and it
steps aside wherever it would not compute what the modules compute."""

import pytest
import torch

from tests.model_zoo import loss_and_grads, random_batch, save_hf_model, velotune_lora_model
from velotune.kernels import lora as lora_kernels
from velotune.memory.fused_attention import FusedAttentionBlock, fused_attention_block
from velotune.models.decoder import cu_seqlens_from_position_ids
from velotune.models.rope_scaling import rope_cos_sin


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    paths = {}
    for family in (
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "phi3_partial",
        "mixtral",
        "llama_tied_bias",
        "llama_aligned",
    ):
        paths[family] = str(tmp_path_factory.mktemp(family))
        save_hf_model(family, paths[family])
    return paths


@pytest.fixture
def triton_everywhere(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")


def layer_inputs(model, batch, tokens, seed, padded=False, packed=False):
    """x, dy, cos, sin, key padding mask and cu_seqlens for one layer, as the model would pass them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, model.spec.hidden_size, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    positions = torch.arange(tokens).unsqueeze(0).expand(batch, -1)
    mask = cu = None
    if packed:  # documents of 3 tokens, then the rest
        positions = torch.cat([torch.arange(min(3, tokens)), torch.arange(max(tokens - 3, 0))]).unsqueeze(0)
        positions = positions.expand(batch, -1)
        cu = cu_seqlens_from_position_ids(positions)
    if padded:
        _, attention_mask, _ = random_batch(batch, tokens, seed=seed, padding="right")
        mask = attention_mask.bool()
    cos, sin = rope_cos_sin(model.spec.rope, positions, x.dtype)
    return x, dy, cos, sin, mask, cu


def autograd_half(layer, x, dy, params, cos, sin, mask, cu):
    x = x.detach().requires_grad_(True)
    y = layer.attention_block(x, cos, sin, mask, cu)
    got = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    return y.detach(), got[0], list(got[1:])


CASES = [
    ("llama", 2, 11, dict(padded=True)),
    ("llama", 1, 1, {}),
    ("llama", 3, 7, dict(packed=True)),
    ("mistral", 2, 9, {}),  # sliding window 5
    ("qwen2", 1, 13, {}),  # q/k/v biases, a sliding window on one layer
    ("gemma", 2, 6, dict(padded=True)),  # 1 + w norm
    ("phi3_partial", 2, 8, dict(packed=True)),  # half the head rotated
    ("llama_tied_bias", 1, 5, {}),  # an o-projection bias
]


@pytest.mark.parametrize("family,batch,tokens,kw", CASES)
def test_the_hand_written_attention_half_gives_bitwise_the_autograd_output_and_gradients(
    folders, triton_everywhere, family, batch, tokens, kw
):
    model = velotune_lora_model(folders[family])
    for index, layer in enumerate(model.layers):
        params = [p for p in layer.parameters() if p.requires_grad]
        x, dy, cos, sin, mask, cu = layer_inputs(model, batch, tokens, seed=tokens + index, **kw)
        block = fused_attention_block(layer, x, cos, sin, mask, cu)
        assert isinstance(block, FusedAttentionBlock)
        ref_y, ref_dx, ref_grads = autograd_half(layer, x, dy, params, cos, sin, mask, cu)
        state, y = block.recompute(x, need_output=True)
        dx, grads = block.backward(state, dy, params, need_dx=True)
        attn_lora = [p for n, p in layer.named_parameters() if ".attn." in f".{n}" and p.requires_grad]
        # q/k/v: A and a B per block (three, or one where the checkpoint fuses them: Phi-3); o: A and B.
        assert len(attn_lora) == (4 if family.startswith("phi3") else 6)
        assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)
        for got, want, p in zip(grads, ref_grads, params):
            assert (got is None) == (want is None)
            assert (got is not None) == any(p is q for q in attn_lora)
            if want is not None:
                assert got.dtype == want.dtype and torch.equal(got, want)


def test_without_an_input_gradient_only_the_lora_gradients_are_computed(folders, triton_everywhere):
    model = velotune_lora_model(folders["llama"])
    layer = model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    x, dy, cos, sin, mask, cu = layer_inputs(model, 2, 7, seed=4)
    _, _, ref_grads = autograd_half(layer, x, dy, params, cos, sin, mask, cu)
    block = fused_attention_block(layer, x, cos, sin, mask, cu)
    state, y = block.recompute(x, need_output=False)
    assert y is None  # the o projection's output is not recomputed when no one reads it
    dx, grads = block.backward(state, dy, params, need_dx=False)
    assert dx is None
    assert all(torch.equal(g, w) if w is not None else g is None for g, w in zip(grads, ref_grads))
    # Only o's factors train here (a fresh model): the attention backward is skipped.
    for p in (layer.attn.qkv.lora_A, *layer.attn.qkv.lora_B.values()):
        p.requires_grad_(False)
    params = [p for p in layer.parameters() if p.requires_grad]
    _, _, ref_grads = autograd_half(layer, x, dy, params, cos, sin, mask, cu)
    calls = []
    real = torch.autograd.grad
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        state, _ = block.recompute(x, need_output=False)
        _, grads = block.backward(state, dy, params, need_dx=False)
    assert calls == []
    assert block.trains(params) and not block.trains(params, block.qkv)
    assert all(torch.equal(g, w) if w is not None else g is None for g, w in zip(grads, ref_grads))


@pytest.mark.parametrize(
    "family,load_in_4bit,mode,policy",
    [
        ("llama", False, "offload", "full"),
        ("llama", False, "offload", "save_mlp"),
        ("llama", True, "offload", "save_mlp"),
        ("llama", True, True, "full"),
        ("mixtral", False, True, "full"),  # a routed MLP after the hand-written attention half
        ("mistral", False, "offload", "save_mlp"),
        ("llama", "whole", "offload", "full"),  # 4-bit q/k/v dequantized whole for its GEMMs
        ("llama", "whole", "offload", "save_mlp"),
        # Whole quantization blocks and r=8: every 4-bit projection folds its LoRA into the base GEMM,
        # the halves writing the norm's and the activation's outputs into the GEMMs' wider inputs.
        ("llama_aligned", True, "offload", "save_mlp"),
        ("llama_aligned", True, True, "full"),
    ],
)
def test_checkpointed_training_through_the_hand_written_attention_half_gives_bitwise_the_plain_gradients(
    folders, triton_everywhere, monkeypatch, family, load_in_4bit, mode, policy
):
    aligned = family == "llama_aligned"
    model = velotune_lora_model(folders[family], load_in_4bit=bool(load_in_4bit), r=8 if aligned else 4)
    folded = []
    real_folded = lora_kernels._folded_forward
    monkeypatch.setattr(
        lora_kernels, "_folded_forward", lambda *a: folded.append(a[7] is not None) or real_folded(*a)
    )
    if load_in_4bit == "whole":
        # The zoo's q/k/v (9,600 values) is larger than its largest block (5,760): raise the limit so
        # the 4-bit weights take the whole-weight path (velotune.quant.nf4_weight).
        from velotune.quant.nf4_weight import NF4Weight

        for weight in (m for m in model.modules() if isinstance(m, NF4Weight)):
            weight.whole_numel_limit = weight.numel()
    ids, mask, labels = random_batch(2, 11, seed=6, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    # The modules fold too, concatenating each input with its x A^T (4 projections per layer).
    assert folded == [False] * (4 * len(model.layers) if aligned else 0)
    folded.clear()
    outputs = []
    real = FusedAttentionBlock.recompute
    monkeypatch.setattr(
        FusedAttentionBlock,
        "recompute",
        lambda self, x, need_output: outputs.append(need_output) or real(self, x, need_output),
    )
    model.gradient_checkpointing, model.checkpoint_policy = mode, policy
    loss, grads = loss_and_grads(model, batch)
    # Every layer's attention half was recomputed by hand; its output only where the MLP half needs it.
    assert outputs == [policy == "full"] * len(model.layers)
    if aligned:
        # q/k/v, gate/up and down read wide inputs their producers wrote (o reads the attention output).
        assert folded.count(True) >= 3 * len(model.layers) and False in folded
    assert grads.keys() == ref_grads.keys() and ref_grads
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_the_hand_written_attention_half_steps_aside_where_it_would_not_compute_what_the_modules_do(
    folders, tmp_path, monkeypatch
):
    model = velotune_lora_model(folders["llama"])
    layer = model.layers[0]
    x, _, cos, sin, mask, cu = layer_inputs(model, 1, 3, seed=1)
    assert fused_attention_block(layer, x, cos, sin, mask, cu) is None  # CPU tensors take the reference path
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert fused_attention_block(layer, x, cos, sin, mask, cu) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_attention_block(layer, x, cos, sin, mask, cu) is None
    layer.attn_norm.weight.requires_grad_(True)
    try:
        assert fused_attention_block(layer, x, cos, sin, mask, cu) is None  # a trained norm weight
    finally:
        layer.attn_norm.weight.requires_grad_(False)
    assert fused_attention_block(layer, x, cos.requires_grad_(), sin, mask, cu) is None  # trained angles
    dropped = velotune_lora_model(folders["llama"], dropout=0.1)
    assert fused_attention_block(dropped.layers[0], x, cos.detach(), sin, mask, cu) is None  # LoRA dropout
    # A hook (on one of the half's modules, or on every module) changes what the forward computed,
    # which the kernels called directly would not see.
    for module in (layer.attn_norm, layer.attn, layer.attn.qkv, layer.attn.o_proj):
        handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
        try:
            assert fused_attention_block(layer, x, cos.detach(), sin, mask, cu) is None
        finally:
            handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, args: None)
    try:
        assert fused_attention_block(layer, x, cos.detach(), sin, mask, cu) is None
    finally:
        handle.remove()
    assert fused_attention_block(layer, x, cos.detach(), sin, mask, cu) is not None

    class OwnAttention(type(layer.attn)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    real_class = type(layer.attn)
    layer.attn.__class__ = OwnAttention
    try:
        assert fused_attention_block(layer, x, cos.detach(), sin, mask, cu) is None  # an overridden forward
    finally:
        layer.attn.__class__ = real_class
    for family in ("qwen3", "gemma2"):  # q/k norms; sandwich norms
        save_hf_model(family, str(tmp_path / family))
        other = velotune_lora_model(str(tmp_path / family))
        assert fused_attention_block(other.layers[0], x, cos.detach(), sin, mask, cu) is None


def test_in_bf16_with_float32_factors_the_one_go_casts_give_bitwise_the_module_path(
    folders, triton_everywhere, monkeypatch
):
    # A bf16 model keeps float32 LoRA factors (as PEFT does): both fused halves cast a layer's factors
    # in one multi-tensor copy per pass (velotune.kernels.lora.cast_factors) instead of one cast each.
    import velotune

    base, _ = velotune.FastLanguageModel.from_pretrained(folders["llama"], dtype=torch.bfloat16, device_map="cpu",
                                                         progress=False)  # fmt: skip
    model = velotune.FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, target_modules="all-linear",
                                                      use_gradient_checkpointing=False).train()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
    ids, mask, labels = random_batch(2, 9, seed=8, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or real(dst, src))
    for policy in ("full", "save_mlp"):
        copies.clear()
        model.gradient_checkpointing, model.checkpoint_policy = "offload", policy
        loss, grads = loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
        # One copy per half and pass: q/k/v's A and three Bs with o's A and B (6), gate/up's A and two
        # Bs with down's A and B (5); in the backward, one more per half for their gradients back to
        # float32 (the MLP half runs first under "save_mlp").
        backward = [6, 5, 5, 6] if policy == "full" else [5, 5, 6, 6]
        assert copies == [6, 5] * len(model.layers) + backward * len(model.layers)
