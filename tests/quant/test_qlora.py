"""QLoRA end to end on the CPU: 4-bit loading (quantized while streaming, or pre-quantized by
Transformers + bitsandbytes), and training that computes what Transformers + PEFT compute on the same
dequantized weights; the only difference QLoRA makes is the quantization itself."""

import os

import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import velotune
from tests.lora.helpers import assert_loss_and_lora_gradients_match, randomize_lora_b
from tests.model_zoo import rel_err, save_hf_model
from tests.quant.helpers import dequantized_twin, save_transformers_4bit
from velotune.errors import UnsupportedModelError
from velotune.io.load import spec_from_folder
from velotune.kernels import lora as lora_kernels
from velotune.lora.peft_format import ADAPTER_WEIGHTS
from velotune.models.families import family_of
from velotune.quant import nf4
from velotune.quant.bnb_format import nf4_to_bnb
from velotune.quant.nf4_weight import NF4Weight


def _load(folder, **kwargs):
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", progress=False, **kwargs
    )
    return model


def _nf4_weights(model) -> dict[str, NF4Weight]:
    return {
        f"{path}.weight": m.weight
        for path, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), NF4Weight)
    }


def _dequantized_checkpoint(model, folder) -> dict[str, torch.Tensor]:
    """Every 4-bit weight of `model`, dequantized, under the checkpoint names it was loaded from."""
    cfg, spec = spec_from_folder(str(folder))
    weights = {name: w.dequantize() for name, w in _nf4_weights(model).items()}
    out = {}
    for hf_name, slot in family_of(cfg["model_type"]).tensor_slots(spec).items():
        if slot.internal in weights:
            dense = weights[slot.internal]
            out[hf_name] = dense[slot.index] if slot.index else dense
    return out


def _qlora_pair(family, folder, targets="all-linear", r=4, lora_alpha=8):
    """(velotune QLoRA model, PEFT model on the dequantized weights), same non-zero LoRA weights."""
    hf = save_hf_model(family, str(folder))
    ours = _load(folder, load_in_4bit=True)
    dense = _dequantized_checkpoint(ours, folder)
    assert dense and not hf.load_state_dict(dense, strict=False).unexpected_keys
    ours = velotune.FastLanguageModel.get_peft_model(
        ours,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        use_gradient_checkpointing=False,
        random_state=0,
    )
    randomize_lora_b(ours, 0)
    adapter = os.path.join(folder, "adapter")
    ours.save_pretrained(adapter)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets))
    result = peft.set_peft_model_state_dict(theirs, load_file(os.path.join(adapter, ADAPTER_WEIGHTS)))
    assert not result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma2", "mixtral"])
def test_qlora_loss_and_lora_gradients_match_peft_on_the_dequantized_weights(family, tmp_path):
    ours, theirs = _qlora_pair(family, tmp_path)
    assert_loss_and_lora_gradients_match(ours, theirs)


def test_projections_without_lora_pass_gradients_through_their_4bit_weights(tmp_path):
    ours, theirs = _qlora_pair("llama", tmp_path, targets=["v_proj", "up_proj"], r=3, lora_alpha=5)
    assert_loss_and_lora_gradients_match(ours, theirs)


def test_qlora_through_the_triton_kernels_matches_peft(tmp_path, monkeypatch):
    """NF4 dequantized by the Triton kernel (interpreted) into the scratch buffer, inside the LoRA Function."""
    ours, theirs = _qlora_pair("llama", tmp_path)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert_loss_and_lora_gradients_match(ours, theirs, batch=2, seq=5)


