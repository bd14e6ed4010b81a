"""Autoregressive generation with a static KV cache: greedy or sampled, batched with left padding.

The prompt runs through the model's ordinary forward (any length, filling the cache); every later token
comes from `velotune.infer.decode.StaticDecoder`'s fixed-shape step, on CUDA captured once into a CUDA
graph and replayed per token, elsewhere run eagerly. The host looks at the device only every
`check_every` tokens (to stop once every row has finished, and to feed a streamer), or after every
token when stop strings must be decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from velotune.errors import ConfigError
from velotune.infer.decode import CACHE_ALIGN, Sampling, StaticDecoder, graph_blocker

logger = logging.getLogger(__name__)


class _StopStrings:
    """Transformers' stop-string rule: a row stops when a stop string appears in its decoded text and
    overlaps the token just generated (an occurrence entirely inside earlier tokens does not count).

    Only the last tokens of each row are decoded: enough to hold the longest stop string even when
    every token carries a single byte of it.
    """

    def __init__(self, stop_strings: str | Sequence[str], tokenizer):
        if tokenizer is None:
            raise ConfigError(
                "stop_strings need the tokenizer to decode with: pass tokenizer=... to generate()."
            )
        self.strings = [stop_strings] if isinstance(stop_strings, str) else [s for s in stop_strings if s]
        self.tokenizer = tokenizer
        self.window = 4 * max((len(s.encode()) for s in self.strings), default=0) + 2

    def hit(self, row: list[int]) -> bool:
        tail = row[-self.window :]
        text = self.tokenizer.decode(tail)
        before = self.tokenizer.decode(tail[:-1])
        # Where `before` is not a prefix (a multi-byte character completed), search the whole tail.
        start = len(before) if text.startswith(before) else 0
        return any(s in text[max(0, start - len(s) + 1) :] for s in self.strings)


class _DoneCheck:
    """Reads the device's `done_at` (tokens generated when every row had finished; cache_len while not).

    Lagged (CUDA, nothing streamed): each check starts a copy to the host and reads the one started at the
    previous check, long finished by then, so the GPU never idles waiting for the host."""

    def __init__(self, done_at: torch.Tensor, lagged: bool):
        self.source = done_at
        self.lagged = lagged
        cuda = lagged and done_at.is_cuda
        self.host = torch.zeros(1, dtype=done_at.dtype, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.pending = False

    def poll(self) -> int:
        """done_at as of this check (not lagged) or as of the previous one (-1 at the first)."""
        if not self.lagged:
            return int(self.source)
        value = -1
        if self.pending:
            if self.event is not None:
                self.event.synchronize()
            value = int(self.host[0])
        self.host.copy_(self.source, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True
        return value


def _decoder_for(
    model, batch: int, total: int, sampling: Sampling, generator, use_graph: bool
) -> StaticDecoder:
    """The model's cached decoder when it fits (same batch, sampling, weights; cache long enough), else a new one.

    Only a graph decoder is kept (it holds the KV cache and the captured graph until the next call that does
    not fit); an eager one costs nothing to rebuild.
    """
    cached = getattr(model, "_velotune_decoder", None)
    if use_graph and cached is not None and cached.fits(model, batch, total, sampling, generator):
        return cached
    model._velotune_decoder = None  # free the old cache and graph before allocating new ones
    cache_len = -(-total // CACHE_ALIGN) * CACHE_ALIGN
    decoder = StaticDecoder(model, batch, cache_len, sampling, generator)
    if use_graph and generator is None:
        model._velotune_decoder = decoder
    return decoder


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    seed: int | None = None,
    use_cuda_graph: bool | None = None,
    check_every: int = 8,
) -> torch.Tensor:
    """Prompt + new tokens [B, T + n]. Prompts in a batch are left-padded (attention_mask 0 on the left).

    Rows that hit an end-of-sequence token or complete one of `stop_strings` (decoded with `tokenizer`,
    as in Transformers) are padded with pad_token_id from then on. `streamer` is any object with
    Transformers' streamer methods (`put(tokens)`, `end()`), e.g. `transformers.TextStreamer`: it gets
    the prompt [B, T] first, then each step's tokens [B] (in bursts of `check_every` tokens).

    Args:
        use_cuda_graph: replay the decode step from a CUDA graph (None: whenever the model is on CUDA and
            its layers allow it; mixture-of-experts layers and a host-side embedding do not). The graph and
            its KV cache are kept on the model for the next call with the same batch size and sampling
            settings. False runs the same step eagerly (same tokens).
        check_every: tokens generated between two looks at whether every row has finished; up to twice
            that many steps may run past the end (their tokens are dropped).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    input_ids = input_ids.to(model.device)
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device).long()
    if bool((attention_mask[:, -1] == 0).any()):
        raise ConfigError(
            "batched prompts must be left-padded (the last column of attention_mask must be 1)."
        )
    limit = getattr(model, "max_seq_length", None)
    total = prompt_len + max_new_tokens
    if limit is not None and total > limit:
        raise ConfigError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_length={limit}."
        )
    if max_new_tokens < 1:
        return input_ids
    if check_every < 1:
        raise ConfigError(f"check_every must be at least 1, got {check_every}.")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    stops = _StopStrings(stop_strings, tokenizer) if stop_strings else None
    blocker = graph_blocker(model)
    if blocker is None and seed is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        blocker = "sampling with a seed inside a CUDA graph needs PyTorch >= 2.5"
    if use_cuda_graph and blocker is not None:
        raise ConfigError(f"use_cuda_graph=True, but the decode step cannot be captured: {blocker}.")
    use_graph = blocker is None if use_cuda_graph is None else use_cuda_graph
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampling = Sampling(do_sample=do_sample, temperature=float(temperature), top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, eos=tuple(sorted(eos)), pad=pad)  # fmt: skip

    was_training = model.training
    model.eval()
    decoder = _decoder_for(model, batch, total, sampling, generator, use_graph)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    streamed = 0
    try:
        decoder.start(input_ids, attention_mask)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids, attention_mask=attention_mask, position_ids=positions,
                    past_key_values=decoder.cache, logits_to_keep=1)  # fmt: skip
        decoder.choose(out.logits[:, -1].float())
        del out
        generated, eager_steps = 1, 0
        reencode_at = _longrope_switch(model.spec.rope, prompt_len)
        check = _DoneCheck(decoder.done_at, lagged=streamer is None and decoder.done_at.is_cuda)
        while True:
            finished_at = None
            if stops is not None:
                finished_at = _check_stop_strings(decoder, stops, input_ids, generated)
            elif sampling.eos and generated % check_every == 0:
                done = check.poll()
                finished_at = done if 0 <= done < decoder.cache_len else None
            if streamer is not None and (stops is not None or generated % check_every == 0):
                streamed = _stream(streamer, decoder, streamed, finished_at or generated)
            if finished_at is not None or generated == max_new_tokens:
                break
            if prompt_len + generated == reencode_at:
                decoder.reencode(input_ids, attention_mask, generated)
            elif decoder.graph is not None:
                decoder.replay()
            else:
                decoder.step(side_stream=use_graph)
                eager_steps += 1
                if use_graph and eager_steps == 2:  # the eager steps compiled and sized everything it uses
                    use_graph = _capture(model, decoder, required=bool(use_cuda_graph))
            generated += 1
        n = min(int(decoder.done_at), generated)
        if streamer is not None:
            _stream(streamer, decoder, streamed, n)
        return torch.cat([input_ids, decoder.tokens[:, :n]], dim=-1)
    finally:
        if streamer is not None:
            streamer.end()
        model.train(was_training)


