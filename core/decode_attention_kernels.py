"""The Triton kernels of :mod:`core.decode_attention` (split-KV decoding for one new token per row).

A module of their own because Triton resolves the helpers a kernel calls among the module's globals, and
:mod:`core.decode_attention` must import without Triton; it imports this one at the first launch. The contract,
the launch settings and why these kernels exist are documented there.
"""

import triton
import triton.language as tl


@triton.jit
def load_block(k_rows, v_rows, valid_row, k_new, v_new, start, end, slot, skc_l, svc_l, dim,
               BLOCK: tl.constexpr):
    """Cache slots ``start .. start+BLOCK`` of one (row, kv head): K and V ``[BLOCK, D]`` in the cache's dtype
    with the new entry in place of the write slot (used from registers, not read back), and which slots this
    row sees (valid and before ``end``)."""
    pos = start + tl.arange(0, BLOCK)
    inside = pos < end
    k = tl.load(k_rows + pos[:, None] * skc_l + dim[None, :], mask=inside[:, None], other=0.0)
    v = tl.load(v_rows + pos[:, None] * svc_l + dim[None, :], mask=inside[:, None], other=0.0)
    here = (pos == slot)[:, None]
    k = tl.where(here, k_new[None, :].to(k.dtype), k)
    v = tl.where(here, v_new[None, :].to(v.dtype), v)
    seen = (tl.load(valid_row + pos, mask=inside, other=0) != 0) & inside
    return k, v, seen


@triton.jit
def decode_attention_split(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
                           scale, sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
                           sval_b, NQ: tl.constexpr, SPLITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """One (row, query head, chunk of CHUNK slots): online softmax over BLOCK slots at a time. DOT: the two
    products on tensor cores, the one query padded to 16 rows (K and V stay bf16 and go through shared memory);
    otherwise as fp32 elementwise products and reductions."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kvh = head // GROUP
    slot = tl.load(slot_ptr)
    first = split * CHUNK
    if first > slot:  # a chunk past the filled slots: nothing to read (the merge never looks at it)
        return
    end = tl.minimum(first + CHUNK, slot + 1)
    dim = tl.arange(0, D)
    k_new = tl.load(kn_ptr + b * skn_b + kvh * skn_h + dim)
    v_new = tl.load(vn_ptr + b * svn_b + kvh * svn_h + dim)
    k_rows = kc_ptr + b * skc_b + kvh * skc_h
    v_rows = vc_ptr + b * svc_b + kvh * svc_h
    if (slot < first + CHUNK) & (head % GROUP == 0):  # this chunk holds the write slot: store the new entry
        tl.store(k_rows + slot * skc_l + dim, k_new.to(kc_ptr.dtype.element_ty))
        tl.store(v_rows + slot * svc_l + dim, v_new.to(vc_ptr.dtype.element_ty))
    if DOT:
        pad = tl.arange(0, 16)
        q16 = tl.load(q_ptr + b * sq_b + head * sq_h + dim[None, :] + 0 * pad[:, None], mask=pad[:, None] == 0,
                      other=0.0)  # [16, D]: the query in row 0
        top16 = tl.full([16], -float("inf"), tl.float32)
        total16 = tl.zeros([16], dtype=tl.float32)
        acc16 = tl.zeros([16, D], dtype=tl.float32)
        for start in range(first, end, BLOCK):
            k, v, seen = load_block(k_rows, v_rows, valid_ptr + b * sval_b, k_new, v_new, start, end, slot, skc_l,
                                    svc_l, dim, BLOCK)
            s16 = tl.dot(q16.to(k.dtype), tl.trans(k), input_precision=PRECISION) * scale  # [16, BLOCK]
            s16 = tl.where(seen[None, :], s16, -float("inf"))
            new16 = tl.maximum(top16, tl.max(s16, axis=1))
            safe16 = tl.where(new16 == -float("inf"), 0.0, new16)
            rescale16 = tl.exp(top16 - safe16)
            p16 = tl.exp(s16 - safe16[:, None])
            total16 = total16 * rescale16 + tl.sum(p16, axis=1)
            acc16 = acc16 * rescale16[:, None] + tl.dot(p16.to(v.dtype), v, input_precision=PRECISION)
            top16 = new16
        out = (b * NQ + head) * SPLITS + split
        first_row = pad == 0
        tl.store(m_ptr + out + 0 * pad, top16, mask=first_row)
        tl.store(l_ptr + out + 0 * pad, total16, mask=first_row)
        tl.store(acc_ptr + out * D + dim[None, :] + 0 * pad[:, None], acc16, mask=first_row[:, None])
        return
    q = tl.load(q_ptr + b * sq_b + head * sq_h + dim).to(tl.float32) * scale
    top = -float("inf")
    total = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        k, v, seen = load_block(k_rows, v_rows, valid_ptr + b * sval_b, k_new, v_new, start, end, slot, skc_l,
                                svc_l, dim, BLOCK)
        k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.where(seen, tl.sum(k * q[None, :], axis=1), -float("inf"))
        new_top = tl.maximum(top, tl.max(s, axis=0))
        safe = tl.where(new_top == -float("inf"), 0.0, new_top)  # all masked so far: keep zeros, not NaN
        rescale = tl.exp(top - safe)
        p = tl.exp(s - safe)
        total = total * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        top = new_top
    out = (b * NQ + head) * SPLITS + split
    tl.store(m_ptr + out, top)
    tl.store(l_ptr + out, total)
    tl.store(acc_ptr + out * D + dim, acc)


@triton.jit
def decode_attention_merge(m_ptr, l_ptr, acc_ptr, slot_ptr, out_ptr, so_b, NQ: tl.constexpr,
                           SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr)
    chunks = tl.arange(0, SPLITS_P2)
    used = chunks <= slot // CHUNK
    dim = tl.arange(0, D)
    base = (b * NQ + head) * SPLITS
    m = tl.load(m_ptr + base + chunks, mask=used, other=-float("inf"))
    l = tl.load(l_ptr + base + chunks, mask=used, other=0.0)
    acc = tl.load(acc_ptr + (base + chunks)[:, None] * D + dim[None, :], mask=used[:, None], other=0.0)
    top = tl.max(m, axis=0)  # finite: the slot written now is visible to its row
    w = tl.where(used, tl.exp(m - top), 0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + b * so_b + head * D + dim, out.to(out_ptr.dtype.element_ty))
