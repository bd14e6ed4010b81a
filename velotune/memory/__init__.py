"""Memory for long context: layer checkpointing (on the GPU or offloaded to pinned host memory),
selective recomputation, sequence-tiled MLP, and the memory planner (`estimate_memory`)."""

from velotune.memory.checkpoint import checkpoint_mode, recompute, run_layers, sequence_tiled
from velotune.memory.offload import ActivationStore
from velotune.memory.planner import MemoryEstimate, estimate_memory, longest_sequence

__all__ = [
    "ActivationStore",
    "MemoryEstimate",
    "checkpoint_mode",
    "estimate_memory",
    "longest_sequence",
    "recompute",
    "run_layers",
    "sequence_tiled",
]
