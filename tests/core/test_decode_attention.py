"""The Triton decode attention (core/decode_attention.py) against its plain-torch contract.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); on CUDA they
run compiled. Either way they must write the new key/value at the slot and nowhere else, attend over exactly the
filled, visible slots, and agree with ``decode_attention_reference``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.core.decode_attention import (Launch, decode_attention, decode_attention_reference,
                                                  decode_attention_unavailable)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(decode_attention_unavailable(DEVICE, 64) is not None,
                                reason=str(decode_attention_unavailable(DEVICE, 64)))


def _case(seed: int, b: int, nkv: int, group: int, d: int, length: int, slot: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    nq = nkv * group
    # q, k, v as views of one projection output, as the fused layer hands them over (strided, last dim contiguous)
    qkv = torch.randn(b, nq + 2 * nkv, d, generator=g).to(DEVICE, dtype)
    q, k, v = qkv[:, :nq], qkv[:, nq: nq + nkv], qkv[:, nq + nkv:]
    keys = torch.randn(b, nkv, length, d, generator=g).to(DEVICE, dtype)
    values = torch.randn(b, nkv, length, d, generator=g).to(DEVICE, dtype)
    valid = (torch.rand(b, length, generator=g) > 0.3).to(DEVICE)
    valid[:, slot] = True  # the loop marks the slot written now visible before attention
    return q, k, v, keys, values, valid, torch.tensor([slot], device=DEVICE)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 3), nkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 32]), length=st.integers(1, 80), where=st.floats(0, 1), block=st.sampled_from([16, 32]),
       dot=st.booleans())
def test_equals_the_reference_fp32(seed, b, nkv, group, d, length, where, block, dot):
    slot = min(int(where * length), length - 1)
    q, k, v, keys, values, valid, s = _case(seed, b, nkv, group, d, length, slot, torch.float32)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = decode_attention_reference(q, k, v, ref_keys, ref_values, valid, s, 0.3)
    out = decode_attention(q, k, v, keys, values, valid, s, 0.3, Launch(block, 16, dot=dot))  # chunk 32: 2 blocks
    assert out.shape == (b, nkv * group * d) and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)  # written at the slot, nowhere else


# Triton's interpreter multiplies bf16 tl.dot operands wrongly (it reinterprets their bits): the tensor-core path
# in bf16 is checked on CUDA only.
DOTS = [False, True] if DEVICE.type == "cuda" else [False]


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("slot", [0, 15, 16, 63, 99])
def test_bf16_within_rounding_of_the_fp32_reference(slot, dot):
    q, k, v, keys, values, valid, s = _case(slot, 2, 2, 2, 64, 100, slot, torch.bfloat16)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = decode_attention_reference(q.float(), k.float(), v.float(), ref_keys.float(), ref_values.float(),
                                          valid, s, 0.125)
    out = decode_attention(q, k, v, keys, values, valid, s, 0.125, Launch(32, 16, dot=dot))
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-2)
    assert torch.equal(keys[:, :, slot], k) and torch.equal(values[:, :, slot], v)


def test_slots_past_the_write_slot_are_never_read():
    """Garbage (NaN, inf) after the slot, even marked valid, cannot reach the output: reads stop at the slot."""
    q, k, v, keys, values, valid, s = _case(1, 2, 2, 1, 32, 64, 20, torch.float32)
    clean = decode_attention(q, k, v, keys.clone(), values.clone(), valid, s, 0.2, Launch(16, 16))
    keys[:, :, 21:], values[:, :, 21:] = float("nan"), float("inf")
    valid[:, 21:] = True
    assert torch.equal(decode_attention(q, k, v, keys, values, valid, s, 0.2, Launch(16, 16)), clean)


def test_a_row_that_sees_only_the_new_slot_returns_its_value():
    q, k, v, keys, values, valid, s = _case(2, 2, 1, 1, 16, 40, 33, torch.float32)
    valid[0] = False
    valid[0, 33] = True  # row 0: left padding up to the slot (its blocks before it are wholly masked)
    out = decode_attention(q, k, v, keys, values, valid, s, 1.0, Launch(16, 16))
    torch.testing.assert_close(out[0], v[0, 0])


def test_launch_sizes_are_checked():
    """Tensor cores need 16 slots a block: smaller blocks are refused, not miscompiled."""
    with pytest.raises(ValueError, match="`block` must be a power of two >= 16"):
        Launch(32, 8)
    with pytest.raises(ValueError, match="`chunk` must be a power of two"):
        Launch(48, 16)
    with pytest.raises(ValueError, match="must not exceed"):
        Launch(32, 64)


def test_reasons_it_cannot_run():
    assert "power of two" in decode_attention_unavailable(DEVICE, 80)
    assert decode_attention_unavailable(DEVICE, 64) is None
