"""The Triton kernels of :mod:`core.skinny_gemm` (``x @ w.T`` for a few rows ``x`` and a large weight ``w``).

A module of their own so that :mod:`core.skinny_gemm` imports without Triton; the contract, the launch settings and
why these kernels exist are documented there.
"""

import triton
import triton.language as tl


@triton.jit
def skinny_gemm_partial(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, sxm, swn, som, sos,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WEIGHT_MAJOR: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Program (n tile, split): ``out[split, :M, tile] = x[:M, ks] @ w[tile, ks].T`` over the split's ``k_per_split``
    columns ``ks`` (a multiple of BK), accumulated in fp32 in one fixed order. ``WEIGHT_MAJOR``: the product is
    formed as ``w @ x.T`` (the weight tile as the MMA's first operand, as cuBLAS does), else ``x @ w.T``.
    ``PRECISION``: ``"ieee"`` for fp32 inputs (no TF32), None for bf16/fp16."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rn = tile * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    rk = k_start + tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rn[:, None] * swn + rk[None, :]  # [BN, BK]
    row_ok = rm[:, None] < M
    col_ok = rn[:, None] < N
    if WEIGHT_MAJOR:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k_start, k_stop, BK):
        k_ok = (k + tl.arange(0, BK))[None, :] < k_stop
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        if WEIGHT_MAJOR:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BK
        w_ptrs += BK
    out = out_ptr + split * sos + rm[:, None] * som + rn[None, :]
    if WEIGHT_MAJOR:
        acc = tl.trans(acc)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok & (rn[None, :] < N))


@triton.jit
def skinny_gemm_sum(part_ptr, y_ptr, M, N, sps, spm, sym, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[:M, :N] = Σ_split part[split]`` in split order (fp32, then the output dtype): a fixed order, so a split
    GEMM repeats bit for bit."""
    start = tl.program_id(0) * BLOCK
    flat = start + tl.arange(0, BLOCK)
    m = flat // N
    n = flat % N
    ok = m < M
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        total += tl.load(part_ptr + split * sps + m * spm + n, mask=ok, other=0.0)
    tl.store(y_ptr + m * sym + n, total.to(y_ptr.dtype.element_ty), mask=ok)
