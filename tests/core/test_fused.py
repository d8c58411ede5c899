"""The fused layer's one-row GEMVs (``matvec``): a multiply-reduce in fp32 is a GEMM's arithmetic in another order.

What the compiled one-row step relies on: ``_linear`` in its ``"matvec"`` form equals ``F.linear`` within
summation-order rounding (fp32) and within one bf16 rounding of the exact result (bf16 inputs), and the two layer
halves give the same outputs either way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.core.fused import _attention_inputs, _attention_inputs_cached, _layer_rest, _linear


def _random(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 96), k=st.integers(1, 160), seed=st.integers(0, 2**16))
def test_matvec_equals_linear_fp32(n, k, seed):
    x, w = _random((1, k), seed), _random((n, k), seed + 1)
    got = _linear(x, w, "matvec")
    assert got.shape == (1, n)
    assert torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_matvec_bf16_rounds_once_from_fp32():
    """bf16 in, bf16 out: the fp32 sum of exact products, rounded once — within one bf16 step of the fp32 GEMM."""
    x, w = (_random(s, i, torch.bfloat16) for i, s in enumerate([(1, 512), (384, 512)]))
    exact = F.linear(x.double(), w.double())
    got = _linear(x, w, "matvec")
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), exact, rtol=2 ** -8, atol=1e-6)


def test_layer_halves_matvec_equal_gemm():
    """Both halves of a LLaMA block (GQA, rope, SiLU·mul, two residuals) with one row: matvec == GEMM in fp32."""
    hidden, nq, nkv, d, inner = 64, 4, 2, 16, 96
    h = _random((1, hidden), 0)
    ln1, ln2 = 1 + 0.1 * _random((hidden,), 1), 1 + 0.1 * _random((hidden,), 2)
    qkv = _random(((nq + 2 * nkv) * d, hidden), 3) / hidden ** 0.5
    cos, sin = _random((1, 1, d), 4), _random((1, 1, d), 5)
    delta = _random((1, hidden), 10)
    plain = _attention_inputs(h, delta, ln1, 1e-6, qkv, cos, sin, nq, nkv)
    fused = _attention_inputs(h, delta, ln1, 1e-6, qkv, cos, sin, nq, nkv, gemm="matvec")
    for a, b in zip(plain, fused):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    attended = _random((1, nq * d), 6)
    o, gate_up, down = (_random(s, 7 + i) / s[1] ** 0.5 for i, s in
                        enumerate([(hidden, nq * d), (2 * inner, hidden), (hidden, inner)]))
    plain = _layer_rest(h, attended, o, ln2, 1e-6, gate_up, down)
    fused = _layer_rest(h, attended, o, ln2, 1e-6, gate_up, down, gemm="matvec")
    for a, b in zip(plain, fused):
        assert a.shape == b.shape == (1, hidden) and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_many_shapes_compile_without_hitting_dynamos_limit():
    """One compiled wrapper per function for the process: a dozen batch sizes (and layer 0 without a residual)
    compile without dynamo's recompile limit (8 by default; with fullgraph=True reaching it is an error)."""
    from janus_decoding.core.compiling import compiled

    first_half = compiled(_attention_inputs, "eager")
    hidden, nq, nkv, d = 32, 2, 1, 16
    qkv = _random(((nq + 2 * nkv) * d, hidden), 0)
    for rows in range(1, 13):
        h, cos, sin = _random((rows, hidden), rows), _random((rows, 1, d), 1), _random((rows, 1, d), 2)
        for delta in (None, _random((rows, hidden), 3)):
            out = first_half(h, delta, torch.ones(hidden), 1e-6, qkv, cos, sin, nq, nkv)
            assert torch.equal(out[1], _attention_inputs(h, delta, torch.ones(hidden), 1e-6, qkv, cos, sin, nq,
                                                         nkv)[1])


@pytest.mark.parametrize("backend", [None, "eager", "inductor"])
def test_first_half_writes_its_slot_of_the_cache(backend):
    """The first half that stores k/v (what the sdpa and flash steps use): q and h as the pure half gives them, the
    new k and v at the slot of a cache with other entries, every other slot untouched — also through Inductor,
    where the store is a scatter inside the rotary kernel and the cache is an input mutated in place."""
    from janus_decoding.core.compiling import compiled

    rows, hidden, nq, nkv, d, slots, slot = 3, 32, 4, 2, 8, 10, 6
    h, delta = _random((rows, hidden), 0), _random((rows, hidden), 1)
    qkv = _random(((nq + 2 * nkv) * d, hidden), 2) / hidden ** 0.5
    cos, sin = _random((rows, 1, d), 3), _random((rows, 1, d), 4)
    keys, values = _random((rows, nkv, slots, d), 5), _random((rows, nkv, slots, d), 6)
    keys_before, values_before = keys.clone(), values.clone()
    first = _attention_inputs_cached if backend is None else compiled(_attention_inputs_cached, backend)
    got_h, got_q = first(h, delta, torch.ones(hidden), 1e-6, qkv, cos, sin, nq, nkv, keys, values,
                         torch.tensor([slot]))
    want_h, want_q, want_k, want_v = _attention_inputs(h, delta, torch.ones(hidden), 1e-6, qkv, cos, sin, nq, nkv)
    assert torch.allclose(got_h, want_h) and torch.allclose(got_q, want_q, atol=1e-6)
    assert torch.allclose(keys[:, :, slot], want_k, atol=1e-6) and torch.allclose(values[:, :, slot], want_v, atol=1e-6)
    others = [s for s in range(slots) if s != slot]
    assert torch.equal(keys[:, :, others], keys_before[:, :, others])
    assert torch.equal(values[:, :, others], values_before[:, :, others])
