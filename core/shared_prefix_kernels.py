"""Triton kernel of ``core/shared_prefix.py``: attention over a shared prompt's slots, merged with the rest.

Imported only when the kernel runs (Triton compiles it at its first launch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefix_attention_merge(
    q_ptr, k_ptr, v_ptr, valid_ptr, members_ptr, first_ptr, o2_ptr, lse2_ptr, out_ptr,
    prefix_len, scale, group,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_valid_b,
    stride_o2b, stride_o2h, stride_o2g,
    stride_lb, stride_lh, stride_lg,
    stride_out_b,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program per (distinct prompt, query head): the queries of the prompt's rows (``ROWS``, padded with -1)
    against the first ``prefix_len`` slots of its representative row (masked by that row's validity bits), two
    tensor-core products, then each row merged with its attention over the other slots (``o2``, log-sum-exp
    ``lse2``) by the two log-sum-exps; writes the rows' outputs for the head."""
    prompt = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    member = head % group
    rows = tl.load(members_ptr + prompt * ROWS + tl.arange(0, ROWS))
    used = rows >= 0
    rows = tl.where(used, rows, 0)
    rep = tl.load(first_ptr + prompt)
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.arange(0, BLOCK_T)
    inside = slots < prefix_len
    visible = tl.load(valid_ptr + rep * stride_valid_b + slots, mask=inside, other=0) != 0
    q = tl.load(q_ptr + rows[:, None] * stride_qb + head * stride_qh + dims[None, :], mask=used[:, None], other=0.0)
    k = tl.load(k_ptr + rep * stride_kb + kv_head * stride_kh + slots[:, None] * stride_kt + dims[None, :],
                mask=inside[:, None], other=0.0)
    v = tl.load(v_ptr + rep * stride_vb + kv_head * stride_vh + slots[:, None] * stride_vt + dims[None, :],
                mask=inside[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK_T] fp32
    scores = tl.where(visible[None, :], scores, float("-inf"))
    top = tl.max(scores, axis=1)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(visible[None, :], tl.exp(scores - safe_top[:, None]), 0.0)
    total = tl.sum(weights, axis=1)
    o1 = tl.dot(weights.to(v.dtype), v) / tl.where(total > 0, total, 1.0)[:, None]  # [ROWS, HEAD_DIM] fp32
    lse1 = tl.where(total > 0, safe_top + tl.log(total), float("-inf"))
    o2 = tl.load(o2_ptr + rows[:, None] * stride_o2b + kv_head * stride_o2h + member * stride_o2g + dims[None, :],
                 mask=used[:, None], other=0.0).to(tl.float32)
    lse2 = tl.load(lse2_ptr + rows * stride_lb + kv_head * stride_lh + member * stride_lg, mask=used, other=0.0)
    top2 = tl.maximum(lse1, lse2)
    w1 = tl.exp(lse1 - top2)
    w2 = tl.exp(lse2 - top2)
    out = (o1 * w1[:, None] + o2 * w2[:, None]) / (w1 + w2)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out_b + head * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=used[:, None])
