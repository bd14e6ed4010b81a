"""Mixtral: Mistral attention with a sparse mixture of experts (top-2 routing) in place of the MLP."""

from velotune.models.families.common import Family, TensorSlot, base_spec, llama_style_slots, require, sliding_windows_of
from velotune.models.spec import MoESpec


def build_spec(cfg: dict):
    return base_spec(
        cfg,
        default_tie=False,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        sliding_windows=sliding_windows_of(cfg, cfg.get("sliding_window")),
        moe=MoESpec(num_experts=require(cfg, "num_local_experts"), top_k=cfg.get("num_experts_per_tok", 2)),
    )


def slots(spec):
    out = llama_style_slots(spec)
    inter = spec.intermediate_size
    for i in range(spec.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}.mlp."
        # The published layout: one tensor per expert and projection (w1 gate, w3 up, w2 down).
        out[f"{hf}block_sparse_moe.gate.weight"] = TensorSlot(me + "router")
        for e in range(spec.moe.num_experts):
            p = f"{hf}block_sparse_moe.experts.{e}."
            out[p + "w1.weight"] = TensorSlot(me + "gate_up", (e, slice(0, inter)))
            out[p + "w3.weight"] = TensorSlot(me + "gate_up", (e, slice(inter, 2 * inter)))
            out[p + "w2.weight"] = TensorSlot(me + "down", (e,))
        # Transformers 5's in-memory layout (3-D expert tensors), should a folder be saved that way.
        out[f"{hf}mlp.gate.weight"] = TensorSlot(me + "router")
        out[f"{hf}mlp.experts.gate_up_proj"] = TensorSlot(me + "gate_up")
        out[f"{hf}mlp.experts.down_proj"] = TensorSlot(me + "down")
    return out


FAMILY = Family("mixtral", build_spec, slots, "Mixtral 8x7B, 8x22B (sparse MoE, top-2)")
