"""The decoding step: one token per row through the model, with shapes that never change.

`StaticDecoder` owns every tensor a step reads or writes, allocated once for a (batch, cache length):
the KV cache, the token just chosen, each row's rope position, the cache column being written, which
cache columns hold real tokens, the rows that have finished, and the generated tokens. A step reads
them, runs the model over one token per row, picks the next token (greedy or sampled, on the device)
and advances them in place. So the same step can be run eagerly (CPU, or `use_cuda_graph=False`) or
captured once into a CUDA graph and replayed per token: both run the same kernels on the same
buffers and give the same tokens. Nothing in a step reads a value back to the host; the caller looks
at `done_at` (how many tokens were generated when every row had finished) every few steps.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from velotune.models.rope_scaling import rope_frequencies
from velotune.models.spec import RopeSpec
from velotune.quant.nf4_weight import NF4Weight, scratch_buffer

logger = logging.getLogger(__name__)

CACHE_ALIGN = 64  # cache columns are allocated in multiples of this (aligned mask rows; reuse across calls)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the graph bakes these values in, so they are part of its key."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos: tuple[int, ...] = ()
    pad: int = 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # Transformers' rule: seen tokens' logits are divided by the penalty when positive, multiplied when negative.
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the top_k tokens and to the
    smallest set whose probability reaches top_p (Transformers' order: temperature, top-k, top-p)."""
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits.float(), dim=-1)
    # What torch.multinomial(probs, 1) computes for one sample (p / Exp(1), arg max), without the validity
    # check it reads back to the host, which a CUDA graph cannot capture.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


class DeviceRope:
    """cos / sin for positions held on the device, with the same float32 arithmetic as
    `velotune.models.rope_scaling.rope_cos_sin`. Length-dependent variants (dynamic NTK, LongRoPE)
    depend on the batch's largest position: their frequencies are tabulated per length up front."""

    def __init__(self, rope: RopeSpec, max_len: int, device: torch.device):
        if rope.kind in ("dynamic", "longrope"):
            if rope.kind == "longrope":
                first = int(rope.original_max_position_embeddings or rope.max_position_embeddings)
                lengths = [first, first + 1]  # short factors up to `first`, long ones above
            else:
                first = int(rope.max_position_embeddings)
                lengths = list(range(first, max(max_len, first) + 1))
            rows = [rope_frequencies(rope, n) for n in lengths]
            self.first = first
        else:
            rows = [rope_frequencies(rope, None)]
            self.first = 0
        self.inv_freq = torch.stack([f for f, _ in rows]).to(device)  # [n_lengths, rotary_dim / 2]
        self.factor = torch.tensor([a for _, a in rows], dtype=torch.float32, device=device)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, rotary_dim] for positions [B]."""
        if self.inv_freq.shape[0] == 1:
            inv_freq, factor = self.inv_freq[0], self.factor[0]
        else:  # index_select with a device index: indexing by a 0-d tensor would read it on the host
            row = (positions.max() + 1 - self.first).clamp(0, self.inv_freq.shape[0] - 1).view(1)
            inv_freq, factor = self.inv_freq.index_select(0, row)[0], self.factor.index_select(0, row)
        freqs = positions[:, None, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )


def graph_blocker(model) -> str | None:
    """Why the model's decode step cannot be captured in a CUDA graph (None when it can)."""
    if model.device.type != "cuda":
        return "the model is not on a CUDA device"
    if model.spec.moe is not None:
        return "mixture-of-experts layers group tokens per expert on the host"
    if model.embedding_on_host:
        return "the embedding table is kept in host memory (keep_embedding_on_host(False) moves it back)"
    return None


def model_fingerprint(model) -> tuple:
    """Changes whenever a captured graph would read stale memory or run stale code: a tensor replaced or
    moved, LoRA merged or unmerged, adapters added."""
    tensors = tuple(t.data_ptr() for t in model.parameters()) + tuple(b.data_ptr() for b in model.buffers())
    merged = tuple(getattr(m, "merged", None) for m in model.modules())
    return tensors, merged, model.dtype


