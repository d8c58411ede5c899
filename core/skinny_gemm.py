"""``x @ w.T`` for a batch of a few rows (the image step's 32 rows with CFG) as a Triton kernel.

Why: at 32 rows a decoder layer's GEMMs only stream their weights, and cuBLAS's choices for them leave bandwidth
unused — the q/k/v GEMM at the 7B shape runs 96 tiles on 132 multiprocessors, the output and down projections add
a split-K reduction kernel each (``benchmarks/README.md`` has the profile). Here every program owns ``bn`` output
columns for all rows (rows padded to a power of two ≥ 16 for the tensor cores) and walks its share of K in ``bk``
steps with ``num_stages`` loads in flight; ``splits`` > 1 divides K among programs and a second kernel sums the
fp32 parts in split order — or, inside ``torch.compile``, the code that reads the result does (Inductor folds that
sum into the kernel after the GEMM: the residual add and rms norm). Each output is summed in one fixed order, so
results repeat bit for bit, and the fp32 sum is rounded once to the output dtype, as cuBLAS does.

``glu=True`` computes a LLaMA MLP's ``silu(gate) · up`` from its ``[gate; up]`` weight in the GEMM's epilogue (the
SiLU·mul kernel and the round trip of the ``[M, 2·I]`` product go away). ``GemmLaunch.tma``: tiles through Hopper's
tensor-memory accelerator where it can.

The launch goes through one custom op (``janus_decoding::skinny_gemm``), so ``torch.compile`` keeps it as a call
(with its launch attributes) instead of tracing Triton, and on CPU the interpreter runs under a compiled layer too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from .triton_support import triton_cannot_run

__all__ = [
    "AUTO_ROWS", "GemmLaunch", "launch_for", "load_kernels", "skinny_gemm", "skinny_gemm_cannot_run",
    "skinny_gemm_unavailable", "sum_parts",
]


@dataclasses.dataclass(frozen=True)
class GemmLaunch:
    """How the kernel is launched (``benchmarks/gemm.py`` measures the candidates)."""

    bn: int = 32
    bk: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False  # tiles through Hopper's tensor-memory accelerator where it can (sm90+, bf16/fp16, aligned)

    def __post_init__(self) -> None:
        for name in ("bn", "bk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmLaunch: `{name}` must be a power of two >= 16, got {value}")
        if self.splits < 1:
            raise ValueError(f"GemmLaunch: `splits` must be >= 1, got {self.splits}")


def skinny_gemm_unavailable(x: torch.Tensor, w: torch.Tensor, glu: bool = False) -> str | None:
    """Why the kernel cannot compute ``x @ w.T`` (``glu``: SiLU·mul of its halves) here, or None."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"skinny_gemm: needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
    if x.stride(1) != 1 or w.stride(1) != 1:
        return "skinny_gemm: x and w need contiguous rows"
    if x.shape[0] > 64:
        return f"skinny_gemm: made for at most 64 rows, got {x.shape[0]}"
    if x.dtype != w.dtype:
        return f"skinny_gemm: x is {x.dtype}, w is {w.dtype}"
    if glu and w.shape[0] % 2:
        return f"skinny_gemm: glu needs [gate; up] weights of an even row count, got {w.shape[0]}"
    return skinny_gemm_cannot_run(x.device)