@pytest.mark.parametrize("lora_alpha", [16, 12])
def test_qlora_with_the_lora_folded_into_the_4bit_gemms_matches_peft(tmp_path, monkeypatch, lora_alpha):
    """Whole quantization blocks and r=8: every projection computes x W^T + s (x A^T) B^T as one GEMM
    over [x | x A^T] and [W | s B] (velotune.kernels.lora.fold_width); scales 2 and 1.5."""
    ours, theirs = _qlora_pair("llama_aligned", tmp_path, r=8, lora_alpha=lora_alpha)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    folded = []
    real = lora_kernels._folded_forward
    monkeypatch.setattr(lora_kernels, "_folded_forward", lambda *a: folded.append(1) or real(*a))
    assert_loss_and_lora_gradients_match(ours, theirs, batch=2, seq=5)
    assert len(folded) == 4 * len(ours.layers)  # q/k/v, o, gate/up, down of every layer


def test_loading_quantizes_each_checkpoint_tensor_on_its_own_as_bitsandbytes_does(tmp_path, monkeypatch):
    hf = save_hf_model("llama", str(tmp_path))
    seen = []
    quantize = nf4.quantize_nf4
    monkeypatch.setattr("velotune.io.load.quantize_nf4", lambda w: seen.append(tuple(w.shape)) or quantize(w))
    model = _load(tmp_path, load_in_4bit=True)
    projections = {n: p for n, p in hf.state_dict().items() if n.endswith("proj.weight")}
    assert sorted(seen) == sorted(tuple(p.shape) for p in projections.values())  # q, k, v one by one
    qkv = model.layers[0].attn.qkv.weight
    assert [(r0, q.shape[0]) for r0, q in qkv.parts()] == [(0, 120), (120, 40), (160, 40)]
    q_part = qkv.parts()[0][1]
    packed, state = bnbf.quantize_4bit(projections["model.layers.0.self_attn.q_proj.weight"], blocksize=64,
                                       compress_statistics=True, quant_type="nf4")  # fmt: skip
    assert torch.equal(q_part.data, packed.view(-1)) and torch.equal(
        q_part.nested_absmax, state.state2.absmax
    )
    assert model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert not any(isinstance(p, NF4Weight) for p in model.parameters())


@pytest.mark.parametrize("double_quant", [True, False])
def test_prequantized_folder_loads_byte_for_byte_with_the_logits_of_its_model(double_quant, tmp_path):
    folder, model_4bit = save_transformers_4bit(tmp_path, double_quant=double_quant)
    twin = dequantized_twin(model_4bit)
    ours = _load(folder, load_in_4bit=True)
    dense = _load(folder)  # no load_in_4bit: dequantized into 16-bit (here 32-bit) weights
    assert not _nf4_weights(dense) and len(_nf4_weights(ours)) == 8
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name, weight in _nf4_weights(ours).items():
            for row0, q in weight.parts():
                key = _checkpoint_name(name, row0)
                for k, tensor in nf4_to_bnb(key, q).items():
                    assert torch.equal(tensor, f.get_tensor(k)), k
    ids = torch.randint(3, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = twin(ids).logits
        for model in (ours, dense):
            assert rel_err(model(input_ids=ids).logits, expected) < 1e-5


def _checkpoint_name(internal: str, row0: int) -> str:
    layer = internal.split(".")[1]
    prefix = f"model.layers.{layer}."
    if ".attn.qkv." in internal:
        return prefix + "self_attn." + {0: "q_proj", 192: "k_proj", 288: "v_proj"}[row0] + ".weight"
    if ".mlp.gate_up." in internal:
        return prefix + "mlp." + {0: "gate_proj", 128: "up_proj"}[row0] + ".weight"
    return (
        prefix
        + {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}[internal.split(".")[-2]]
        + ".weight"
    )


def test_quantized_loading_requests_that_cannot_be_honoured_fail_clearly(tmp_path):
    save_hf_model("llama", str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="load_in_8bit is not supported yet"):
        _load(tmp_path, load_in_8bit=True)
    with pytest.raises(UnsupportedModelError, match="full_finetuning=True .* 16-bit"):
        _load(tmp_path, load_in_4bit=True, full_finetuning=True)
