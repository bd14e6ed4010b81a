import pytest
import torch

from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels import rope
from velotune.kernels.rope import RotaryFunction, apply_rotary, apply_rotary_reference


def _cos_sin(position_ids: torch.Tensor, rot: int, dtype=torch.float32, base: float = 10000.0):
    """cos/sin [B, T, rot] as Transformers builds them: cat(freqs, freqs) at each position id."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _run(fn, q, k, cos, sin, seed=5):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = fn(q, k, cos, sin)
    gen = torch.Generator().manual_seed(seed)
    dq_out = torch.randn(q_out.shape, generator=gen, dtype=q_out.dtype)
    dk_out = torch.randn(k_out.shape, generator=gen, dtype=k_out.dtype)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def _compare(q, k, cos, sin, tol=1e-5):
    got = _run(RotaryFunction.apply, q, k, cos, sin)
    want = _run(apply_rotary_reference, q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel_err(g, w) < tol


def _inputs(bsz, seq, n_q, n_k, head_dim, rot, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seq, n_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(bsz, seq, n_k, head_dim, generator=gen).to(dtype)
    pos = torch.randint(0, 4096, (bsz, seq), generator=gen)
    cos, sin = _cos_sin(pos, rot, dtype)
    return q, k, cos, sin


@pytest.mark.parametrize(
    "bsz, seq, n_q, n_k, head_dim, rot",
    [
        (2, 7, 4, 2, 64, 64),  # GQA
        (1, 1, 3, 3, 48, 48),  # batch 1, seq 1, odd head count, head_dim not a power of two
        (2, 5, 6, 1, 80, 32),  # partial rotary (Phi-2 style)
        (1, 9, 2, 2, 96, 96),
        (1, 3, 5, 1, 128, 64),  # partial rotary, half the head
        (1, 2, 40, 8, 128, 128),  # more heads than one head chunk: the head loop runs twice
        (1, 2, 2, 1, 256, 256),
        (1, 4, 3, 2, 36, 20),  # half of the rotary dims (10) is odd
    ],
)
def test_triton_rotary_matches_reference_values_and_gradients(bsz, seq, n_q, n_k, head_dim, rot):
    _compare(*_inputs(bsz, seq, n_q, n_k, head_dim, rot))


def test_triton_rotary_matches_reference_with_positions_restarting_in_packed_sequences():
    q, k, _, _ = _inputs(1, 12, 4, 2, 64, 64, seed=3)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    cos, sin = _cos_sin(pos, 64)
    _compare(q, k, cos, sin)


def test_triton_rotary_matches_reference_when_cos_halves_differ():
    # The kernel must not assume cos[:R/2] == cos[R/2:] (it reads both halves, as the reference does).
    q, k, _, _ = _inputs(2, 3, 2, 1, 32, 32, seed=4)
    gen = torch.Generator().manual_seed(9)
    cos, sin = torch.randn(2, 3, 32, generator=gen), torch.randn(2, 3, 32, generator=gen)
    _compare(q, k, cos, sin)


def test_triton_rotary_reads_strided_views_of_a_fused_qkv_projection():
    bsz, seq, n_q, n_k, head_dim = 2, 5, 4, 2, 40
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(bsz, seq, (n_q + 2 * n_k) * head_dim, generator=gen)
    q, k, _ = qkv.view(bsz, seq, n_q + 2 * n_k, head_dim).split([n_q, n_k, n_k], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _cos_sin(torch.arange(seq).expand(bsz, seq), 40)
    _compare(q, k, cos, sin)


def test_triton_rotary_broadcasts_cos_sin_shared_across_the_batch():
    q, k, _, _ = _inputs(3, 4, 2, 2, 32, 32, seed=6)
    cos, sin = _cos_sin(torch.arange(4)[None], 32)
    got = _run(RotaryFunction.apply, q, k, cos, sin)
    want = _run(apply_rotary_reference, q, k, cos, sin)
    assert all(_rel_err(g, w) < 1e-5 for g, w in zip(got, want))


def test_triton_rotary_matches_reference_in_float16():
    _compare(*_inputs(2, 6, 4, 2, 64, 48, seed=8, dtype=torch.float16), tol=2e-3)


def test_triton_rotary_writes_every_output_and_gradient_element(poisoned_buffers):
    q, k, cos, sin = _inputs(2, 3, 5, 3, 80, 48, seed=2)
    for t in _run(RotaryFunction.apply, q, k, cos, sin):
        assert torch.isfinite(t).all()


def test_triton_rotary_backward_handles_a_gradient_for_q_only():
    q, k, cos, sin = _inputs(1, 4, 2, 1, 32, 32, seed=1)
    q_ref = q.clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    RotaryFunction.apply(q, k, cos, sin)[0].sum().backward()
    apply_rotary_reference(q_ref, k, cos, sin)[0].sum().backward()
    assert _rel_err(q.grad, q_ref.grad) < 1e-5


def test_rotary_takes_the_triton_path_when_kernels_are_forced(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    calls = []
    real = rope.rope_launch
    monkeypatch.setattr(rope, "rope_launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, cos, sin = _inputs(1, 3, 2, 1, 16, 16)
    for g, w in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        assert _rel_err(g, w) < 1e-6
    assert calls == [1]


def test_rotary_rejects_rotary_dims_wider_than_the_head():
    q, k, cos, sin = _inputs(1, 2, 2, 1, 16, 32)
    with pytest.raises(KernelError, match="head_dim"):
        RotaryFunction.apply(q, k, cos, sin)
