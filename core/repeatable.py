"""Which attention kernels a run may use: with deterministic algorithms on, cuDNN's fused attention is left out.

``torch.use_deterministic_algorithms(True)`` does not cover the cuDNN backend of ``scaled_dot_product_attention``,
and on an H200 (torch 2.11) that backend did not repeat itself: the same batch run twice in one process gave raw
logits that differed from step 110 on, in the eager and the graph loop alike (``benchmarks/repeatability.py``,
``benchmarks/README.md``). A run made while deterministic algorithms are on therefore lets SDPA choose only among
the flash, memory-efficient and math kernels; otherwise SDPA chooses as it always does (cuDNN is the fastest here).
The choice is made when a kernel is called, so a CUDA graph captured inside the run keeps it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPEATABLE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_kernels() -> AbstractContextManager:
    """The context one run's forwards go through (prefill, decode steps, graph captures)."""
    if torch.are_deterministic_algorithms_enabled():
        return sdpa_kernel(list(REPEATABLE_BACKENDS))
    return nullcontext()
