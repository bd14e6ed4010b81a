"""The fused MLP half (velotune.memory.fused_mlp): its tile loop and hand-written backward give the
autograd gradients of `layer.mlp_block` (bitwise in one tile, to 1e-6 over several, odd token counts
and a single token included), a checkpointed LoRA model trained through it gives the plain model's
loss and gradients, and it steps aside wherever it would not compute what the modules compute."""

import pytest
import torch

import velotune
from tests.model_zoo import loss_and_grads, random_batch, rel_err, save_hf_model, velotune_lora_model
from velotune.errors import KernelError
from velotune.kernels import lora as lora_kernels
from velotune.memory import fused_mlp as fused_module
from velotune.memory.fused_mlp import FusedMLPBlock, fused_mlp_block
from velotune.memory.tiled import fused_tile_tokens, token_tiles, tokenwise_backward, tokenwise_forward


def lora_model(folder, dropout=0.0, load_in_4bit=False):
    return velotune_lora_model(folder, dropout=dropout, load_in_4bit=load_in_4bit)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    save_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return lora_model(folder)


@pytest.fixture
def triton_everywhere(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")


def autograd_block(layer, x, dy, params):
    x = x.detach().requires_grad_(True)
    y = layer.mlp_block(x)
    got = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    return y.detach(), got[0], list(got[1:])


@pytest.mark.parametrize("tokens,tile", [(23, None), (23, 5), (23, 4), (1, None), (1, 3), (9, 8)])
def test_the_fused_mlp_gives_the_autograd_output_and_gradients_of_the_mlp_block(
    model, triton_everywhere, tokens, tile
):
    layer = model.layers[1]
    params = [p for p in layer.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, layer.spec.hidden_size, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    block = fused_mlp_block(layer, x)
    assert isinstance(block, FusedMLPBlock)
    ref_y, ref_dx, ref_grads = autograd_block(layer, x, dy, params)
    with torch.no_grad():
        y = tokenwise_forward(block, x, tile)
    dx, grads = tokenwise_backward(block, x, dy, params, tile, need_dx=True)
    mlp_lora = [p for n, p in layer.named_parameters() if ".mlp." in f".{n}" and p.requires_grad]
    assert len(mlp_lora) == 5  # gate/up: A and two Bs; down: A and B
    assert y.shape == x.shape and dx.shape == x.shape
    whole = len(token_tiles(tokens, tile)) == 1
    pairs = [(y, ref_y), (dx, ref_dx)] + list(zip(grads, ref_grads))
    for (got, want), p in zip(pairs[2:], params):
        assert (got is None) == (want is None)
        assert (got is not None) == any(p is q for q in mlp_lora)
    for got, want in pairs:
        if want is None:
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        if whole:
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) < 1e-6


def test_the_fused_mlp_without_an_input_gradient_still_gives_the_lora_gradients(model, triton_everywhere):
    layer = model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 7, layer.spec.hidden_size, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    _, _, ref_grads = autograd_block(layer, x, dy, params)
    dx, grads = tokenwise_backward(fused_mlp_block(layer, x), x, dy, params, 3, need_dx=False)
    assert dx is None
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got, want) < 1e-6