def skinny_gemm_cannot_run(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` at all, or None."""
    why = triton_cannot_run(device)
    return None if why is None else f"skinny_gemm: the Triton kernels {why}"


_KERNELS: Any = None  # core.skinny_gemm_kernels once imported


def load_kernels() -> Any:
    """Import the kernels (Triton compiles each variant at its first launch)."""
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


def launch_for(n: int, k: int, caller_sums: bool = False, glu: bool = False, programs: int = 128) -> GemmLaunch:
    """The launch measured fastest for a layer GEMM of 32 rows on an H200 (``benchmarks/gemm.py``): 64 columns per
    program, K in steps of 128 with four loads in flight. K is split where it is longer than N (the down
    projection) — or as long, when the caller sums the parts in a kernel it runs anyway (``caller_sums``: compiled,
    the output projection's parts are summed in the residual add's kernel) — into as many parts (at most 4) as
    bring the programs to ``programs``; tiles through the tensor-memory accelerator where it can (the same bits, 0.2–0.5 µs faster a
    GEMM at the 7B shape). ``glu`` (the gate/up GEMM with SiLU·mul, N = 2·I): 64 gate and 64 up rows a program in K
    steps of 64 where that still makes ≥ 132 programs (45.3 µs against 49.6 at the 7B shape), else 32 and 32."""
    if glu:
        if n // 128 >= 132:
            return GemmLaunch(bn=128, bk=64, splits=1, num_warps=4, num_stages=4)
        return GemmLaunch(bn=64, bk=128, splits=1, num_warps=4, num_stages=4)
    splits = 1
    if k > n or (caller_sums and k == n):
        tiles = -(-n // 64)
        while splits < 4 and tiles * splits < programs:
            splits *= 2
    return GemmLaunch(bn=64, bk=128, splits=splits, num_warps=4, num_stages=4, tma=True)


def _split_k(k: int, bk: int, splits: int) -> tuple[int, int]:
    """The parts K is really split into (none empty) and the columns of each (a multiple of ``bk``)."""
    splits = min(splits, -(-k // bk))
    k_per_split = -(-k // (splits * bk)) * bk
    return -(-k // k_per_split), k_per_split


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, launch: GemmLaunch | None = None, *,
                glu: bool = False) -> torch.Tensor:
    """``x`` ``[M, K]`` @ ``w`` ``[N, K]``.T → ``[M, N]`` in ``x``'s dtype (M ≤ 64); ``glu``: ``w`` is
    ``[gate; up]`` and the result ``silu(x @ gate.T) · (x @ up.T)`` ``[M, N/2]`` (K is not split). ``launch``
    defaults to :func:`launch_for` the shape."""
    reason = skinny_gemm_unavailable(x, w, glu)
    if reason:
        raise ValueError(reason)
    return skinny_gemm_unchecked(x, w, launch or launch_for(w.shape[0], w.shape[1], glu=glu), glu=glu)


def skinny_gemm_unchecked(x: torch.Tensor, w: torch.Tensor, launch: GemmLaunch, *, glu: bool = False,
                          parts: bool = False) -> torch.Tensor:
    """:func:`skinny_gemm` without its checks (the fused layers checked once). Inside ``torch.compile`` a split
    GEMM returns its fp32 parts to the graph and sums them there, where Inductor fuses the sum into the next kernel;
    ``parts=True`` returns them ``[splits, M, N]`` unsummed (for :func:`sum_parts` in a later compiled function)."""
    args = (launch.bn, launch.bk, launch.splits, launch.num_warps, launch.num_stages, launch.tma, glu)
    if torch.compiler.is_compiling() and not glu and _split_k(x.shape[1], launch.bk, launch.splits)[0] > 1:
        split = torch.ops.janus_decoding.skinny_gemm(x, w, *args, True)
        return split if parts else sum_parts(split, x.dtype)
    return torch.ops.janus_decoding.skinny_gemm(x, w, *args, False)


def sum_parts(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A GEMM result as ``[M, N]``: fp32 split parts ``[splits, M, N]`` summed in split order and rounded to
    ``dtype`` (what the split kernel's own sum does), anything else as it is."""
    return y.sum(0).to(dtype) if y.dim() == 3 else y


def _out_shape(x: torch.Tensor, w: torch.Tensor, bk: int, splits: int, glu: bool,
               parts: bool) -> tuple[tuple[int, ...], torch.dtype]:
    m, k, n = x.shape[0], x.shape[1], w.shape[0]
    if glu:
        return (m, n // 2), x.dtype
    splits = _split_k(k, bk, splits)[0]
    if parts and splits > 1:
        return (splits, m, n), torch.float32
    return (m, n), x.dtype


_SCHEMA = ("(Tensor x, Tensor w, int bn, int bk, int splits, int num_warps, int num_stages, bool tma, bool glu, "
           "bool parts) -> Tensor")


def _tma_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the tensor-memory-accelerator kernels can read ``x`` and ``w`` (Hopper on, 16-bit floats, 16-byte
    aligned bases and row strides)."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or _tensor_descriptor() is None:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (x, w))


@functools.cache
def _tensor_descriptor() -> Any:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _skinny_gemm_op(x: torch.Tensor, w: torch.Tensor, bn: int, bk: int, splits: int, num_warps: int,
                    num_stages: int, tma: bool, glu: bool, parts: bool) -> torch.Tensor:
    """The launch itself. ``parts``: a split GEMM returns ``[splits, M, N]`` fp32 parts for the caller to sum."""
    kernels = load_kernels()
    m, k = x.shape
    n = w.shape[0]
    rows = _rows_block(m)
    shape, dtype = _out_shape(x, w, bk, splits, glu, parts)
    tma = tma and _tma_usable(x, w)
    options = dict(BM=rows, BK=bk, num_warps=num_warps, num_stages=num_stages)
    if not tma:
        options["PRECISION"] = "ieee" if x.dtype == torch.float32 else None
    if glu:
        y = torch.empty(shape, dtype=dtype, device=x.device)
        half = max(16, bn // 2)
        grid = (-(-(n // 2) // half),)
        if tma:
            descriptor = _tensor_descriptor()
            kernels.skinny_gemm_glu_tma[grid](descriptor.from_tensor(x, [rows, bk]),
                                              descriptor.from_tensor(w, [half, bk]), y, m, n // 2, k, y.stride(0),
                                              BH=half, **options)
        else:
            kernels.skinny_gemm_glu[grid](x, w, y, m, n // 2, k, x.stride(0), w.stride(0), y.stride(0), BH=half,
                                          **options)
        return y
    splits, k_per_split = _split_k(k, bk, splits)
    if splits == 1 or parts:
        y = part = torch.empty(shape, dtype=dtype, device=x.device)
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    if tma:
        descriptor = _tensor_descriptor()
        kernels.skinny_gemm_tma[(-(-n // bn), splits)](
            descriptor.from_tensor(x, [rows, bk]), descriptor.from_tensor(w, [bn, bk]), part, m, n, k, k_per_split,
            part.stride(-2), part.stride(0) if splits > 1 else 0, BN=bn, **options,
        )
    else:
        kernels.skinny_gemm_partial[(-(-n // bn), splits)](
            x, w, part, m, n, k, k_per_split, x.stride(0), w.stride(0), part.stride(-2),
            part.stride(0) if splits > 1 else 0, BN=bn, **options,
        )
    if splits > 1 and not parts:
        block = 1024
        kernels.skinny_gemm_sum[(-(-m * n // block),)](part, y, m, n, part.stride(0), part.stride(1), y.stride(0),
                                                      SPLITS=splits, BLOCK=block, num_warps=4)
    return y


def _fake(x, w, bn, bk, splits, num_warps, num_stages, tma, glu, parts) -> torch.Tensor:
    shape, dtype = _out_shape(x, w, bk, splits, glu, parts)
    return x.new_empty(shape, dtype=dtype)


def _register() -> None:
    """``janus_decoding::skinny_gemm``, once per process (the module may be imported under two names)."""
    if hasattr(torch.ops.janus_decoding, "skinny_gemm"):
        return
    op = torch.library.custom_op("janus_decoding::skinny_gemm", _skinny_gemm_op, mutates_args=(), schema=_SCHEMA)
    op.register_fake(_fake)


_register()
