"""The Triton kernels of :mod:`core.skinny_gemm` (``x @ w.T`` for a few rows ``x`` and a large weight ``w``).

A module of their own so that :mod:`core.skinny_gemm` imports without Triton; the contract, the launch settings and
why these kernels exist are documented there.

The kernels form the product weight-major (``w_tile @ x.T``: the weight tile is the MMA's first operand, as cuBLAS
does at few rows).
"""

import triton
import triton.language as tl


@triton.jit
def skinny_gemm_partial(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, sxm, swn, som, sos,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Program (n tile, split): ``out[split, :M, tile] = x[:M, ks] @ w[tile, ks].T`` over the split's ``k_per_split``
    columns ``ks`` (a multiple of BK), accumulated in fp32 in one fixed order, stored in ``out``'s dtype.
    ``PRECISION``: ``"ieee"`` for fp32 inputs (no TF32), None for bf16/fp16."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rn = tile * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + rm[:, None] * sxm + (k_start + rk)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rn[:, None] * swn + (k_start + rk)[None, :]  # [BN, BK]
    row_ok = rm[:, None] < M
    col_ok = rn[:, None] < N
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k in range(k_start, k_stop, BK):
        k_ok = (k + rk)[None, :] < k_stop
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        x_ptrs += BK
        w_ptrs += BK
    out = out_ptr + split * sos + rm[:, None] * som + rn[None, :]
    tl.store(out, tl.trans(acc).to(out_ptr.dtype.element_ty), mask=row_ok & (rn[None, :] < N))


@triton.jit
def skinny_gemm_glu(x_ptr, w_ptr, out_ptr, M, INNER, K, sxm, swn, som, BM: tl.constexpr, BH: tl.constexpr,
                    BK: tl.constexpr, PRECISION: tl.constexpr):
    """A LLaMA MLP's gate/up GEMM with SiLU·mul in its epilogue: ``w`` is ``[gate; up]`` (``2·INNER`` rows), and
    program ``tile`` computes gate rows ``tile·BH …`` and the same up rows, then stores
    ``silu(gate) · up`` ``[:M, tile]`` — the ``[M, 2·INNER]`` product never goes through memory.

    Rounded as the unfused ops round: each product to the output dtype, SiLU's result to it, then the product."""
    tile = tl.program_id(0)
    rn = tile * BH + tl.arange(0, BH)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :]
    g_ptrs = w_ptr + rn[:, None] * swn + rk[None, :]
    u_ptrs = g_ptrs + INNER * swn
    row_ok = rm[:, None] < M
    col_ok = rn[:, None] < INNER
    acc_g = tl.zeros((BH, BM), dtype=tl.float32)
    acc_u = tl.zeros((BH, BM), dtype=tl.float32)
    for k in range(0, K, BK):
        k_ok = (k + rk)[None, :] < K
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        g = tl.load(g_ptrs, mask=col_ok & k_ok, other=0.0)
        u = tl.load(u_ptrs, mask=col_ok & k_ok, other=0.0)
        acc_g = tl.dot(g, tl.trans(x), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(u, tl.trans(x), acc_u, input_precision=PRECISION)
        x_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    dtype = out_ptr.dtype.element_ty
    gate = tl.trans(acc_g).to(dtype).to(tl.float32)
    up = tl.trans(acc_u).to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    out = out_ptr + rm[:, None] * som + rn[None, :]
    tl.store(out, (act * up).to(dtype), mask=row_ok & (rn[None, :] < INNER))


@triton.jit
def skinny_gemm_tma(x_desc, w_desc, out_ptr, M, N, K, k_per_split, som, sos, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    """:func:`skinny_gemm_partial` (bf16/fp16) with the tiles brought in by the Hopper tensor-memory accelerator
    (host-built descriptors of ``x`` ``[M, K]`` and ``w`` ``[N, K]``): one instruction a tile instead of per-thread
    address arithmetic, and out-of-range rows and columns read as zeros."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k in range(k_start, k_stop, BK):
        w = w_desc.load([tile * BN, k])
        x = x_desc.load([0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    rn = tile * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    out = out_ptr + split * sos + rm[:, None] * som + rn[None, :]
    tl.store(out, tl.trans(acc).to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def skinny_gemm_glu_tma(x_desc, w_desc, out_ptr, M, INNER, K, som, BM: tl.constexpr, BH: tl.constexpr,
                        BK: tl.constexpr):
    """:func:`skinny_gemm_glu` with the tiles brought in by the tensor-memory accelerator (see
    :func:`skinny_gemm_tma`); ``w_desc``'s block is ``[BH, BK]``, its gate rows at ``tile·BH`` and up rows
    ``INNER`` further."""
    tile = tl.program_id(0)
    acc_g = tl.zeros((BH, BM), dtype=tl.float32)
    acc_u = tl.zeros((BH, BM), dtype=tl.float32)
    for k in range(0, K, BK):
        x = x_desc.load([0, k])
        g = w_desc.load([tile * BH, k])
        u = w_desc.load([INNER + tile * BH, k])
        acc_g = tl.dot(g, tl.trans(x), acc_g)
        acc_u = tl.dot(u, tl.trans(x), acc_u)
    dtype = out_ptr.dtype.element_ty
    gate = tl.trans(acc_g).to(dtype).to(tl.float32)
    up = tl.trans(acc_u).to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    rn = tile * BH + tl.arange(0, BH)
    rm = tl.arange(0, BM)
    out = out_ptr + rm[:, None] * som + rn[None, :]
    tl.store(out, (act * up).to(dtype), mask=(rm[:, None] < M) & (rn[None, :] < INNER))


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
