"""The pieces of the fixed-shape decode step: rope at device-held positions, attention over the whole
static cache under masks, and when a kept decoder (and its CUDA graph) may be reused."""

import logging
import types

import pytest
import torch

import velotune
from tests.model_zoo import save_hf_model
from velotune.infer.decode import DeviceRope, Sampling, StaticDecoder, model_fingerprint
from velotune.infer.generate import _capture, _DoneCheck
from velotune.kernels.attention import attention_reference
from velotune.models.kv_cache import decode_attention
from velotune.models.rope_scaling import rope_cos_sin
from velotune.models.spec import RopeSpec

ROPES = {
    "default": RopeSpec(theta=10000.0, rotary_dim=16),
    "llama3": RopeSpec(
        theta=500000.0, kind="llama3", rotary_dim=16, factor=8.0, original_max_position_embeddings=16
    ),
    "yarn": RopeSpec(
        theta=10000.0, kind="yarn", rotary_dim=16, factor=4.0, original_max_position_embeddings=16
    ),
    "dynamic": RopeSpec(theta=10000.0, kind="dynamic", rotary_dim=16, factor=2.0, max_position_embeddings=20),
    "longrope": RopeSpec(
        theta=10000.0,
        kind="longrope",
        rotary_dim=16,
        original_max_position_embeddings=12,
        max_position_embeddings=48,
        short_factor=tuple(1.0 + 0.1 * i for i in range(8)),
        long_factor=tuple(1.5 + 0.2 * i for i in range(8)),
    ),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_device_rope_equals_rope_cos_sin_on_both_sides_of_every_length_switch(kind):
    rope = ROPES[kind]
    table = DeviceRope(rope, max_len=40, device=torch.device("cpu"))
    # Largest positions below, at and above the switches of dynamic NTK (20) and LongRoPE (12).
    for largest in (3, 11, 12, 13, 19, 20, 21, 39):
        positions = torch.tensor([largest, max(largest - 7, 0), largest // 2])
        cos, sin = table(positions, torch.float32)
        want_cos, want_sin = rope_cos_sin(rope, positions[:, None], torch.float32)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), largest


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 3.0), (4, 3.0)])
def test_decode_attention_over_the_whole_cache_equals_attention_over_the_filled_prefix(window, softcap):
    torch.manual_seed(0)
    batch, cache_len, filled, heads, kv_heads, dim = 2, 16, 9, 6, 2, 8
    q = torch.randn(batch, 1, heads, dim)
    keys = torch.randn(batch, cache_len, kv_heads, dim)  # columns past `filled` hold stale values
    values = torch.randn(batch, cache_len, kv_heads, dim)
    real = torch.ones(batch, filled, dtype=torch.bool)
    real[1, :3] = False  # left padding
    visible = torch.zeros(batch, cache_len, dtype=torch.bool)
    visible[:, :filled] = real
    if window is not None:
        visible &= torch.arange(cache_len) > filled - 1 - window
    mask = torch.zeros(batch, cache_len).masked_fill(~visible, float("-inf"))[:, None, None]
    got = decode_attention(q, keys, values, mask, scale=0.3, softcap=softcap)
    want = attention_reference(
        q,
        keys[:, :filled],
        values[:, :filled],
        scale=0.3,
        sliding_window=window,
        softcap=softcap,
        key_padding_mask=real,
    )
    assert (got - want).abs().max() < 1e-6


def test_a_kept_decoder_is_reused_only_while_the_weights_and_settings_are_unchanged(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(tmp_path), dtype=torch.float32, device_map="cpu", progress=False
    )
    model = velotune.FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, use_gradient_checkpointing=False
    )
    greedy = Sampling(eos=(2,), pad=0)
    decoder = StaticDecoder(model, batch=2, cache_len=64, sampling=greedy)
    assert decoder.fits(model, 2, 64, greedy, None) and decoder.fits(model, 2, 30, greedy, None)
    assert not decoder.fits(model, 2, 65, greedy, None)  # the cache is too short
    assert not decoder.fits(model, 1, 30, greedy, None)
    assert not decoder.fits(model, 2, 30, Sampling(eos=(2,), pad=0, do_sample=True), None)
    assert not decoder.fits(
        model, 2, 30, greedy, torch.Generator()
    )  # a seeded run draws from its own generator
    before = model_fingerprint(model)
    model.layers[0].attn.qkv.merge()  # LoRA folded in: the projection runs other code
    assert model_fingerprint(model) != before and not decoder.fits(model, 2, 30, greedy, None)
    model.layers[0].attn.qkv.unmerge()
    assert decoder.fits(model, 2, 30, greedy, None)
    model.norm.weight.data = (
        model.norm.weight.data.clone()
    )  # a tensor replaced: a graph would read the old one
    assert not decoder.fits(model, 2, 30, greedy, None)


def test_the_lagged_done_check_reports_each_value_one_check_late():
    done_at = torch.tensor([64])
    lagged, direct = _DoneCheck(done_at, lagged=True), _DoneCheck(done_at, lagged=False)
    assert lagged.poll() == -1 and direct.poll() == 64  # nothing copied yet
    done_at.fill_(9)
    assert lagged.poll() == 64 and direct.poll() == 9
    assert lagged.poll() == 9


def test_a_failed_capture_goes_on_eagerly_unless_the_graph_was_asked_for(caplog):
    class Uncapturable:
        graph = None

        def capture(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = types.SimpleNamespace(_velotune_decoder="kept")
    with caplog.at_level(logging.WARNING):
        assert _capture(model, Uncapturable(), required=False) is False
    assert model._velotune_decoder is None and "not permitted" in caplog.text
    with pytest.raises(RuntimeError, match="not permitted"):
        _capture(model, Uncapturable(), required=True)
