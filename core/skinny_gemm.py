"""``x @ w.T`` for a batch of a few rows (the image step's 32 rows with CFG) as a Triton kernel.

Why: at 32 rows a decoder layer's GEMMs only stream their weights, and cuBLAS's choices for them leave bandwidth
unused — the q/k/v GEMM at the 7B shape runs 96 tiles on 132 multiprocessors, the output and down projections add
a split-K reduction kernel each (``benchmarks/README.md`` has the profile). Here every program owns ``bn`` output
columns for all rows (rows padded to a power of two ≥ 16 for the tensor cores) and walks its share of K in ``bk``
steps with ``num_stages`` loads in flight; ``splits`` > 1 divides K among programs and a second kernel sums the
fp32 parts in split order. Each output is summed in one fixed order, so results repeat bit for bit, and the fp32
sum is rounded once to the output dtype, as cuBLAS does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

__all__ = [
    "AUTO_ROWS", "GemmLaunch", "launch_for", "load_kernels", "skinny_gemm", "skinny_gemm_cannot_run",
    "skinny_gemm_unavailable",
]


@dataclasses.dataclass(frozen=True)
class GemmLaunch:
    """How the kernel is launched (``benchmarks/gemm.py`` measures the candidates)."""

    bn: int = 32
    bk: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4
    weight_major: bool = True

    def __post_init__(self) -> None:
        for name in ("bn", "bk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmLaunch: `{name}` must be a power of two >= 16, got {value}")
        if self.splits < 1:
            raise ValueError(f"GemmLaunch: `splits` must be >= 1, got {self.splits}")


def skinny_gemm_unavailable(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why the kernel cannot compute ``x @ w.T`` here, or None."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"skinny_gemm: needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
    if x.stride(1) != 1 or w.stride(1) != 1:
        return "skinny_gemm: x and w need contiguous rows"
    if x.shape[0] > 64:
        return f"skinny_gemm: made for at most 64 rows, got {x.shape[0]}"
    if x.dtype != w.dtype:
        return f"skinny_gemm: x is {x.dtype}, w is {w.dtype}"
    return skinny_gemm_cannot_run(x.device)


def skinny_gemm_cannot_run(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` at all, or None."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "skinny_gemm: the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "skinny_gemm: the Triton kernel needs compute capability 8.0 or newer (bf16 tensor cores)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skinny_gemm: Triton is not installed"
    return None


_KERNELS: Any = None  # core.skinny_gemm_kernels once imported (module global, so compiled code reads it plainly)


def load_kernels() -> Any:
    """Import the kernels (before tracing: compiled code then reads the module global plainly)."""
    global _KERNELS
    if _KERNELS is None:
        from . import skinny_gemm_kernels

        _KERNELS = skinny_gemm_kernels
    return _KERNELS


def _rows_block(m: int) -> int:
    return max(16, 1 << (m - 1).bit_length())


# Rows where "auto" takes the kernel: 16 images with CFG (32 rows) is where it measured faster than cuBLAS on an H200
# (benchmarks/gemm.py); from 17 rows on the tensor-core tile is 32 rows, as there.
AUTO_ROWS = range(17, 33)


def launch_for(n: int, k: int) -> GemmLaunch:
    """The launch measured fastest for a layer GEMM of 32 rows on an H200 (``benchmarks/gemm.py``): 64 columns per
    program, K in steps of 128 with four loads in flight; K split only where it is longer than N (the down
    projection), into as many parts as bring the programs to ~128."""
    splits = 1
    if k > n:
        tiles = -(-n // 64)
        while splits < 4 and tiles * splits < 128:
            splits *= 2
    return GemmLaunch(bn=64, bk=128, splits=splits, num_warps=4, num_stages=4, weight_major=True)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, launch: GemmLaunch | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` @ ``w`` ``[N, K]``.T → ``[M, N]`` in ``x``'s dtype (M ≤ 64); ``launch`` defaults to
    :func:`launch_for` the shape."""
    reason = skinny_gemm_unavailable(x, w)
    if reason:
        raise ValueError(reason)
    load_kernels()
    return skinny_gemm_unchecked(x, w, launch or launch_for(w.shape[0], w.shape[1]))


def skinny_gemm_unchecked(x: torch.Tensor, w: torch.Tensor, launch: GemmLaunch) -> torch.Tensor:
    """:func:`skinny_gemm` without its checks, for the compiled layer (the caller checked once and called
    :func:`load_kernels`)."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    splits = min(launch.splits, -(-k // launch.bk))
    k_per_split = -(-k // (splits * launch.bk)) * launch.bk
    splits = -(-k // k_per_split)
    part = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _KERNELS.skinny_gemm_partial[(-(-n // launch.bn), splits)](
        x, w, part, m, n, k, k_per_split, x.stride(0), w.stride(0), part.stride(-2),
        part.stride(0) if splits > 1 else 0, BM=_rows_block(m), BN=launch.bn, BK=launch.bk,
        WEIGHT_MAJOR=launch.weight_major, PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        block = 1024
        _KERNELS.skinny_gemm_sum[(-(-m * n // block),)](part, y, m, n, part.stride(0), part.stride(1), y.stride(0),
                                                      SPLITS=splits, BLOCK=block, num_warps=4)
    return y
