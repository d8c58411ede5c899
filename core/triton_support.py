"""Whether this project's Triton kernels (decode attention, the skinny GEMM) can run on a device.

One place for the rule both kernel modules share: CUDA with bf16 tensor cores (compute capability 8.0 on), or any
device through Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them), and Triton installed.
"""

from __future__ import annotations

import os

import torch

__all__ = ["triton_cannot_run"]


def triton_cannot_run(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (a phrase to follow "the kernels"), or None."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "need CUDA (or TRITON_INTERPRET=1)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "need compute capability 8.0 or newer (bf16 tensor cores)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "need Triton, which is not installed"
    return None