def _capture(model, decoder: StaticDecoder, required: bool) -> bool:
    """Captures the decode step; when that fails and the graph was not asked for explicitly, logs why and
    goes on eagerly (same tokens, slower) instead of failing the generation."""
    try:
        decoder.capture()
    except Exception as exc:
        if required:
            raise
        logger.warning("decoding without a CUDA graph: capturing the decode step failed: %s", exc)
        decoder.graph = None
        model._velotune_decoder = None
        return False
    return True


def _longrope_switch(rope, prompt_len: int) -> int | None:
    """Sequence length (prompt + generated, padding included) at whose step Transformers' Phi-3 re-encodes the
    whole sequence: the first step past LongRoPE's original length, when the prompt fit inside it."""
    original = rope.original_max_position_embeddings
    if rope.kind != "longrope" or original is None or prompt_len > original:
        return None
    return int(original) + 1


def _check_stop_strings(decoder: StaticDecoder, stops: _StopStrings, input_ids: torch.Tensor, generated: int):
    """Marks rows that just completed a stop string as finished; returns `generated` when all rows are."""
    rows = torch.cat([input_ids, decoder.tokens[:, :generated]], dim=-1).tolist()
    finished = decoder.finished.tolist()
    hits = [not done and stops.hit(row) for row, done in zip(rows, finished)]
    if any(hits):
        decoder.finished |= torch.tensor(hits, device=decoder.finished.device)
    if all(h or f for h, f in zip(hits, finished)):
        decoder.done_at.fill_(min(int(decoder.done_at), generated))
        return generated
    return None


def _stream(streamer, decoder: StaticDecoder, streamed: int, upto: int) -> int:
    if upto > streamed:
        for column in decoder.tokens[:, streamed:upto].cpu().t():
            streamer.put(column)
    return max(streamed, upto)
