"""LoRA training in velotune computes what Transformers + PEFT compute: for every family, the same
base and the same non-zero LoRA weights give the same loss and the same gradient of every LoRA
weight; and the same through the hand-written kernels."""

import pytest

from tests.lora.helpers import assert_loss_and_lora_gradients_match, velotune_and_peft
from tests.model_zoo import FAMILY_CONFIGS


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_matches_peft_loss_and_lora_gradients(family, tmp_path):
    ours, theirs, _ = velotune_and_peft(family, tmp_path)
    assert_loss_and_lora_gradients_match(ours, theirs)


@pytest.mark.parametrize(
    "family, targets, use_rslora",
    [
        ("llama", "all-linear", True),
        ("mixtral", ["q_proj", "v_proj", "w1", "w2", "w3", "gate"], True),
        ("mixtral", ["k_proj", "w2"], False),
        ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
        ("llama_tied_bias", ["q_proj", "v_proj", "up_proj"], False),
        ("phi3", ["qkv_proj", "down_proj"], True),
    ],
)
def test_target_subsets_and_rslora_match_peft(family, targets, use_rslora, tmp_path):
    ours, theirs, _ = velotune_and_peft(
        family, tmp_path, r=3, lora_alpha=7, targets=targets, use_rslora=use_rslora
    )
    assert_loss_and_lora_gradients_match(ours, theirs)


@pytest.mark.parametrize(
    "bias, targets",
    [
        ("all", ["v_proj", "o_proj", "gate_proj", "down_proj"]),
        ("lora_only", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ],
)
def test_trained_biases_match_peft(bias, targets, tmp_path):
    ours, theirs, _ = velotune_and_peft("llama_tied_bias", tmp_path, targets=targets, bias=bias)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad and n.endswith(".bias")}
    expected = {"attn.qkv.bias", "attn.o_proj.bias"} | (
        {"mlp.gate_up.bias", "mlp.down_proj.bias"} if bias == "all" else set()
    )
    assert trained == {f"layers.{i}.{name}" for i in range(2) for name in expected}
    assert_loss_and_lora_gradients_match(ours, theirs)


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_hand_written_kernels_match_peft_loss_and_lora_gradients(family, tmp_path, monkeypatch):
    """The Triton path everywhere (interpreted on CPU): the fused LoRA Function, with the other kernels."""
    ours, theirs, _ = velotune_and_peft(family, tmp_path)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    # Few tokens: the interpreter's cost grows with them, and every path is still taken.
    assert_loss_and_lora_gradients_match(ours, theirs, batch=2, seq=5)