class StaticDecoder:
    def __init__(self, model, batch: int, cache_len: int, sampling: Sampling, generator=None):
        spec = model.spec
        device = model.device
        self.model = model
        self.batch, self.cache_len, self.sampling = batch, cache_len, sampling
        self.generator = generator
        self.cache = model.new_kv_cache(batch, cache_len)
        self.rope = DeviceRope(spec.rope, cache_len, device)
        long = dict(dtype=torch.long, device=device)
        self.current = torch.zeros(batch, **long)  # the token each row feeds in next
        self.positions = torch.zeros(batch, **long)  # its rope position
        self.count = torch.zeros(1, **long)  # tokens generated so far
        self.done_at = torch.zeros(1, **long)  # count when every row had finished; cache_len while not
        self.tokens = torch.zeros(batch, cache_len, **long)  # generated tokens, column = step
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.key_mask = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)  # cache columns in use
        self.columns = torch.arange(cache_len, **long)
        self.eos = torch.tensor(sampling.eos, **long)
        self.seen = None
        if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, spec.vocab_size, dtype=torch.bool, device=device)
        self.windows = sorted({w for w in spec.sliding_windows if w is not None})
        self.graph = None
        self.fingerprint = model_fingerprint(model)
        self._scratch = None

    def fits(self, model, batch: int, total: int, sampling: Sampling, generator) -> bool:
        return (
            self.model is model
            and self.batch == batch
            and self.cache_len >= total
            and self.sampling == sampling
            and generator is None
            and self.generator is None
            and self.fingerprint == model_fingerprint(model)
        )

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Resets the state for a new left-padded batch of prompts [B, T] (T < cache_len)."""
        prompt_len = input_ids.shape[1]
        self.cache.reset()
        self.cache.decoding = False
        self.key_mask.zero_()
        self.key_mask[:, :prompt_len] = attention_mask.bool()
        self.positions.copy_(attention_mask.sum(-1))
        self.cache.column.fill_(prompt_len)
        self.count.zero_()
        self.done_at.fill_(self.cache_len)
        self.finished.zero_()
        self.tokens.fill_(self.sampling.pad)
        if self.seen is not None:
            self.seen.zero_()
            self.seen.scatter_(1, input_ids, True)

    def choose(self, logits: torch.Tensor) -> None:
        """Picks each row's next token from float32 logits [B, V] and records it (finished rows get pad)."""
        s = self.sampling
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, s.repetition_penalty)
        if s.do_sample:
            token = sample(logits, s.temperature, s.top_k, s.top_p, self.generator)
        else:
            token = logits.argmax(-1)
        token = torch.where(self.finished, torch.full_like(token, s.pad), token)
        self.tokens.index_copy_(1, self.count, token[:, None])
        if s.eos:  # not torch.isin: on CUDA it may sort and count unique values on the host
            self.finished |= (token[:, None] == self.eos).any(-1)
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        self.count += 1
        newly_done = self.finished.all() & (self.done_at == self.cache_len)
        self.done_at.copy_(torch.where(newly_done, self.count, self.done_at))
        self.current.copy_(token)

    def step(self, side_stream: bool = False) -> None:
        """Feeds `current` through the model at `positions` / cache column and chooses the next token.

        `side_stream`: run it on a fresh CUDA stream (then join it), as the eager steps before a capture must."""
        if side_stream:
            stream = torch.cuda.Stream(device=self.model.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step()
            torch.cuda.current_stream().wait_stream(stream)
            return
        model, cache = self.model, self.cache
        cache.decoding = True
        self.key_mask.index_fill_(1, cache.column, True)
        # Additive masks, one per sliding window, shared by every layer: columns holding real tokens and,
        # for a window w, no further back than w - 1 columns (Transformers counts the window in columns).
        visible = {None: self.key_mask}
        for w in self.windows:
            visible[w] = self.key_mask & (self.columns > cache.column - w)
        cache.masks = {w: _additive(m, model.dtype)[:, None, None] for w, m in visible.items()}
        x = model.embed(self.current[:, None])
        if model.spec.embedding_scale is not None:
            x = x * torch.tensor(model.spec.embedding_scale, dtype=x.dtype)
        cos, sin = self.rope(self.positions, x.dtype)
        for layer in model.layers:
            x = layer(x, cos, sin, None, None, cache)
        logits = model.logits_of(model.norm(x))[:, 0].float()
        self.choose(logits)
        self.positions += 1
        cache.column += 1

    def reencode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generated: int) -> None:
        """Instead of a step: runs the whole sequence so far (prompt + `generated` tokens) through the model's
        ordinary forward, rewriting the cache from column 0, and chooses the next token from its last position.

        Transformers' Phi-3 does this once, at the step where the sequence first outgrows LongRoPE's original
        length, so that every cached key is rotated with the long factors the later positions use.
        """
        tokens = torch.cat([input_ids, self.tokens[:, :generated]], dim=-1)
        mask = torch.cat([attention_mask, torch.ones_like(self.tokens[:, :generated])], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache.reset()
        self.cache.decoding = False
        out = self.model(tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         logits_to_keep=1)  # fmt: skip
        self.key_mask.index_fill_(1, self.cache.column, True)
        self.choose(out.logits[:, -1].float())
        self.positions += 1
        self.cache.column += 1

    def capture(self) -> None:
        """Records one step into a CUDA graph. Run at least one step eagerly first: it compiles the Triton
        kernels and sizes the 4-bit dequantization scratch buffer, neither of which a capture may do."""
        # The graph bakes in the address of the shared 4-bit scratch buffer: hold it, so that it outlives
        # the graph even if the buffer is released or replaced by a larger one.
        dtypes = {m.compute_dtype for m in self.model.modules() if isinstance(m, NF4Weight)}
        self._scratch = [scratch_buffer(0, self.model.device, dt) for dt in dtypes]
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # the default generator is registered by the capture itself
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step()
        self.graph = graph
        logger.debug("captured the decode step for batch %d, cache %d", self.batch, self.cache_len)

    def replay(self) -> None:
        self.graph.replay()
