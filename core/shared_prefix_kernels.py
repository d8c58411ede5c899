"""Triton kernel of ``core/shared_prefix.py``: attention over the shared prompt slots, merged with the rest.

Imported only when the kernel runs (Triton compiles it at its first launch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefix_attention_merge(
    q_ptr, k_ptr, v_ptr, valid_ptr, rep_ptr, o2_ptr, lse2_ptr, out_ptr,
    prefix_len, scale, heads, group,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_valid_b,
    stride_o2b, stride_o2h, stride_o2g,
    stride_lb, stride_lh, stride_lg,
    stride_out_b,
    BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program per (row, query head): softmax attention of the query over the first ``prefix_len`` slots of
    its representative row's cache (masked by that row's validity bits), then merged with the attention over the
    other slots (``o2``, its log-sum-exp ``lse2``) by their log-sum-exps; writes the row's output for the head."""
    pid = tl.program_id(0)
    row = pid // heads
    head = pid % heads
    kv_head = head // group
    member = head % group
    rep = tl.load(rep_ptr + row)
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.arange(0, BLOCK_T)
    inside = slots < prefix_len
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32)
    visible = tl.load(valid_ptr + rep * stride_valid_b + slots, mask=inside, other=0) != 0
    k = tl.load(k_ptr + rep * stride_kb + kv_head * stride_kh + slots[:, None] * stride_kt + dims[None, :],
                mask=visible[:, None], other=0.0).to(tl.float32)
    scores = tl.sum(k * q[None, :], axis=1) * scale
    scores = tl.where(visible, scores, float("-inf"))
    top = tl.max(scores, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(visible, tl.exp(scores - safe_top), 0.0)
    total = tl.sum(weights, axis=0)
    v = tl.load(v_ptr + rep * stride_vb + kv_head * stride_vh + slots[:, None] * stride_vt + dims[None, :],
                mask=visible[:, None], other=0.0).to(tl.float32)
    o1 = tl.sum(weights[:, None] * v, axis=0) / tl.where(total > 0, total, 1.0)
    lse1 = tl.where(total > 0, safe_top + tl.log(total), float("-inf"))
    o2 = tl.load(o2_ptr + row * stride_o2b + kv_head * stride_o2h + member * stride_o2g + dims).to(tl.float32)
    lse2 = tl.load(lse2_ptr + row * stride_lb + kv_head * stride_lh + member * stride_lg)
    top2 = tl.maximum(lse1, lse2)
    w1 = tl.exp(lse1 - top2)
    w2 = tl.exp(lse2 - top2)
    out = (o1 * w1 + o2 * w2) / (w1 + w2)
    tl.store(out_ptr + row * stride_out_b + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))
