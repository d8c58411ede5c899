"""One ``torch.compile`` wrapper per function and backend for the whole process.

The fast step's layer halves and strategies' per-step math (through ``state.compiled``) are compiled with static
shapes and no graph breaks; keeping one wrapper per (function, backend) lets every layer, run and state reuse what
dynamo and the backend built the first time a shape was seen.
"""

from __future__ import annotations

from typing import Callable

import torch

_COMPILED: dict[tuple[Callable, str], Callable] = {}


def compiled(fn: Callable, backend: str) -> Callable:
    """``fn`` through ``torch.compile(backend=backend, fullgraph=True, dynamic=False)``, made once."""
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[key]
