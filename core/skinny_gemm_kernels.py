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


@triton.jit
def _qkv_epilogue(acc, pair, M, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, sqm, skb, skh, skl, svb,
                  svh, svl, NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr):
    """Program ``pair`` = (head, j) of :func:`skinny_gemm_qkv`: ``acc`` ``[2·HALF, BM]`` holds dims
    ``j·HALF + i`` (rows ``:HALF``) and ``D/2 + j·HALF + i`` (rows ``HALF:``) of the head for every row.

    Rounded to the output dtype as the GEMM's result, then — for q and k heads — rotated (rotate-half rotary:
    ``a·cos + b·sin`` and ``b·cos + a·sin`` with the sign carried by the sin table, computed in fp32 and rounded
    once, as the compiled rotary does), and stored: q into ``q`` ``[M, NQ·D]``, k and v into the layer's cache at
    the slot ``slot_ptr`` holds."""
    J: tl.constexpr = D // (2 * HALF)
    head = pair // J
    j = pair % J
    dtype = q_ptr.dtype.element_ty
    acc = acc.to(dtype).to(tl.float32)
    a, b = tl.split(tl.permute(tl.reshape(acc, [2, HALF, BM]), (1, 2, 0)))  # [HALF, BM] each
    a = tl.trans(a)  # [BM, HALF]
    b = tl.trans(b)
    rm = tl.arange(0, BM)[:, None]
    da = j * HALF + tl.arange(0, HALF)[None, :]  # [1, HALF]
    db = da + D // 2
    ok = rm < M
    if head < NQ + NKV:  # q or k: the rotary at each row's position
        pos = tl.load(pos_ptr + rm, mask=ok, other=0)  # [BM, 1]
        cos_a = tl.load(cos_ptr + pos * D + da, mask=ok, other=0.0).to(tl.float32)
        sin_a = tl.load(sin_ptr + pos * D + da, mask=ok, other=0.0).to(tl.float32)
        cos_b = tl.load(cos_ptr + pos * D + db, mask=ok, other=0.0).to(tl.float32)
        sin_b = tl.load(sin_ptr + pos * D + db, mask=ok, other=0.0).to(tl.float32)
        a, b = a * cos_a + b * sin_a, b * cos_b + a * sin_b
    if head < NQ:
        base = q_ptr + rm * sqm + head * D
    else:
        slot = tl.load(slot_ptr)
        if head < NQ + NKV:
            base = k_ptr + rm * skb + (head - NQ) * skh + slot * skl
        else:
            base = v_ptr + rm * svb + (head - NQ - NKV) * svh + slot * svl
    tl.store(base + da, a.to(dtype), mask=ok)
    tl.store(base + db, b.to(dtype), mask=ok)


@triton.jit
def skinny_gemm_qkv(x_ptr, w_ptr, M, K, sxm, swn, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, sqm, skb,
                    skh, skl, svb, svh, svl, NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """A decoder layer's q/k/v GEMM with the rotary and the cache store in its epilogue (``w`` the ``[(NQ + 2·NKV)·D,
    K]`` concatenation, one program per (head, j)): the rows of the program's weight tile are the two halves'
    dims ``j·HALF …`` and ``D/2 + j·HALF …`` of one head, so that every rotary pair is in one program.
    See :func:`_qkv_epilogue`."""
    pair = tl.program_id(0)
    J: tl.constexpr = D // (2 * HALF)
    head = pair // J
    j = pair % J
    r = tl.arange(0, 2 * HALF)
    rows = head * D + (r // HALF) * (D // 2) + j * HALF + r % HALF  # [2·HALF] weight rows
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :]
    w_ptrs = w_ptr + rows[:, None] * swn + rk[None, :]
    row_ok = rm[:, None] < M
    acc = tl.zeros((2 * HALF, BM), dtype=tl.float32)
    for k in range(0, K, BK):
        k_ok = (k + rk)[None, :] < K
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        x_ptrs += BK
        w_ptrs += BK
    _qkv_epilogue(acc, pair, M, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, sqm, skb, skh, skl, svb,
                  svh, svl, NQ, NKV, D, HALF, BM)


@triton.jit
def skinny_gemm_qkv_tma(x_desc, w_desc, M, K, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, sqm, skb,
                        skh, skl, svb, svh, svl, NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr):
    """:func:`skinny_gemm_qkv` with the tiles brought in by the tensor-memory accelerator: ``w_desc`` describes
    the weight as ``[heads, 2, J, HALF, K]`` (head, half, j, dim, k), whose ``[1, 2, 1, HALF, BK]`` block is the
    program's two slabs, one ``[2·HALF, BK]`` tile in shared memory."""
    pair = tl.program_id(0)
    J: tl.constexpr = D // (2 * HALF)
    head = pair // J
    j = pair % J
    acc = tl.zeros((2 * HALF, BM), dtype=tl.float32)
    for k in range(0, K, BK):
        w = w_desc.load([head, 0, j, 0, k]).reshape(2 * HALF, BK)
        x = x_desc.load([0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    _qkv_epilogue(acc, pair, M, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, sqm, skb, skh, skl, svb,
                  svh, svl, NQ, NKV, D, HALF, BM)
