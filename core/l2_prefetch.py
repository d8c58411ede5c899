"""Read a weight into the GPU's L2 cache on a side stream while attention runs, so the GEMM after it reads from L2.

Why: in the image step each layer's attention streams its KV cache (~190 MB at the 7B shape) at ~82 % of the
memory bandwidth, and the output projection after it (33.5 MB, small enough for the 50-MB L2 of an H100/H200) is the
slowest GEMM of the layer for its size (its launch and first loads are a large part of ~12 µs). Reading that weight
beside attention, in the bandwidth attention leaves unused, with an evict-last hint, lets the projection read it
from L2. ``FastOptions(prefetch=True)`` turns it on: the loop forks the side stream before each layer's attention
and joins it once after the last layer, so no GEMM waits for a read (inside the captured graph these are parallel
branches).

The kernel sums what it reads into one number per program (so the loads are not optimised away) and writes them to
a scratch buffer nobody reads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["L2Prefetcher"]

PROGRAMS = 264  # two per multiprocessor of an H100/H200
BLOCK = 4096  # elements per load


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_l2(w_ptr, numel, per_program, sink_ptr, BLOCK: tl.constexpr):
        start = tl.program_id(0) * per_program
        stop = tl.minimum(start + per_program, numel)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for offset in range(start, stop, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            total += tl.load(w_ptr + index, mask=index < stop, other=0.0, eviction_policy="evict_last").to(tl.float32)
        tl.store(sink_ptr + tl.program_id(0), tl.sum(total, axis=0))

    return prefetch_l2


class L2Prefetcher:
    """Forks a high-priority side stream that reads a contiguous weight, and joins it back (graph-capturable)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self.sink = torch.empty(PROGRAMS, dtype=torch.float32, device=device)
        self.kernel = _kernel()

    def start(self, weight: torch.Tensor) -> None:
        """Begin reading ``weight`` (contiguous) into L2 beside whatever the current stream runs next."""
        self.stream.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(self.stream):
            numel = weight.numel()
            per_program = -(-numel // (PROGRAMS * BLOCK)) * BLOCK
            self.kernel[(PROGRAMS,)](weight, numel, per_program, self.sink, BLOCK=BLOCK, num_warps=8)

    def join(self, device: torch.device) -> None:
        """The current stream waits for the reads started so far (a captured graph must end joined)."""
        torch.cuda.current_stream(device).wait_stream(self.stream)
