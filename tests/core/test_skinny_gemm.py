"""The Triton GEMM for a few rows (``core/skinny_gemm.py``): on CUDA, or on CPU through Triton's interpreter
(tests/conftest.py), whose ``tl.dot`` is wrong for bf16 (Triton 3.8), so the bf16 test needs CUDA.

It must equal ``F.linear`` up to summation order for every shape and launch — ragged N and K (masked tiles), K split
into parts summed in order (by its own kernel, or by the compiled graph that reads the result), SiLU·mul of the two
halves in the epilogue — and refuse what it cannot do in one line.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.core.skinny_gemm import (GemmLaunch, launch_for, skinny_gemm, skinny_gemm_cannot_run,
                                             skinny_gemm_unchecked)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(skinny_gemm_cannot_run(DEVICE) is not None, reason="no CUDA and no Triton interpreter")

LAUNCHES = st.builds(GemmLaunch, bn=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32, 64]),
                     splits=st.integers(1, 4), num_warps=st.just(4), num_stages=st.just(2))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 200), launch=LAUNCHES, seed=st.integers(0, 999))
def test_equals_linear(m, n, k, launch, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)
    got = skinny_gemm(x, w, launch)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter's tl.dot is wrong for bf16")
def test_bf16_is_one_rounding_of_the_fp32_sum():
    """bf16 in and out, K split in three: within one bf16 step of the exact product (the sum stays fp32)."""
    gen = torch.Generator().manual_seed(1)
    x, w = (torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16) for s in [(32, 384), (96, 384)])
    got = skinny_gemm(x, w, GemmLaunch(bn=32, bk=64, splits=3, num_stages=2))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double()), rtol=2 ** -8, atol=1e-6)
    assert torch.equal(got, skinny_gemm(x, w, GemmLaunch(bn=32, bk=64, splits=3, num_stages=2)))  # bit for bit


def test_a_strided_view_of_concatenated_weights():
    """The fused layers hand it row views of a concatenation (q/k/v): rows with a stride, not a copy."""
    gen = torch.Generator().manual_seed(2)
    fused = torch.randn(3 * 48, 80, generator=gen).to(DEVICE)
    x = torch.randn(5, 80, generator=gen).to(DEVICE)
    part = fused[48:96]
    torch.testing.assert_close(skinny_gemm(x, part), F.linear(x, part), rtol=1e-5, atol=1e-4)


def test_launch_rule():
    """K split only where K > N (the down projection), or K = N when the caller sums the parts (compiled), into as
    many parts as bring the programs to ~128."""
    assert launch_for(12288, 4096).splits == 1 and launch_for(4096, 4096).splits == 1
    assert launch_for(4096, 4096, caller_sums=True).splits == 2
    assert launch_for(12288, 4096, caller_sums=True).splits == 1
    assert launch_for(4096, 11008).splits == 2 and launch_for(2048, 5632).splits == 4
    assert launch_for(64, 9000).splits == 4
    # more programs asked for: the output and down projections at the 7B shape in four parts (256 programs)
    assert launch_for(4096, 4096, caller_sums=True, programs=256).splits == 4
    assert launch_for(4096, 11008, programs=256).splits == 4 and launch_for(4096, 4096, programs=256).splits == 1
    # gate/up with SiLU·mul: 64 + 64 rows a program where that still fills an H200's 132 multiprocessors
    assert launch_for(22016, 4096, glu=True) == GemmLaunch(bn=128, bk=64, num_stages=4)
    assert launch_for(11264, 2048, glu=True) == GemmLaunch(bn=64, bk=128, num_stages=4)


def _glu_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate_up = F.linear(x, w)
    inner = w.shape[0] // 2
    return F.silu(gate_up[:, :inner]) * gate_up[:, inner:]


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 40), inner=st.integers(1, 90), k=st.integers(1, 200), bn=st.sampled_from([32, 64, 128]),
       bk=st.sampled_from([16, 64]), seed=st.integers(0, 999))
def test_glu_epilogue_equals_silu_of_gate_times_up(m, inner, k, bn, bk, seed):
    """``[gate; up]`` weights, ragged in rows, inner size and K: the epilogue's SiLU·mul equals the unfused ops."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(2 * inner, k, generator=gen).to(DEVICE)
    got = skinny_gemm(x, w, GemmLaunch(bn=bn, bk=bk, num_stages=2), glu=True)
    assert got.shape == (m, inner)
    torch.testing.assert_close(got, _glu_reference(x, w), rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter's tl.dot is wrong for bf16")
def test_glu_bf16_rounds_as_the_unfused_ops():
    """bf16: each product rounded, SiLU's result rounded, then the product — as F.silu(g) * u on bf16 tensors."""
    gen = torch.Generator().manual_seed(3)
    x, w = (torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16) for s in [(32, 512), (2 * 384, 512)])
    got = skinny_gemm(x, w, GemmLaunch(bn=64, bk=128), glu=True)
    reference = _glu_reference(x, w)
    assert (got.float() - reference.float()).abs().max() <= 2 ** -7 * reference.float().abs().max()