def test_the_fused_forward_writes_every_token(model, triton_everywhere):
    # The output buffer is allocated empty: a tile left unwritten would show as garbage, so compare
    # against the module over odd tile splits.
    layer = model.layers[0]
    x = torch.randn(3, 7, layer.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer.mlp_block(x)
        for tile in (None, 1, 2, 5, 20):
            got = tokenwise_forward(fused_mlp_block(layer, x), x, tile)
            assert rel_err(got, want) < 1e-6, tile


def assert_same_training(loss, grads, ref_loss, ref_grads):
    """The same parameters got gradients, and loss and every gradient agree with the reference to 1e-6."""
    assert grads.keys() == ref_grads.keys() and ref_grads
    assert rel_err(loss, ref_loss) < 1e-6
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-6, name


@pytest.mark.parametrize(
    "mode,policy,tile",
    [("offload", "full", None), (True, "save_attn", None), ("offload", "full", 5), (True, "full", 4)],
)
def test_checkpointed_lora_training_through_the_fused_mlp_gives_the_plain_loss_and_gradients(
    model, triton_everywhere, monkeypatch, mode, policy, tile
):
    ids, mask, labels = random_batch(2, 11, seed=3, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    model.gradient_checkpointing, model.mlp_tile_tokens = False, None
    ref_loss, ref_grads = loss_and_grads(model, batch)
    calls = []
    real = FusedMLPBlock.tiled_backward
    monkeypatch.setattr(
        FusedMLPBlock, "tiled_backward", lambda self, *a: calls.append(a[3]) or real(self, *a)
    )
    model.gradient_checkpointing, model.checkpoint_policy, model.mlp_tile_tokens = mode, policy, tile
    try:
        loss, grads = loss_and_grads(model, batch)
    finally:
        model.gradient_checkpointing, model.checkpoint_policy, model.mlp_tile_tokens = False, "full", None
    # Every layer's MLP went through the fused backward, with the automatic tile when none is set.
    assert calls == [tile or fused_tile_tokens(model.spec.hidden_size, model.spec.intermediate_size)] * len(
        model.layers
    )
    if tile is None:  # 22 tokens: one tile, the same ops as autograd's in the same order
        assert grads.keys() == ref_grads.keys() and ref_grads
        assert torch.equal(loss, ref_loss)
        for name in ref_grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    else:
        assert_same_training(loss, grads, ref_loss, ref_grads)


def test_the_fused_mlp_steps_aside_where_it_would_not_compute_what_the_modules_do(folder, model, monkeypatch):
    layer = model.layers[0]
    x = torch.randn(1, 3, layer.spec.hidden_size)
    assert fused_mlp_block(layer, x) is None  # CPU tensors take the reference path
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert fused_mlp_block(layer, x) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_mlp_block(layer, x) is None
    layer.mlp_norm.weight.requires_grad_(True)
    try:
        assert fused_mlp_block(layer, x) is None  # a trained norm weight needs its gradient
    finally:
        layer.mlp_norm.weight.requires_grad_(False)
    for module in (layer.mlp_norm, layer.mlp, layer.mlp.gate_up, layer.mlp.down_proj):
        handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
        try:
            assert fused_mlp_block(layer, x) is None  # a hook the kernels called directly would skip
        finally:
            handle.remove()
    assert fused_mlp_block(layer, x) is not None
    dropped = lora_model(folder, dropout=0.1)
    assert fused_mlp_block(dropped.layers[0], x) is None  # LoRA dropout in training
    assert fused_mlp_block(dropped.eval().layers[0], x) is not None  # ... but not in evaluation
    full, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                         full_finetuning=True, progress=False)  # fmt: skip
    assert fused_mlp_block(full.layers[0], x) is None  # trained base weights


def test_the_automatic_fused_tile_holds_an_8b_2048_token_tile_of_work():
    assert fused_tile_tokens(4096, 14336) == 2048  # Llama-3.1-8B
    assert fused_tile_tokens(8192, 28672) == 2048  # Llama-3.1-70B: never under 2,048 tokens
    assert fused_tile_tokens(2048, 8192) == 7168  # Llama-3.2-1B: a quarter of the work per token
    assert fused_tile_tokens(64, 128) == 8192
    assert fused_module.token_tiles(4096, fused_tile_tokens(4096, 14336)) == [(0, 2048), (2048, 4096)]


@pytest.mark.parametrize("tile", [None, 5])
def test_checkpointed_qlora_training_through_the_fused_mlp_gives_the_plain_loss_and_gradients(
    folder, triton_everywhere, monkeypatch, tile
):
    # 4-bit base weights (NF4Weight) take the fused path too, dequantized inside each tile's GEMMs.
    model = lora_model(folder, load_in_4bit=True)
    ids, mask, labels = random_batch(2, 11, seed=4, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    calls = []
    real = FusedMLPBlock.tiled_backward
    monkeypatch.setattr(
        FusedMLPBlock, "tiled_backward", lambda self, *a: calls.append(self.dense) or real(self, *a)
    )
    model.gradient_checkpointing, model.mlp_tile_tokens = "offload", tile
    loss, grads = loss_and_grads(model, batch)
    assert calls == [False] * len(model.layers)  # every layer's MLP ran fused, on 4-bit weights
    assert_same_training(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("load_in_4bit,tile", [(False, None), (False, 5), (True, None), (True, 4)])
def test_save_mlp_keeps_the_gate_up_output_of_the_chosen_layers_and_gives_the_plain_gradients(
    folder, triton_everywhere, monkeypatch, load_in_4bit, tile
):
    model = lora_model(folder, load_in_4bit=load_in_4bit)
    ids, mask, labels = random_batch(2, 11, seed=5, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    kept_tiles = []
    real = FusedMLPBlock.tiled_backward

    def spy(self, x, dy, params, tile_tokens, need_dx, kept_gate_up=None):
        kept_tiles.append(None if kept_gate_up is None else len(kept_gate_up))
        result = real(self, x, dy, params, tile_tokens, need_dx, kept_gate_up)
        assert kept_gate_up is None or all(t is None for t in kept_gate_up)  # released as used
        return result

    monkeypatch.setattr(FusedMLPBlock, "tiled_backward", spy)
    n_tiles = len(token_tiles(22, tile or 8192))
    for kept in (None, len(model.layers)):
        kept_tiles.clear()
        model.gradient_checkpointing, model.checkpoint_policy = "offload", "save_mlp"
        model.gate_up_kept_layers, model.mlp_tile_tokens = kept, tile
        loss, grads = loss_and_grads(model, batch)
        # The backward walks down from the top layer, which keeps first.
        chosen = kept if kept is not None else round(len(model.layers) / 2)
        want = [n_tiles if i % 2 == 0 or kept is not None else None for i in range(len(model.layers))]
        assert kept_tiles == want and sum(k is not None for k in kept_tiles) == chosen
        assert_same_training(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("policy,kept,tile", [("full", None, None), ("save_mlp", None, None), ("save_mlp", 2, 11)])
def test_4bit_projections_fold_their_lora_into_the_base_gemm_on_the_fused_mlp_path(
    tmp_path_factory, triton_everywhere, monkeypatch, policy, kept, tile
):
    # Whole quantization blocks and r=8: gate/up and down fold their LoRA into the base GEMM, reading the
    # norm's and the activation's outputs from the GEMMs' wider inputs; the modules (the reference here)
    # fold too, from a concatenated copy. Same ops, so the same loss and gradients.
    path = str(tmp_path_factory.mktemp("llama_aligned"))
    save_hf_model("llama_aligned", path)
    model = velotune_lora_model(path, load_in_4bit=True, r=8, lora_alpha=12)  # scale 1.5
    ids, mask, labels = random_batch(2, 11, seed=8, padding="right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    wide = []
    real = lora_kernels._folded_forward
    monkeypatch.setattr(lora_kernels, "_folded_forward", lambda *a: wide.append(a[7] is not None) or real(*a))
    model.gradient_checkpointing, model.checkpoint_policy = "offload", policy
    model.gate_up_kept_layers, model.mlp_tile_tokens = kept, tile
    loss, grads = loss_and_grads(model, batch)
    tiles = len(token_tiles(22, tile or 8192))
    # Per layer and tile, the forward's gate/up and down read wide inputs (and q/k/v, per layer).
    assert wide.count(True) >= len(model.layers) * (2 * tiles + 1)
    assert_same_training(loss, grads, ref_loss, ref_grads)


def test_kept_gate_up_tiles_must_match_the_backward_tiles(model, triton_everywhere):
    layer = model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(1, 9, layer.spec.hidden_size)
    block = fused_mlp_block(layer, x)
    with torch.no_grad():
        _, kept = block.forward_keeping(x, 4, lambda t: t.clone())
    assert len(kept) == 3
    with pytest.raises(KernelError, match="tile size changed"):
        block.tiled_backward(x, torch.randn(x.shape), params, 5, True, kept_gate_up=kept)
