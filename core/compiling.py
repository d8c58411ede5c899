"""One ``torch.compile`` wrapper per function and backend for the whole process.

The fast step's layer halves and strategies' per-step math (through ``state.compiled``) are compiled with static
shapes and no graph breaks; keeping one wrapper per (function, backend) lets every layer, run and state reuse what
dynamo and the backend built the first time a shape was seen.

``"max-autotune"`` is Inductor with ``mode="max-autotune-no-cudagraphs"``: each GEMM is benchmarked at compile
time against Inductor's Triton GEMM templates (which can also fuse the pointwise work after it) and the fastest is
kept. The loop captures its own CUDA graphs, so Inductor's are off.
"""

from __future__ import annotations

from typing import Any, Callable

import functools

import torch

_COMPILED: dict[tuple[Callable, str, bool, tuple], Callable] = {}
MAX_AUTOTUNE = "max-autotune"
# ``tune_reductions``: Inductor times several launch configurations of each generated reduction and pointwise
# kernel at its first call, then refines the best by coordinate descent (gpt-fast's setting). The one-row step's
# GEMVs are such reductions: with Inductor's untimed heuristics they ran at ~60 % of copy bandwidth on an H200, timed
# at ~90 %. Only for them: on the image step (cuBLAS GEMMs, small kernels around them) timing made the 1B batch slower
# (1.34 → 1.46 s; benchmarks/README.md).
TUNED_OPTIONS = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}


# Static shapes mean one compiled graph per shape a function meets: per batch size (rows), model, and for the layer
# halves with or without a residual to add. dynamo's default of 8 per function is reached by a process that makes a
# few batch sizes on two models, and with fullgraph=True reaching it is an error, not a fallback.
RECOMPILE_LIMIT = 64


def _allow_recompiles() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)


def compiled(fn: Callable, backend: str, *, tune_reductions: bool = False,
             options: dict[str, Any] | None = None) -> Callable:
    """``fn`` through ``torch.compile(backend=backend, fullgraph=True, dynamic=False)``, made once per
    (function, backend, tuning, options); ``options``: Inductor settings for this function (ignored by other
    backends)."""
    inductor = backend in ("inductor", MAX_AUTOTUNE)
    tune = tune_reductions and backend == "inductor"
    settings = {**(TUNED_OPTIONS if tune else {}), **(options or {})} if inductor else {}
    key = (fn, backend, tune, tuple(sorted(settings.items())))
    if key not in _COMPILED:
        _allow_recompiles()
        if backend == MAX_AUTOTUNE and not settings:
            _COMPILED[key] = torch.compile(fn, mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
        elif backend == MAX_AUTOTUNE:  # torch.compile takes a mode or options, not both: the mode's options spelled
            options = {"max_autotune": True, "triton.cudagraphs": False, **settings}
            _COMPILED[key] = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False, options=options)
        else:
            _COMPILED[key] = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False,
                                           options=settings or None)
    return _COMPILED[key]


@functools.cache
def known_inductor_options(options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The Inductor settings of ``options`` ((name, value) pairs; dotted names for sub-configs) that this torch
    knows — the rest are left out. Cached: the fast step asks for its pieces' settings whenever it builds a step."""
    import torch._inductor.config as inductor_config

    def known(name: str) -> bool:
        owner: Any = inductor_config
        *parents, leaf = name.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        return owner is not None and hasattr(owner, leaf)

    return {name: value for name, value in options if known(name)}
