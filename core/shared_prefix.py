"""Decode attention when rows share their prompt: the prompt's slots read once per distinct prompt, not per row.

The 16 images of one prompt with CFG hold two distinct prompts (the prompt and the unconditional one) in 32 rows,
and the prefill writes the same keys and values into every row of a prompt (``core.loop.distinct_rows``). A step's
attention splits at the prompt's end (cascade attention): the generated slots of each row through SDPA's cuDNN
kernel, which also returns the log-sum-exp of its scores (:func:`suffix_attention`); the prompt slots of each row's
representative (the row the prefill ran) in one small kernel that also merges the two parts by their log-sum-exps
(:func:`prefix_attention_merge`) — softmax over the union, as one attention would give, with the suffix's output
rounded to the dtype once more. The kernel runs a program per (distinct prompt, query head): the queries of all the
prompt's rows against its slots on tensor cores.

Why: at the 7B shape the 46 prompt slots are ~13 % of the keys and values a step reads (24 MB a layer); read from
the cache of two rows instead of 32, they stay in L2. A first kernel with a program per (row, head) and fp32
products took 11.8 µs a layer, more than cuDNN saved (149 µs a step); this one reads each prompt's slots once.

``prefix_attention_merge_reference`` and the math path of :func:`suffix_attention` are the same contract in torch
(what runs without CUDA and what the tests hold the kernel to).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .triton_support import triton_cannot_run

__all__ = ["PrefixRows", "prefix_attention_merge", "prefix_attention_merge_reference", "suffix_attention"]


@dataclass
class PrefixRows:
    """Which rows share a prompt (from the prefill's ``core.prompt_rows.DistinctRows``), as the kernel reads it.

    ``representative`` ``[B]``: the cache row holding each row's prompt entries; ``members`` ``[U, M]`` int32: the
    rows of each distinct prompt, padded with -1 to M (a power of two, at least 16: a tensor-core tile); ``first``
    ``[U]`` int32: each distinct prompt's representative."""

    representative: torch.Tensor
    members: torch.Tensor
    first: torch.Tensor

    @classmethod
    def build(cls, first: Sequence[int], inverse: Sequence[int], device: torch.device) -> "PrefixRows":
        groups = [[b for b, u in enumerate(inverse) if u == g] for g in range(len(first))]
        width = max(16, 1 << max(0, math.ceil(math.log2(max(len(g) for g in groups)))))
        members = torch.full((len(groups), width), -1, dtype=torch.int32)
        for g, rows in enumerate(groups):
            members[g, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        representative = torch.tensor([first[u] for u in inverse], dtype=torch.long)
        return cls(representative.to(device), members.to(device), torch.tensor(first, dtype=torch.int32).to(device))

    def copy_(self, other: "PrefixRows") -> None:
        """Take ``other``'s rows into these tensors (a captured step reads their addresses)."""
        for mine, theirs in ((self.representative, other.representative), (self.members, other.members),
                             (self.first, other.first)):
            mine.copy_(theirs)


def suffix_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``query`` ``[B, nkv, g, D]`` over ``keys``/``values`` ``[B, nkv, S, D]`` with the additive ``bias``
    ``[B, 1, 1, S]`` → the output ``[B, nkv, g, D]`` and the log-sum-exp of the scaled, biased scores
    ``[B, nkv, g]`` (fp32). On CUDA through cuDNN's attention (``compute_log_sumexp``), else in torch."""
    if query.is_cuda and torch.backends.cuda.cudnn_sdp_enabled():
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, bias, True, 0.0, False, False, scale=scale)[:2]
        return out, lse.reshape(query.shape[:3])
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ values.float()).to(query.dtype)
    return out, lse


def prefix_attention_merge_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     valid: torch.Tensor, rows: PrefixRows, prefix_len: int,
                                     out2: torch.Tensor, lse2: torch.Tensor, scale: float) -> torch.Tensor:
    """The contract of :func:`prefix_attention_merge` in torch."""
    b, nq, d = q.shape
    nkv = keys.shape[1]
    group = nq // nkv
    representative = rows.representative
    k = keys[representative, :, :prefix_len].float().repeat_interleave(group, dim=1)  # [B, nq, T, D]
    v = values[representative, :, :prefix_len].float().repeat_interleave(group, dim=1)
    visible = valid[representative, :prefix_len]  # [B, T]
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse1 = torch.logsumexp(scores, dim=-1)  # [B, nq]
    o1 = torch.einsum("bht,bhtd->bhd", torch.exp(scores - lse1[..., None]).nan_to_num(0.0), v)
    o2f = out2.float().reshape(b, nq, d)
    l2 = lse2.reshape(b, nq)
    top = torch.maximum(lse1, l2)
    w1, w2 = torch.exp(lse1 - top), torch.exp(l2 - top)
    out = (o1 * w1[..., None] + o2f * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(q.dtype).reshape(b, nq * d)


@functools.cache
def _kernel() -> Any:
    from . import shared_prefix_kernels

    return shared_prefix_kernels.prefix_attention_merge


def prefix_attention_merge(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                           rows: PrefixRows, prefix_len: int, out2: torch.Tensor, lse2: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Each row's attention over its first ``prefix_len`` cache slots — read from the cache row of its prompt's
    representative (``keys``/``values`` ``[B, nkv, L, D]``, ``valid`` ``[B, L]``), since rows of one prompt hold
    the same prompt entries — merged with its attention over the other slots (``out2`` ``[B, nkv, g, D]``,
    ``lse2`` ``[B, nkv, g]``) → ``[B, nq·D]``. ``q`` ``[B, nq, D]``; one Triton program per (distinct prompt,
    query head) where the kernels can run, else :func:`prefix_attention_merge_reference`."""
    b, nq, d = q.shape
    if triton_cannot_run(q.device) is not None or d & (d - 1) or d < 16 or keys.stride(-1) != 1 \
            or q.stride(-1) != 1 or out2.stride(-1) != 1:
        return prefix_attention_merge_reference(q, keys, values, valid, rows, prefix_len, out2, lse2, scale)
    nkv = keys.shape[1]
    out = torch.empty(b, nq * d, dtype=q.dtype, device=q.device)
    groups, width = rows.members.shape
    _kernel()[(groups, nq)](
        q, keys, values, valid.view(torch.uint8), rows.members, rows.first, out2, lse2, out,
        prefix_len, scale, nq // nkv,
        q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        valid.stride(0),
        out2.stride(0), out2.stride(1), out2.stride(2),
        lse2.stride(0), lse2.stride(1), lse2.stride(2),
        out.stride(0),
        ROWS=width, BLOCK_T=max(16, 1 << max(0, math.ceil(math.log2(prefix_len)))), HEAD_DIM=d,
    )
    return out
