"""Replaying one run's captured graphs in the next run of the same shape: the run's tensors, found by path.

A captured step reads and writes fixed addresses: the tensors of the run that captured it (the state's tensors, its
memory, its trace buffers, the strategies' per-run buffers). The next run of the same decoder and shapes builds
new tensors for all of these. To replay the kept graphs, each new tensor's values are copied into the kept tensor
at the same path, and the new run's slot is pointed at the kept tensor (:func:`transplant`); everything else the
graphs touch (the cache, the step's own buffers) is kept with them. At the end of a run its slots get copies
(:func:`detach`), so what a run returned does not change when the next run writes the kept tensors.

Why: at the 7B shape a run spent ~28 ms capturing its first graph and ~15 ms in the eager warm-up step while the
GPU waited (the profile's ``idle``), ~1.5 % of a 16-image batch; at 1B ~3 %.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

Path = tuple[Any, ...]

# StepState fields a captured step never reads from the state itself (the loop's buffers stand in for them)
_NOT_STEP_STATE = {"next_positions", "cache", "adapter", "trace", "memory", "exits"}


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a run holds one tensor: ``holder.key`` (an attribute) or ``holder[key]`` (an item)."""

    holder: Any
    key: Any
    attribute: bool

    def get(self) -> torch.Tensor:
        return getattr(self.holder, self.key) if self.attribute else self.holder[self.key]

    def set(self, value: torch.Tensor) -> None:
        if self.attribute:
            setattr(self.holder, self.key, value)
        else:
            self.holder[self.key] = value


def _walk(holder: Any, prefix: Path, depth: int, found: dict[Path, Slot], attribute: bool) -> None:
    if attribute:
        items = list(vars(holder).items())
    elif isinstance(holder, dict):
        items = list(holder.items())
    else:
        items = list(enumerate(holder))
    for key, value in items:
        if isinstance(value, torch.Tensor):
            found[prefix + (key,)] = Slot(holder, key, attribute)
        elif depth > 1 and isinstance(value, (dict, list)):
            _walk(value, prefix + (key,), depth - 1, found, attribute=False)


def memory_tensors(memory: dict) -> dict[Path, Slot]:
    """The tensors in a run's ``state.memory`` (two levels), by path."""
    found: dict[Path, Slot] = {}
    _walk(memory, ("memory",), 2, found, attribute=False)
    return found


def run_tensors(state: Any, hooks: Any, extra: dict[str, Any] | None = None) -> dict[Path, Slot]:
    """Every tensor of a run that a captured step may touch, by path: the state's tensor fields (and tensors in its
    dict and list fields), its memory (two levels), its trace buffers, each strategy's attributes (two levels) and
    the attributes of the ``extra`` objects (the loop's per-run bookkeeping)."""
    found: dict[Path, Slot] = {}
    for f in dataclasses.fields(state):
        if f.name in _NOT_STEP_STATE:
            continue
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            found[("state", f.name)] = Slot(state, f.name, True)
        elif isinstance(value, (dict, list)):
            _walk(value, ("state", f.name), 1, found, attribute=False)
    found.update(memory_tensors(state.memory))
    _walk(state.trace.buffers, ("trace",), 1, found, attribute=False)
    for index, strategy in enumerate(getattr(hooks, "strategies", None) or []):
        _walk(strategy, ("strategy", index), 2, found, attribute=True)
    for name, obj in (extra or {}).items():
        if obj is not None:
            _walk(obj, ("extra", name), 1, found, attribute=True)
    return found


def snapshot(slots: dict[Path, Slot]) -> dict[Path, torch.Tensor]:
    """The tensors at each path now (what a graph captured now has baked in)."""
    return {path: slot.get() for path, slot in slots.items()}


def transplant(kept: dict[Path, torch.Tensor], slots: dict[Path, Slot]) -> str | None:
    """Copy the new run's tensors into the kept ones at the same paths and point its slots at them; returns None,
    or why it cannot (different paths, shapes, dtypes or devices) — then nothing was changed."""
    if kept.keys() != slots.keys():
        differ = sorted(map(str, kept.keys() ^ slots.keys()))[:3]
        return f"the run holds other tensors than the kept graphs' ({', '.join(differ)})"
    for path, old in kept.items():
        new = slots[path].get()
        if new is not old and (new.shape != old.shape or new.dtype != old.dtype or new.device != old.device):
            return (f"tensor {path} is {tuple(new.shape)} {new.dtype} where the kept graphs have "
                    f"{tuple(old.shape)} {old.dtype}")
    for path, old in kept.items():
        slot = slots[path]
        new = slot.get()
        if new is not old:
            old.copy_(new)
            slot.set(old)
    return None


def detach(kept: dict[Path, torch.Tensor], slots: dict[Path, Slot]) -> None:
    """Give every slot of a finished run that holds a kept tensor a copy of it (the next run overwrites the kept
    ones)."""
    for path, slot in slots.items():
        value = slot.get()
        if path in kept and value is kept[path]:
            slot.set(value.clone())
