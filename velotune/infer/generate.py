"""Autoregressive generation with a static KV cache: greedy or sampled, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from velotune.errors import ConfigError


def _apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    # Transformers' rule: seen tokens' logits are divided by the penalty when positive, multiplied when negative.
    seen = torch.gather(logits, 1, tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, tokens, seen)


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


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> torch.Tensor:
    """Prompt + new tokens [B, T + n]. Prompts in a batch are left-padded (attention_mask 0 on the left).

    Rows that hit an end-of-sequence token or complete one of `stop_strings` (decoded with `tokenizer`,
    as in Transformers) are padded with pad_token_id from then on. `streamer` is any object with
    Transformers' streamer methods (`put(tokens)`, `end()`), e.g. `transformers.TextStreamer`: it gets
    the prompt [B, T] first, then each step's tokens [B].
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
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    stops = _StopStrings(stop_strings, tokenizer) if stop_strings else None
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(batch, total)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    tokens = input_ids
    step_ids, step_pos = input_ids, positions
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        for _ in range(max_new_tokens):
            out = model(step_ids, attention_mask=attention_mask, position_ids=step_pos, past_key_values=cache,
                        logits_to_keep=1)  # fmt: skip
            logits = out.logits[:, -1].float()
            if repetition_penalty is not None and repetition_penalty != 1.0:
                logits = _apply_repetition_penalty(logits, tokens, repetition_penalty)
            if do_sample:
                next_token = _sample(logits, temperature, top_k, top_p, generator)
            else:
                next_token = logits.argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_token.cpu())
            if eos:
                finished |= torch.isin(next_token, torch.tensor(sorted(eos), device=next_token.device))
            if stops is not None:
                rows = tokens.tolist()
                hits = [not done and stops.hit(row) for row, done in zip(rows, finished.tolist())]
                finished |= torch.tensor(hits, device=finished.device)
            if (eos or stops is not None) and bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            step_ids = next_token[:, None]
            step_pos = step_pos[:, -1:] + 1
    finally:
        if streamer is not None:
            streamer.end()
        model.train(was_training)
    return tokens
