"""Timing a piece of GPU work the way the fast step runs it: captured once as a CUDA graph, replayed."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def time_graph(fn: Callable[[], object], replays: int) -> float:
    """Median ms of one replay of ``fn`` captured as a CUDA graph (CUDA events around each replay).

    ``fn`` runs once on a side stream first — a warm-up that compiles Triton kernels and lets cuDNN pick its plans
    outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
