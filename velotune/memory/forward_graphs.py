"""CUDA graphs of checkpointed layers' first forward (opt-in: `model.forward_graphs = True`).

Why: at Llama-3.1-8B QLoRA 2 x 2048 on the H100 machine the host needs ~4.5 ms to enqueue one
layer's forward (about 45 kernel launches and the Python around them) against ~2.7 ms of GPU work,
so the forward runs at the host's pace (benchmarks/NOTES.md, session 7). A checkpointed layer's
first forward runs without grad, with the same shapes every step, through the hand-written halves'
kernels only: captured once, it is one graph launch per layer.

What is captured, per layer: the hand-written attention half, then the hand-written MLP half, from a
static input buffer into a static output buffer; both buffers, the rotary tables (copied in once per
step) and the graphs' memory pool are shared by every layer, and the graphs replay in the order they
were captured. What stays outside: the copy of each layer's input to its checkpoint (on the offload
stream, as without graphs), and a clone of the static output (a tensor of its own for autograd and
the next layer).

When: the "full" policy, CUDA, both halves hand-written, no key padding mask and no packed
sequences (their contents would change under a captured graph), layers not sharded. A step at a new
(shape, dtype) runs eagerly (Triton compiles, the 4-bit scratch buffer reaches its size), and so does
any step after which an address the graphs depend on changed: a parameter or buffer of the model that
is no longer the tensor captured (a new adapter, a move), or a reallocated 4-bit scratch buffer. The
next step captures each layer as it comes; the ones after replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from velotune.quant import nf4_weight

# Shapes (batch x sequence) kept at once; a new one beyond this drops the oldest set.
MAX_SHAPES = 2


def _fingerprint(model) -> tuple:
    """The addresses every captured graph depends on besides its static buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return (tuple(t.data_ptr() for t in tensors), nf4_weight.scratch_generation())


class LayerGraphs:
    """One shape's graphs: the static buffers, the pool, and a graph per layer index."""

    def __init__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fingerprint: tuple):
        self.static_in = torch.empty_like(x)
        self.static_out = torch.empty_like(x)
        self.cos, self.sin = torch.empty_like(cos), torch.empty_like(sin)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.fingerprint = fingerprint

    def begin_step(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def run(self, index: int, build: Callable, x: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s forward of x through its graph (captured now if it has none yet).
        build(cos, sin) returns the layer's forward function reading the static rotary tables."""
        self.static_in.copy_(x)
        graph = self.graphs.get(index)
        if graph is None:
            forward = build(self.cos, self.sin)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.static_out.copy_(forward(self.static_in))
            self.graphs[index] = graph
        graph.replay()
        return self.static_out.clone()


def step_graphs(model, x: torch.Tensor, cos, sin, key_padding_mask, cu_seqlens) -> LayerGraphs | None:
    """This step's graphs for `model`'s layers, or None where they do not apply (see the module
    docstring) or the step runs eagerly: the first at a shape, and the first after the addresses the
    graphs depend on changed (the first step allocates the 4-bit scratch buffer, so graphs are
    captured from the third step at a shape on)."""
    if not getattr(model, "forward_graphs", False) or not x.is_cuda:
        return None
    if key_padding_mask is not None or cu_seqlens is not None or torch.is_autocast_enabled("cuda"):
        return None
    sets: dict = model.__dict__.setdefault("_forward_graph_sets", {})
    key = (tuple(x.shape), x.dtype, tuple(cos.shape), cos.dtype, x.device)
    fingerprint = _fingerprint(model)
    graphs = sets.get(key)
    if graphs is None or graphs.fingerprint != fingerprint:
        # New, or its graphs would replay stale addresses: a fresh set, captured from the next step on.
        sets.pop(key, None)
        while len(sets) >= MAX_SHAPES:
            sets.pop(next(iter(sets)))
        sets[key] = LayerGraphs(x, cos, sin, fingerprint)
        return None
    graphs.begin_step(cos, sin)
    return graphs
