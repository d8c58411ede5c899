"""The ``Strategy`` base: a declaration (name, parameters, hook points, modes, needs, order, capabilities) plus
methods named after the hook points it fills. Subclasses hold no tensor math: they bind a pure function from
``strategies/*_math.py`` to hook points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from .hookspecs import HOOK_POINTS

if TYPE_CHECKING:
    from janus_decoding.core.state import StepState

REQUIRED = object()
MODES = ("image", "text")
NEEDS = ("image", "janus")


class StrategyError(ValueError):
    """A strategy was configured or used wrongly; the message names the strategy and the parameter."""


@dataclass(frozen=True)
class Param:
    """One typed parameter. ``kind``: ``int``, ``float``, ``str``, ``bool``, ``list[int]``, ``list[str]``,
    ``str|list[int]`` or ``str|list[str]``. ``low``/``high`` bound numbers (inclusive unless ``*_open``)."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None

    def describe_range(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return self.kind
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{lo}, {hi}"

    def validate(self, owner: str, value: Any) -> Any:
        kinds = self.kind.split("|")
        for kind in kinds:
            ok, converted = _convert(kind, value)
            if ok:
                break
        else:
            raise StrategyError(f"`{owner}`: `{self.name}` must be {self.kind}, got {value!r}")
        if self.choices is not None and isinstance(converted, str) and converted not in self.choices:
            raise StrategyError(f"`{owner}`: `{self.name}` must be {self.describe_range()}, got {converted!r}")
        numbers = converted if isinstance(converted, list) else [converted]
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                if not math.isfinite(number) or (self.low is not None and (number < self.low or (self.low_open and number == self.low))) \
                        or (self.high is not None and (number > self.high or (self.high_open and number == self.high))):
                    raise StrategyError(f"`{owner}`: `{self.name}` must be in {self.describe_range()}, got {value!r}")
        return converted

    def json_schema(self) -> dict[str, Any]:
        base = {"int": {"type": "integer"}, "float": {"type": "number"}, "str": {"type": "string"},
                "bool": {"type": "boolean"}, "list[int]": {"type": "array", "items": {"type": "integer"}},
                "list[str]": {"type": "array", "items": {"type": "string"}}}
        options = [dict(base[k]) for k in self.kind.split("|")]
        schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
        if self.low is not None:
            schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        if self.choices is not None:
            schema["enum"] = list(self.choices)
        if self.default is not REQUIRED and self.default is not None:
            schema["default"] = self.default
        if self.doc:
            schema["description"] = self.doc
        return schema


def _convert(kind: str, value: Any) -> tuple[bool, Any]:
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind == "str":
        return isinstance(value, str), value
    if kind.startswith("list["):
        inner = kind[5:-1]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_convert(inner, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    raise ValueError(f"unknown parameter kind {kind!r}")


class Strategy:
    """Base class of every decoding strategy (built-in or third-party).

    Declare, as class attributes: ``name``; ``params`` (a tuple of :class:`Param`); ``hooks`` (hook points it
    implements, from ``HOOK_POINTS``); ``modes``; ``needs`` (``"image"``: an input image; ``"janus"``: a Janus
    model); ``runs_after`` (names that must run before it when both are in a decoder); ``graph_safe``;
    ``couples_rows``. Parameters arrive as keyword arguments, are validated against ``params`` and are readable
    as ``self.config[name]``. Hook methods are named after the hook points (see ``plugins/hookspecs.py``).
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    hooks: ClassVar[tuple[str, ...]] = ()
    modes: ClassVar[tuple[str, ...]] = MODES
    needs: ClassVar[tuple[str, ...]] = ()
    runs_after: ClassVar[tuple[str, ...]] = ()
    graph_safe: ClassVar[bool] = True
    couples_rows: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise StrategyError(
                f"`{self.name}`: unknown parameter `{unknown[0]}`; parameters: {', '.join(known) or '(none)'}")
        config: dict[str, Any] = {}
        for p in self.params:
            if p.name in kwargs:
                config[p.name] = p.validate(self.name, kwargs[p.name])
            elif p.default is REQUIRED:
                raise StrategyError(f"`{self.name}`: parameter `{p.name}` is required ({p.describe_range()})")
            else:
                config[p.name] = p.default
        self.config = config
        self.explicit = {k: config[k] for k in kwargs}
        self.check()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = [h for h in cls.hooks if h not in HOOK_POINTS]
        if bad:
            raise TypeError(f"strategy {cls.__name__}: unknown hook point {bad[0]!r}; hook points: {HOOK_POINTS}")
        missing = [h for h in cls.hooks if not callable(getattr(cls, h, None))]
        if missing:
            raise TypeError(f"strategy {cls.__name__} declares hook {missing[0]!r} but defines no such method")

    # -- validation hooks for subclasses ----------------------------------------------------------------------
    def check(self) -> None:
        """Cross-parameter validation (raise :class:`StrategyError`); called after the parameters are set."""

    def check_run(self, state: "StepState") -> None:
        """Validation that needs the model or the run (layer ranges, grid sizes); called before the prefill."""

    # -- declarations the loop asks for (defaults: nothing) ---------------------------------------------------
    def begin(self, state: "StepState") -> None:
        """Once per run, before the prefill: build device tensors of numeric parameters, per-run buffers."""

    def end(self, state: "StepState") -> None:
        """Once per run, after the last step: move per-step buffers into the trace."""

    def kv_growth(self, state: "StepState") -> int:
        return 0

    def kv_layer_reduction(self, state: "StepState") -> dict[int, int]:
        """{k: slots}: a hard layer hook at k will keep ``slots`` fewer positions in layers ≥ k (cache sizing)."""
        return {}

    def layer_points(self, state: "StepState") -> list[int]:
        return []

    def hidden_layers(self, state: "StepState") -> list[int]:
        return []

    def prompt_layers(self, state: "StepState") -> list[int]:
        return []

    def exit_layers(self, state: "StepState") -> list[tuple[int, bool]]:
        """``(layer, final_norm)`` pairs whose head logits ``state.exit_logits`` gives this step."""
        return []

    def schedule_points(self, state: "StepState") -> list[int]:
        return []

    def after_sample(self, state: "StepState", tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """Per step, after sampling: the chosen ids ``[P]`` and the fp32 distribution sampled ``[P, V]``."""

    # -- helpers ----------------------------------------------------------------------------------------------
    def tensor(self, state: "StepState", name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A numeric parameter as a 0-d device tensor (so a captured step sees its current value)."""
        return torch.tensor(self.config[name], dtype=dtype, device=state.adapter.device)

    def to_spec(self) -> str:
        from .spec import format_stage

        return format_stage(self.name, self.explicit)

    def __repr__(self) -> str:
        return f"<strategy {self.to_spec()}>"

    @classmethod
    def describe(cls) -> dict[str, Any]:
        doc = (cls.__doc__ or "").strip().splitlines()
        return {
            "name": cls.name,
            "summary": doc[0] if doc else "",
            "hooks": list(cls.hooks),
            "modes": list(cls.modes),
            "needs": list(cls.needs),
            "runs_after": list(cls.runs_after),
            "graph_safe": cls.graph_safe,
            "couples_rows": cls.couples_rows,
            "parameters": {
                "type": "object",
                "properties": {p.name: p.json_schema() for p in cls.params},
                "required": [p.name for p in cls.params if p.default is REQUIRED],
                "additionalProperties": False,
            },
        }


def declared_hooks(strategies: Sequence[Strategy], point: str) -> list[Strategy]:
    return [s for s in strategies if point in s.hooks]
