"""A decoder layer's q/k/v GEMM for the one-token step with the rotary and the K/V cache store in its epilogue.

Why: with :mod:`core.skinny_gemm`'s GEMM the first half of a layer was three kernels — the norm, the GEMM, and a
compiled kernel that rotates q and k and stores k and v into the cache (1.6 µs at the 7B shape, plus a gap, 30 a
step). Here the GEMM's programs do the last one themselves. Rotate-half pairs dim ``d`` with ``d + D/2``, so each
program owns ``HALF`` dims of both halves of one head (``HALF`` = 32 when D allows): its weight rows are two
slabs of the concatenated weight, which Hopper's tensor-memory accelerator reads as one ``[2·HALF, BK]`` tile of a
``[heads, 2, J, HALF, K]`` view (no copy or reordering of the weights, which the model's modules share).

The arithmetic is the compiled first half's: the GEMM's fp32 sums rounded to the dtype, the rotary in fp32 with the
sign in the sin table, rounded once. Called outside ``torch.compile`` (the step's graph capture records it).
"""

from __future__ import annotations

import torch

from .skinny_gemm import _rows_block, _tensor_descriptor, _tma_usable, load_kernels, skinny_gemm_cannot_run

__all__ = ["qkv_rope", "qkv_rope_unavailable"]

HALF = 32  # dims of each half a program owns (fewer when the head is smaller)
BK = 128
STAGES = 4


def _half(head_dim: int) -> int:
    return min(HALF, head_dim // 2)


def qkv_rope_unavailable(x: torch.Tensor, w: torch.Tensor, head_dim: int, num_heads: int, num_kv_heads: int,
                         keys: torch.Tensor) -> str | None:
    """Why :func:`qkv_rope` cannot run these shapes here, or None."""
    half = _half(head_dim)
    if half < 8 or half & (half - 1) or head_dim % (2 * half):
        return f"qkv_rope: head dim {head_dim} does not split into pairs of power-of-two slabs"
    if x.dim() != 2 or x.shape[0] > 64 or x.stride(1) != 1 or w.stride(1) != 1 or x.dtype != w.dtype:
        return "qkv_rope: needs x [M ≤ 64, K] and w [N, K] with contiguous rows of one dtype"
    if w.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim or w.shape[1] != x.shape[1]:
        return f"qkv_rope: w {tuple(w.shape)} is not the q/k/v concatenation for these heads"
    if keys.stride(-1) != 1:
        return "qkv_rope: the cache needs contiguous head dims"
    return skinny_gemm_cannot_run(x.device)


def qkv_rope(x: torch.Tensor, w: torch.Tensor, *, head_dim: int, num_heads: int, num_kv_heads: int,
             cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``x`` ``[M, K]`` (the normed hidden states) and the q/k/v weight ``w`` → rotated q ``[M, nq·D]``; the rotated
    k and the v are written into ``keys``/``values`` ``[M, nkv, L, D]`` at slot ``slot`` ``[1]``.

    ``cos_table``/``sin_table`` ``[P, D]`` by position (sin with rotate-half's sign: − on the first half),
    ``positions`` ``[M]`` each row's position. Checks: :func:`qkv_rope_unavailable` (the caller asks once)."""
    kernels = load_kernels()
    m, k = x.shape
    half = _half(head_dim)
    heads = num_heads + 2 * num_kv_heads
    pairs = heads * (head_dim // (2 * half))
    q = torch.empty((m, num_heads * head_dim), dtype=x.dtype, device=x.device)
    rows = _rows_block(m)
    common = (cos_table, sin_table, positions, q, keys, values, slot, q.stride(0), keys.stride(0), keys.stride(1),
              keys.stride(2), values.stride(0), values.stride(1), values.stride(2))
    meta = dict(NQ=num_heads, NKV=num_kv_heads, D=head_dim, HALF=half, BM=rows, BK=BK, num_warps=4,
                num_stages=STAGES)
    if _tma_usable(x, w):
        descriptor = _tensor_descriptor()
        j = head_dim // (2 * half)
        sw = w.stride(0)
        w_desc = descriptor(w, [heads, 2, j, half, k], [head_dim * sw, head_dim // 2 * sw, half * sw, sw, 1],
                            [1, 2, 1, half, BK])
        kernels.skinny_gemm_qkv_tma[(pairs,)](descriptor.from_tensor(x, [rows, BK]), w_desc, m, k, *common, **meta)
    else:
        kernels.skinny_gemm_qkv[(pairs,)](x, w, m, k, x.stride(0), w.stride(0), *common,
                                          PRECISION="ieee" if x.dtype == torch.float32 else None, **meta)
    return q
