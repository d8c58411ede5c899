"""Attention for one new token per row over the static KV cache, as two Triton kernels (split-KV decoding).

Why a kernel of our own: the fast step's attention reads up to ~600 cached positions for each of 32 rows and 32
heads with one query each. SDPA must be handed a fixed read length inside a CUDA graph (a bucket: up to 31 slots
read for nothing, and one graph per bucket) and a materialised additive mask; its kernels spread one (row, head)
over one thread block, which leaves most of the GPU idle at batch 1. Here:

* the read length comes from the device (the layer's write slot), so one graph serves every step and nothing past
  the filled slots is read;
* the cache's own validity bits ``[B, L]`` are the mask (left padding, masked injections, pruned slots);
* the new key and value are written into the cache by the program whose block holds the slot, and used from
  registers (the separate ``index_copy_`` kernels of the step go away);
* each (row, head) is split into chunks of ``chunk`` slots (flash decoding): the first kernel runs an online
  softmax over its chunk and writes the chunk's max, sum and weighted values (fp32), the second merges the chunks
  that hold filled slots.

Measured on an H200 (``benchmarks/attention.py``): faster than SDPA at one row (text, ×0.73), level with it at the
1B shape's 32 rows, slower at the 7B shape's (×1.11): ``FastOptions(attention="auto")`` uses the kernels only where
few (row, head) pairs leave SDPA short of work.

``decode_attention_reference`` is the same contract in plain torch; the tests hold the kernels to it (on CPU
through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from .triton_support import triton_cannot_run

__all__ = ["Launch", "decode_attention", "decode_attention_reference", "decode_attention_unavailable",
           "few_programs", "launch_config"]


@dataclass(frozen=True)
class Launch:
    """How the kernels are launched: each program reads ``chunk`` slots, ``block`` at a time; ``dot`` puts the
    products on tensor cores (the one query padded to 16 rows, bf16 P·V as flash attention does)."""

    chunk: int = 64
    block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk", "block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Launch: `{name}` must be a power of two >= 16, got {value!r}")
        if self.block > self.chunk:
            raise ValueError(f"Launch: `block` ({self.block}) must not exceed `chunk` ({self.chunk})")


# Measured best on an H200 (benchmarks/attention.py, results/attention-h200-*.json). Few (row, head) pairs (text at
# batch 1): short chunks, so that the whole GPU reads; many (image batches with CFG): long chunks through tensor
# cores, one or two per (row, head).
FEW = Launch(chunk=64, block=64, num_warps=4, num_stages=2, dot=False)
MANY = Launch(chunk=512, block=32, num_warps=4, num_stages=3, dot=True)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128


def few_programs(device: torch.device, rows: int, heads: int) -> bool:
    """Fewer (row, head) pairs than multiprocessors: a kernel with one block per pair (SDPA's for one query)
    leaves most of the GPU idle, and splitting each pair's slots over several programs pays."""
    return rows * heads < _multiprocessors(device)


def launch_config(device: torch.device, rows: int, heads: int, chunk: int = 0) -> Launch:
    """The launch for this many rows and heads (``chunk`` > 0 overrides the chunk)."""
    launch = FEW if few_programs(device, rows, heads) else MANY
    if chunk:
        launch = dataclasses.replace(launch, chunk=chunk, block=min(launch.block, chunk))
    return launch


def decode_attention_unavailable(device: torch.device, head_dim: int) -> str | None:
    """Why the kernels cannot run here, or None."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head dim {head_dim} is not a power of two >= 16"
    why = triton_cannot_run(device)
    return None if why is None else f"the Triton kernels {why}"


def decode_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Write ``k_new``/``v_new`` ``[B, nkv, D]`` at ``slot`` (a one-element device tensor) of ``keys``/``values``
    ``[B, nkv, L, D]``, then attend ``q`` ``[B, nq, D]`` over slots ``0..slot`` that ``valid`` ``[B, L]`` marks
    visible. Returns ``[B, nq·D]`` in ``q``'s dtype (softmax in fp32)."""
    b, nq, d = q.shape
    nkv = keys.shape[1]
    keys.index_copy_(2, slot, k_new[:, :, None].to(keys.dtype))
    values.index_copy_(2, slot, v_new[:, :, None].to(values.dtype))
    length = int(slot) + 1
    k = keys[:, :, :length].float().repeat_interleave(nq // nkv, 1)  # [B, nq, T, D]
    v = values[:, :, :length].float().repeat_interleave(nq // nkv, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :length], float("-inf"))
    out = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v)
    return out.to(q.dtype).reshape(b, nq * d)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile-on-first-use: importing this module needs no Triton (the kernels live in ``decode_attention_kernels``)."""
    from . import decode_attention_kernels as kernels

    return kernels.decode_attention_split, kernels.decode_attention_merge


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, scale: float,
                     launch: Launch = FEW) -> torch.Tensor:
    """:func:`decode_attention_reference`'s contract in two kernel launches, with no host sync (graph-safe).

    ``q``, ``k_new``, ``v_new`` may be strided views (read in place when their last dim is contiguous); ``valid``
    is ``[B, L]`` bool with the write slot already marked visible.
    """
    decode_attention_split, decode_attention_merge = _kernels()
    b, nq, d = q.shape
    nkv, capacity = keys.shape[1], keys.shape[2]
    chunk = launch.chunk
    splits = -(-capacity // chunk)
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or valid.stride(-1) != 1:
        raise ValueError("decode_attention: the cache and its validity must be contiguous in their last dimension")
    q, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new))
    m = torch.empty(b * nq * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * nq * splits, d, dtype=torch.float32, device=q.device)
    out = torch.empty(b, nq * d, dtype=q.dtype, device=q.device)
    seen = valid.view(torch.uint8)
    decode_attention_split[(b, nq, splits)](
        q, k_new, v_new, keys, values, seen, slot, m, l, acc, scale,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        seen.stride(0), NQ=nq, SPLITS=splits, GROUP=nq // nkv, D=d, CHUNK=chunk, BLOCK=launch.block,
        DOT=launch.dot, PRECISION="ieee" if keys.dtype == torch.float32 else None, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    decode_attention_merge[(b, nq)](m, l, acc, slot, out, out.stride(0), NQ=nq, SPLITS=splits,
                                    SPLITS_P2=_next_power_of_2(splits), D=d, CHUNK=chunk, num_warps=4)
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
