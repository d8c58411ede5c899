"""Discovery and the registry: built-ins and entry-point plugins register strategy classes by name.

Plugins live in the entry-point group ``janus_decoding.strategies`` and implement the pluggy hook
``register_strategies(register)``. Environment variables: ``JANUS_DECODING_PLUGINS`` (comma list: load only these
entry-point names), ``JANUS_DECODING_BLOCK_PLUGINS`` (comma list: never load these) and
``JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD`` (any non-empty value: load no entry points; built-ins still register).
A plugin that fails to import, or declares another interface version, is reported and skipped; the others load.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from .hookspecs import INTERFACE_VERSION, PROJECT, DiscoverySpec
from .strategy import Strategy

ENTRY_POINT_GROUP = "janus_decoding.strategies"
BUILTIN_DISTRIBUTION = "janus-decoding"


class RegistryError(ValueError):
    """Unknown or duplicate strategy names, or a bad registration; the message names the culprits."""


@dataclass(frozen=True)
class Registration:
    cls: type[Strategy]
    distribution: str
    version: str
    plugin: str


@dataclass
class PluginFailure:
    plugin: str
    distribution: str
    error: str


@dataclass
class StrategyRegistry:
    """Strategy classes by name, each with the distribution that provided it."""

    entries: dict[str, Registration] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def register(self, cls: type, *, distribution: str, version: str = "", plugin: str = "") -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise RegistryError(f"plugin {plugin or distribution!r} registered {cls!r}, which is not a Strategy class")
        if not cls.name or not cls.name.isidentifier():
            raise RegistryError(f"plugin {plugin or distribution!r}: strategy class {cls.__name__} needs a `name` "
                                "that is a Python identifier")
        if cls.name in self.entries:
            other = self.entries[cls.name]
            raise RegistryError(f"strategy name {cls.name!r} is registered twice: by {other.distribution} "
                                f"({other.cls.__module__}.{other.cls.__qualname__}) and by {distribution} "
                                f"({cls.__module__}.{cls.__qualname__})")
        self.entries[cls.name] = Registration(cls, distribution, version, plugin)

    def get(self, name: str) -> type[Strategy]:
        if name not in self.entries:
            close = difflib.get_close_matches(name, list(self.entries), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RegistryError(f"unknown strategy {name!r}{hint} (known: {', '.join(sorted(self.entries))})")
        return self.entries[name].cls

    def names(self) -> list[str]:
        return sorted(self.entries)

    def describe(self, name: str) -> dict[str, Any]:
        entry = self.entries[name]
        return {**entry.cls.describe(), "distribution": entry.distribution, "version": entry.version}


def _env_list(name: str) -> set[str]:
    return {x.strip() for x in os.environ.get(name, "").split(",") if x.strip()}


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def build_registry(extra_plugins: Iterable[object] = ()) -> StrategyRegistry:
    """A fresh registry: built-ins, then entry-point plugins (per the environment), then ``extra_plugins``."""
    from janus_decoding import strategies as builtins
    from janus_decoding import __version__

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(DiscoverySpec)
    registry = StrategyRegistry()
    sources: list[tuple[object, str, str, str]] = [(builtins, BUILTIN_DISTRIBUTION, __version__, "builtins")]
    if not os.environ.get("JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD"):
        allow, block = _env_list("JANUS_DECODING_PLUGINS"), _env_list("JANUS_DECODING_BLOCK_PLUGINS")
        for ep in _entry_points():
            if (allow and ep.name not in allow) or ep.name in block:
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not stop the others
                registry.failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                continue
            sources.append((plugin, dist, version, ep.name))
    for i, plugin in enumerate(extra_plugins):
        sources.append((plugin, getattr(plugin, "__name__", type(plugin).__name__), "", f"extra-{i}"))
    for plugin, dist, version, name in sources:
        declared = getattr(plugin, "janus_decoding_interface", INTERFACE_VERSION)
        if declared != INTERFACE_VERSION:
            registry.failures.append(PluginFailure(
                name, dist, f"declares interface {declared}, this janus-decoding provides {INTERFACE_VERSION}"))
            continue
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            registry.failures.append(PluginFailure(name, dist, str(exc)))
            continue
    pm.check_pending()
    for impl in pm.hook.register_strategies.get_hookimpls():
        name = pm.get_name(impl.plugin)
        dist, version = next((d, v) for p, d, v, n in sources if n == name)

        def register(cls: type, _d: str = dist, _v: str = version, _n: str = name) -> None:
            registry.register(cls, distribution=_d, version=_v, plugin=_n)

        try:
            impl.function(register=register)
        except RegistryError:
            raise
        except Exception as exc:
            registry.failures.append(PluginFailure(name, dist, f"{type(exc).__name__}: {exc}"))
    return registry


_default: StrategyRegistry | None = None


def default_registry() -> StrategyRegistry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = build_registry()
    return _default


def reset_default_registry() -> None:
    global _default
    _default = None