def test_split_parts_summed_by_the_compiled_caller():
    """Inside torch.compile the split GEMM hands its fp32 parts to the graph, which sums them (Inductor folds that
    into the next kernel): the same numbers as the kernel's own ordered sum, and as F.linear."""
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(8, 256, generator=gen).to(DEVICE), torch.randn(48, 256, generator=gen).to(DEVICE)
    launch = GemmLaunch(bn=16, bk=64, splits=2, num_stages=2)

    def layer(x, w, residual):
        return residual + skinny_gemm_unchecked(x, w, launch)

    residual = torch.randn(8, 48, generator=gen).to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, residual)
    assert torch.equal(got, layer(x, w, residual))
    torch.testing.assert_close(got, residual + F.linear(x, w), rtol=1e-5, atol=1e-4)
    graph_ops = []

    def count_ops(gm, inputs):
        graph_ops.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(layer, backend=count_ops, fullgraph=True)(x, w, residual)
    assert any("skinny_gemm" in op for op in graph_ops) and any("sum" in op for op in graph_ops)


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.get_device_capability() < (9, 0), reason="TMA needs Hopper")
def test_tma_kernels_give_the_same_bits():
    """Through the tensor-memory accelerator: the same products in the same order, so the same bits as the pointer
    kernels — split, ragged rows and K (zero-filled by the TMA), a strided weight view, and the SiLU·mul epilogue."""
    gen = torch.Generator().manual_seed(5)
    x, w = (torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16) for s in [(32, 512), (512, 512)])
    for launch in (GemmLaunch(bn=64, bk=128, splits=2), GemmLaunch(bn=64, bk=128)):
        tma = dataclasses.replace(launch, tma=True)
        assert torch.equal(skinny_gemm(x, w, tma), skinny_gemm(x, w, launch))
        assert torch.equal(skinny_gemm(x[:5, :384], w[:, :384], tma), skinny_gemm(x[:5, :384], w[:, :384], launch))
        assert torch.equal(skinny_gemm(x, w[:200], tma, glu=True), skinny_gemm(x, w[:200], launch, glu=True))


@pytest.mark.parametrize("x, w, match", [
    (torch.zeros(2, 8), torch.zeros(4, 9), "needs x"),
    (torch.zeros(65, 8), torch.zeros(4, 8), "at most 64 rows"),
    (torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.float64), "x is torch.float32"),
    (torch.zeros(8, 2).t(), torch.zeros(4, 8), "contiguous rows"),
    (torch.zeros(2, 8), torch.zeros(5, 8), "even row count"),
])
def test_refuses_in_one_line(x, w, match):
    with pytest.raises(ValueError, match=match):
        skinny_gemm(x, w, glu=match == "even row count")


def test_launch_is_checked():
    with pytest.raises(ValueError, match="bn"):
        GemmLaunch(bn=48)
    with pytest.raises(ValueError, match="splits"):
        GemmLaunch(splits=0)
