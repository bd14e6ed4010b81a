"""CUDA graphs of checkpointed layers (opt-in: `model.cuda_graphs = True`).

Why: at Llama-3.1-8B QLoRA 2 x 2048 on the H100 machine the host needs ~4.5 ms to enqueue one
layer's forward (about 45 kernel launches and the Python around them) against ~3 ms of GPU work, and
the hand-written backward of a "save_mlp" layer is host-bound as well (benchmarks/NOTES.md, session
7): the step ran at the host's pace, and with the host's noise. A checkpointed layer's first forward
and, under "save_mlp", its backward run the hand-written halves' kernels only, with the same shapes
every step: captured once, each is one graph launch per layer.

What is captured, per layer:
  "full"      the first forward: x -> the layer's output.
  "save_mlp"  the first forward: x -> the MLP half's input h, its gate/up output (in the layers that
              keep it) and the layer's output; and the backward: (x, h, the kept gate/up output, dy) ->
              dx and the layer's LoRA gradients: the MLP half differentiated from h first, then the
              attention half recomputed from x and differentiated, as `velotune.memory.checkpoint`
              runs them eagerly (the same ops in the same order: the same numbers).
Every graph reads and writes static buffers only, shared by all the layers (one set per shape): its
inputs are copied in before the replay (skipped where the buffer already holds that tensor, e.g. the
previous layer's output) and its outputs are written straight into them (`out=` through the kernels)
and cloned after. So no tensor of a graph's memory pool outlives its replay, and one pool serves every
graph, whatever order they replay in. The kept gate/up output is the exception to the clones: two
buffers, alternating between consecutive keeping layers, are copied to host and back in place
(`ActivationStore.save(..., static=True)`), each write waiting for the last copy out of its buffer.
The layers that do not keep it compute their gate/up output in those buffers too (the set the next
keeping layer above writes), so the pool never holds one.
What stays eager, outside the graphs: the offload copies, the loads back, and autograd's bookkeeping.
Memory: the static buffers (at Llama-3.1-8B 2 x 2048, 0.54 GiB) and the pool (one layer's
intermediates, 0.44 GiB), which `torch.cuda.max_memory_allocated` does not count (`pool_bytes`).

When: the "full" or "save_mlp" policy, CUDA, both halves hand-written, no key padding mask and no
packed sequences (their contents would change under a captured graph), no autocast, layers not
sharded. A step at a new (shape, dtype) runs eagerly (Triton compiles, the 4-bit scratch buffer
reaches its size), and so does any step after which an address the graphs depend on changed: a
parameter or buffer of the model that is no longer the tensor captured (a new adapter, a move), or a
reallocated 4-bit scratch buffer. The next step captures each graph as it comes; the ones after replay.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from velotune.errors import KernelError
from velotune.kernels.rmsnorm import rms_norm_output_dtype
from velotune.memory.fused_attention import fused_attention_block
from velotune.memory.tiled import token_tiles
from velotune.quant import nf4_weight

# Shapes (batch x sequence) kept at once; a new one beyond this drops the oldest set.
MAX_SHAPES = 2
POLICIES = ("full", "save_mlp")


def capture(fn: Callable[[], None], pool) -> Callable[[], None]:
    """fn's GPU work captured into a CUDA graph whose memory comes from `pool`; returns its replay.
    (Capturing runs fn's Python once and none of its kernels.)"""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def supported(x: torch.Tensor) -> bool:
    """Whether x's device runs CUDA graphs."""
    return x.is_cuda


def _new_pool(device: torch.device):
    return torch.cuda.graph_pool_handle() if torch.device(device).type == "cuda" else None


def _fingerprint(model) -> tuple:
    """The addresses every captured graph depends on besides its static buffers."""
    ptrs = []
    for module in model.modules():
        ptrs += [t.data_ptr() for t in module._parameters.values() if t is not None]
        ptrs += [t.data_ptr() for t in module._buffers.values() if t is not None]
    return (tuple(ptrs), nf4_weight.scratch_generation())


class StepGraphs:
    """One shape's graphs, their shared static buffers and memory pool, and the rotary tables they read."""

    def __init__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fingerprint: tuple):
        self.cos, self.sin = torch.empty_like(cos), torch.empty_like(sin)
        self.pool = _new_pool(x.device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.replays: dict[tuple, Callable[[], None]] = {}
        # Per graph, what its capture learnt that the eager code around its replays needs.
        self.notes: dict[tuple, list] = {}
        self.fingerprint = fingerprint
        # role -> (the tensor the buffer holds a copy of, that tensor's version then): `fill` skips the copy.
        self._holds: dict[str, tuple[weakref.ref, int]] = {}
        # role -> the event after which a side stream's copy has read the buffer: wait before writing it.
        self._readers: dict[str, torch.cuda.Event] = {}

    def begin_step(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        """The static buffer `role`, allocated like `like` on first use."""
        return self.buffer_of(role, like.shape, like.dtype, like.device)

    def buffer_of(self, role: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The static buffer `role` of this shape and dtype, allocated on first use."""
        buf = self.buffers.get(role)
        if buf is None:
            buf = self.buffers[role] = torch.empty(shape, dtype=dtype, device=device)
        elif buf.shape != torch.Size(shape) or buf.dtype != dtype:
            raise KernelError(
                f"CUDA graph buffer {role!r} is {tuple(buf.shape)} {buf.dtype}, asked for {tuple(shape)} {dtype}: "
                "a tensor changed shape or dtype between a layer's forward and its backward."
            )
        return buf

    def fill(self, role: str, value: torch.Tensor) -> torch.Tensor:
        """The static buffer `role` holding value's contents (copied unless it already holds them)."""
        buf = self.buffer(role, value)
        if value is buf:
            return buf
        held = self._holds.get(role)
        if held is None or held[0]() is not value or held[1] != value._version:
            self.wait_for_readers([role])
            buf.copy_(value)
            self._holds[role] = (weakref.ref(value), value._version)
        return buf

    def output(self, role: str) -> torch.Tensor:
        """A copy of the static buffer `role` for the caller to keep."""
        out = self.buffers[role].clone()
        self._holds[role] = (weakref.ref(out), out._version)
        return out

    def read_until(self, role: str, event: torch.cuda.Event | None) -> None:
        """The buffer `role` is being read (copied out on a side stream) until `event`: `wait_for_readers`
        makes the compute stream wait for it before the buffer is written again."""
        if event is not None:
            self._readers[role] = event

    def wait_for_readers(self, roles: Sequence[str]) -> None:
        for role in roles:
            event = self._readers.pop(role, None)
            if event is not None:
                event.wait()  # the current stream waits; the host does not

    def run(self, key: tuple, build: Callable[[], Callable[[], None]]) -> None:
        """Replays graph `key`, capturing build()'s function first if it has none yet."""
        replay = self.replays.get(key)
        if replay is None:
            try:
                replay = capture(build(), self.pool)
            except RuntimeError as e:  # CUDA's capture errors (torch.AcceleratorError is one too)
                raise KernelError(
                    f"capturing the CUDA graph of {key[0]} (layer {key[1]}) failed: {e}. Train without "
                    "graphs (model.cuda_graphs = False)."
                ) from e
            self.replays[key] = replay
        self._holds.clear()  # the graph may write any buffer
        replay()


class GraphedLayer:
    """One layer's graphed forward (both policies) and backward ("save_mlp"), for the checkpoint
    segment (`velotune.memory.checkpoint._Segment`): the eager code around the replays."""

    def __init__(self, graphs: StepGraphs, index: int, layer, mlp, tile_tokens: int | None, policy: str,
                 keep_gate_up: bool, params: Sequence[torch.Tensor], slot: int = 0):  # fmt: skip
        """slot: which of the two sets of gate/up buffers this layer computes its gate/up output in
        (`_gate_up_roles`): the number of keeping layers below it, modulo 2. Consecutive keeping layers
        alternate, so that a layer's forward does not wait for the copy to host of the keeping layer
        before it, nor the copy back of the one below it for this layer's backward."""
        self.graphs, self.index, self.layer, self.mlp = graphs, index, layer, mlp
        self.tile, self.policy, self.keep_gate_up, self.params = tile_tokens, policy, keep_gate_up, list(params)
        self.slot = slot

    def _attention_half(self, x: torch.Tensor):
        # Built against the static rotary tables: the graph reads them, copied in once per step.
        return fused_attention_block(self.layer, x, self.graphs.cos, self.graphs.sin, None, None)

    def _gate_up_roles(self, x: torch.Tensor) -> list[str]:
        """The static buffers of this layer's gate/up output, one per MLP tile (allocated here, before any
        capture, so that they are not memory of the graphs' pool). A keeping layer keeps its output in
        them; a layer that does not keep it computes it there too, in its forward and in its backward's
        recomputation, so that no graph holds a gate/up output in the pool (224 MiB at Llama-8B
        2 x 2048). Such a layer's slot is the one the next keeping layer above it writes, so the buffer
        it writes is never the one being copied to host (the keeping layer below's, in the forward) or
        back from it (the same layer's, prefetched during this layer's backward)."""
        rows = x.numel() // x.shape[-1]
        width = 2 * self.layer.spec.intermediate_size
        norm = self.layer.mlp_norm
        dtype = rms_norm_output_dtype(x, norm.weight, norm.offset)  # the gate/up GEMM's, as its input's
        roles = []
        for k, (start, end) in enumerate(token_tiles(rows, self.tile)):
            roles.append(f"gate_up{self.slot}.{k}")
            self.graphs.buffer_of(roles[-1], (end - start, width), dtype, x.device)
        return roles

    def forward(self, x: torch.Tensor, keep: Callable | None = None) -> tuple[torch.Tensor, list]:
        """(the layer's output, and under "save_mlp" what keep(tensor, static) returned for the MLP
        half's input and for each tile's kept gate/up output). keep receives a tensor of its own
        (static=False) or, for gate/up, the static buffer itself (static=True: `ActivationStore.save`'s
        meaning; what it returns must have the `copied` event of that save, or None)."""
        graphs = self.graphs
        static_x = graphs.fill("x", x)
        if self.policy == "full":

            def build():
                head = self._attention_half(static_x)
                # x is no longer read once the attention half ran: the output takes its buffer.
                return lambda: self.mlp.forward_keeping(head(static_x), self.tile, None, out=static_x)

            graphs.run(("full forward", self.index), build)
            return graphs.output("x"), []
        static_h = graphs.buffer("h", x)
        roles = self._gate_up_roles(x)
        gate_up = [graphs.buffers[r] for r in roles]
        graphs.wait_for_readers(roles)  # the copies to host of the last layer that kept in these buffers

        def build():
            head = self._attention_half(static_x)

            def forward():
                head(static_x, out=static_h)
                # x is no longer read: the output takes its buffer.
                self.mlp.forward_keeping(static_h, self.tile, None, gate_up_into=gate_up, out=static_x)

            return forward

        graphs.run(("save_mlp forward", self.index, self.keep_gate_up, self.slot), build)
        kept = [keep(graphs.output("h"), False)]
        if self.keep_gate_up:
            for role, buf in zip(roles, gate_up):
                kept.append(keep(buf, True))
                graphs.read_until(role, getattr(kept[-1], "copied", None))
        return graphs.output("x"), kept

    def backward(self, x: torch.Tensor, h: torch.Tensor, gate_up: list[torch.Tensor], dy: torch.Tensor,
                 need_dx: bool) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:  # fmt: skip
        """"save_mlp": (dx or None, one gradient or None per parameter) of <layer(x), dy>, from the
        layer's input x, its MLP half's input h and the kept gate/up output."""
        graphs = self.graphs
        roles = self._gate_up_roles(x)
        if len(gate_up) != (len(roles) if self.keep_gate_up else 0):
            raise KernelError(f"layer {self.index} kept {len(gate_up)} gate/up tiles, its graph reads {len(roles)}.")
        static_x, static_h, static_dy = graphs.fill("x", x), graphs.fill("h", h), graphs.fill("dy", dy)
        static_gate_up = [graphs.fill(r, t) for r, t in zip(roles, gate_up)]
        # Not kept: the recomputed gate/up output goes into the buffers.
        recompute_into = None if self.keep_gate_up else [graphs.buffers[r] for r in roles]
        del x, h, gate_up  # their memory is free for the replay's
        graphs.wait_for_readers(roles)  # the replay writes them (the activation's gradient, in place)
        # Keyed by shape too: layers whose LoRA ranks differ get buffers of their own.
        static_grads = [graphs.buffer(f"grad{i} {tuple(p.shape)} {p.dtype}", p) for i, p in enumerate(self.params)]
        key = ("save_mlp backward", self.index, self.keep_gate_up, self.slot, need_dx)

        def build():
            head = self._attention_half(static_x)
            produced = graphs.notes[key] = []  # which parameters get a gradient, known once captured

            def backward():
                kept = list(static_gate_up) if static_gate_up else None
                dh, grads = self.mlp.tiled_backward(static_h, static_dy, self.params, self.tile, True, kept_gate_up=kept,
                                                    gate_up_into=recompute_into)  # fmt: skip
                # As `_Segment._hand_written_head_backward` after the MLP half ran first.
                if need_dx or head.trains(self.params):
                    state, _ = head.recompute(static_x, need_output=False)
                    # dy is no longer read: dx takes its buffer.
                    _, head_grads = head.backward(state, dh, self.params, need_dx, dx_out=static_dy)
                    for i, g in enumerate(head_grads):
                        if g is not None:
                            grads[i] = g if grads[i] is None else grads[i].add_(g)
                produced[:] = [g is not None for g in grads]
                made = [(buf, g) for buf, g in zip(static_grads, grads) if g is not None]
                if made:
                    torch._foreach_copy_([b for b, _ in made], [g for _, g in made])

            return backward

        graphs.run(key, build)
        grads = [buf.clone() if made else None for buf, made in zip(static_grads, graphs.notes[key])]
        return (graphs.output("dy") if need_dx else None), grads


def pool_bytes(model) -> int:
    """Device memory held by the memory pools of `model`'s CUDA graphs. `torch.cuda.max_memory_allocated`
    does not count it while no graph is being captured (a replay allocates nothing), yet no other
    tensor can use it: a graphed step's footprint is its peak allocated memory plus this."""
    sets = model.__dict__.get("_cuda_graph_sets")
    if not sets:
        return 0
    pools = {tuple(graphs.pool) for graphs in sets.values() if graphs.pool is not None}
    if not pools:
        return 0
    return sum(
        segment["total_size"]
        for segment in torch.cuda.memory_snapshot()
        if tuple(segment.get("segment_pool_id", ())) in pools
    )


def step_graphs(model, x: torch.Tensor, cos, sin, key_padding_mask, cu_seqlens, policy: str) -> StepGraphs | None:
    """This step's graphs for `model`'s layers, or None where they do not apply (see the module
    docstring) or the step runs eagerly: the first at a shape, and the first after the addresses the
    graphs depend on changed (the first step allocates the 4-bit scratch buffer, so graphs are
    captured from the third step at a shape on)."""
    if not getattr(model, "cuda_graphs", False):
        model.__dict__.pop("_cuda_graph_sets", None)  # turned off: the graphs' buffers and pool go
        return None
    if policy not in POLICIES or not supported(x):
        return None
    if key_padding_mask is not None or cu_seqlens is not None or torch.is_autocast_enabled(x.device.type):
        return None
    sets: dict = model.__dict__.setdefault("_cuda_graph_sets", {})
    key = (tuple(x.shape), x.dtype, tuple(cos.shape), cos.dtype, x.device)
    fingerprint = _fingerprint(model)
    graphs = sets.get(key)
    if graphs is None or graphs.fingerprint != fingerprint:
        # New, or its graphs would replay stale addresses: a fresh set, captured from the next step on.
        sets.pop(key, None)
        while len(sets) >= MAX_SHAPES:
            sets.pop(next(iter(sets)))
        sets[key] = StepGraphs(x, cos, sin, fingerprint)
        return None
    graphs.begin_step(cos, sin)
    return graphs
