"""The q/k/v GEMM with the rotary and the cache store in its epilogue (``core/qkv_rope.py``) gives what the
fused layer's first half gives: the same q, and k and v in the cache at the slot and nowhere else. On CPU the
Triton kernel runs in the interpreter (fp32); on CUDA also through the tensor-memory accelerator (bf16)."""

from __future__ import annotations

import pytest
import torch

from janus_decoding.core.fused import _attention_inputs, rms_norm
from janus_decoding.core.qkv_rope import qkv_rope, qkv_rope_unavailable
from janus_decoding.core.triton_support import triton_cannot_run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(triton_cannot_run(DEVICE) is not None, reason="Triton cannot run here")


def _case(rows, hidden, nq, nkv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen)
    ln = 1 + 0.1 * torch.randn(hidden, generator=gen)
    w = torch.randn((nq + 2 * nkv) * d, hidden, generator=gen) / hidden**0.5
    positions = torch.randint(0, 40, (rows,), generator=gen)
    angles = torch.rand(48, d // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)  # rotate-half's sign carried by the table
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in (h, ln, w, cos, sin, positions)]


@pytest.mark.parametrize("rows, hidden, nq, nkv, d", [(5, 64, 4, 2, 16), (32, 128, 2, 2, 64), (3, 64, 2, 1, 128)])
def test_equals_the_first_half_and_writes_only_the_slot(rows, hidden, nq, nkv, d):
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    h, ln, w, cos, sin, positions = _case(rows, hidden, nq, nkv, d, dtype)
    _, q_ref, k_ref, v_ref = _attention_inputs(h, None, ln, 1e-6, w, cos[positions][:, None], sin[positions][:, None],
                                               nq, nkv)
    x = rms_norm(h, ln, 1e-6)
    length, slot = 9, torch.tensor([6], device=DEVICE)
    keys = torch.full((rows, nkv, length, d), 7.0, dtype=dtype, device=DEVICE)
    values = torch.full_like(keys, 7.0)
    assert qkv_rope_unavailable(x, w, d, nq, nkv, keys) is None
    q = qkv_rope(x, w, head_dim=d, num_heads=nq, num_kv_heads=nkv, cos_table=cos, sin_table=sin, positions=positions,
                 keys=keys, values=values, slot=slot)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q.view(rows, nq, d), q_ref, **tol)
    torch.testing.assert_close(keys[:, :, 6], k_ref, **tol)
    torch.testing.assert_close(values[:, :, 6], v_ref, **tol)
    others = torch.arange(length, device=DEVICE) != 6
    assert bool((keys[:, :, others] == 7).all()) and bool((values[:, :, others] == 7).all())


def test_refuses_what_it_cannot_pair():
    x, w = torch.zeros(2, 8), torch.zeros(3 * 12, 8)
    assert "pairs" in qkv_rope_unavailable(x, w, 12, 1, 1, torch.zeros(2, 1, 4, 12))
    assert "concatenation" in qkv_rope_unavailable(x, torch.zeros(5 * 16, 8), 16, 1, 1, torch.zeros(2, 1, 4, 16))
