"""Discovery and the registry (plugins/registry.py): built-ins, entry points, environment switches, failures."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

import janus_decoding
from janus_decoding.plugins import registry as registry_module
from janus_decoding.plugins.hookspecs import INTERFACE_VERSION
from janus_decoding.plugins.registry import (
    BUILTIN_DISTRIBUTION,
    RegistryError,
    StrategyRegistry,
    build_registry,
    default_registry,
)
from janus_decoding.plugins.strategy import Strategy
from janus_decoding.strategies import BUILTINS
from plugins_fixtures import bad_registration, duplicate_temperature, good_plugin, old_interface

BUILTIN_NAMES = sorted(cls.name for cls in BUILTINS)
CORE_BUILTINS = {"repetition_penalty", "temperature", "top_k", "top_p"}


@dataclass
class FakeEntryPoint:
    """What ``importlib.metadata`` hands the registry: ``.name``, ``.dist`` (name, version) and ``.load()``."""

    name: str
    dist_name: str
    target: object = None
    error: Exception | None = None
    loaded: bool = False

    @property
    def dist(self):
        return SimpleNamespace(name=self.dist_name, version="9.9")

    def load(self):
        self.loaded = True
        if self.error is not None:
            raise self.error
        return self.target


@pytest.fixture
def entry_points(monkeypatch):
    """Install fake entry points and turn autoload back on (the suite turns it off)."""

    def install(*eps: FakeEntryPoint):
        monkeypatch.delenv("JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        monkeypatch.setattr(registry_module, "_entry_points", lambda: list(eps))
        return eps

    return install


def test_builtins_register_through_the_discovery_hook():
    reg = build_registry()
    assert reg.names() == BUILTIN_NAMES and CORE_BUILTINS <= set(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        entry = reg.entries[name]
        assert entry.distribution == BUILTIN_DISTRIBUTION and entry.version == janus_decoding.__version__
        assert entry.plugin == "builtins"
    assert reg.failures == []


def test_autoload_is_off_under_the_suite(monkeypatch):
    called = []
    monkeypatch.setattr(registry_module, "_entry_points", lambda: called.append(1) or [])
    build_registry()
    assert called == []


def test_extra_plugin_module_registers_with_its_name():
    reg = build_registry(extra_plugins=[good_plugin])
    assert reg.get("shout") is good_plugin.Shout
    assert reg.entries["shout"].distribution == "plugins_fixtures.good_plugin"


def test_duplicate_name_names_both_distributions():
    with pytest.raises(RegistryError, match="registered twice") as info:
        build_registry(extra_plugins=[duplicate_temperature])
    message = str(info.value)
    assert "'temperature'" in message
    assert BUILTIN_DISTRIBUTION in message and "plugins_fixtures.duplicate_temperature" in message


def test_duplicate_across_entry_points_names_both_distributions(entry_points):
    twin = SimpleNamespace(register_strategies=good_plugin.register_strategies)  # a second plugin object, same class
    entry_points(FakeEntryPoint("one", "shout-one", good_plugin), FakeEntryPoint("two", "shout-two", twin))
    with pytest.raises(RegistryError, match="shout-one.*shout-two"):
        build_registry()


def test_unknown_name_gets_did_you_mean():
    reg = build_registry()
    with pytest.raises(RegistryError, match=r"unknown strategy 'temprature'; did you mean temperature\?") as info:
        reg.get("temprature")
    assert f"known: {', '.join(BUILTIN_NAMES)}" in str(info.value)
    with pytest.raises(RegistryError, match="unknown strategy 'zzz' \\(known"):
        reg.get("zzz")


def test_plugin_that_fails_to_import_is_reported_and_others_load(entry_points):
    broken, good = entry_points(
        FakeEntryPoint("broken", "janus-broken-plugin", error=ImportError("No module named 'nonexistent_dep'")),
        FakeEntryPoint("good", "janus-shout", good_plugin),
    )
    reg = build_registry()
    assert broken.loaded and good.loaded
    assert "shout" in reg.names() and reg.entries["shout"].distribution == "janus-shout"
    assert reg.entries["shout"].version == "9.9"
    assert len(reg.failures) == 1
    failure = reg.failures[0]
    assert failure.plugin == "broken" and failure.distribution == "janus-broken-plugin"
    assert "ImportError" in failure.error and "nonexistent_dep" in failure.error


def test_plugin_raising_any_exception_on_import_is_contained(entry_points):
    entry_points(FakeEntryPoint("boom", "janus-boom", error=ZeroDivisionError("division by zero")),
                 FakeEntryPoint("good", "janus-shout", good_plugin))
    reg = build_registry()
    assert "shout" in reg.names()
    assert reg.failures[0].error.startswith("ZeroDivisionError")


def test_allowlist_loads_only_named_plugins(entry_points, monkeypatch):
    a, b = entry_points(FakeEntryPoint("a", "dist-a", good_plugin), FakeEntryPoint("b", "dist-b", old_interface))
    monkeypatch.setenv("JANUS_DECODING_PLUGINS", " a , other")
    reg = build_registry()
    assert a.loaded and not b.loaded
    assert "shout" in reg.names() and reg.failures == []


def test_blocklist_skips_named_plugins(entry_points, monkeypatch):
    a, b = entry_points(FakeEntryPoint("a", "dist-a", good_plugin),
                        FakeEntryPoint("b", "dist-b", error=ImportError("should never be imported")))
    monkeypatch.setenv("JANUS_DECODING_BLOCK_PLUGINS", "b")
    reg = build_registry()
    assert a.loaded and not b.loaded and reg.failures == []


def test_disable_autoload_keeps_builtins(entry_points, monkeypatch):
    (a,) = entry_points(FakeEntryPoint("a", "dist-a", good_plugin))
    monkeypatch.setenv("JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = build_registry()
    assert not a.loaded and reg.names() == BUILTIN_NAMES


def test_interface_version_mismatch_is_skipped(entry_points):
    entry_points(FakeEntryPoint("old", "janus-ancient", old_interface), FakeEntryPoint("good", "dist", good_plugin))
    reg = build_registry()
    assert "ancient" not in reg.names() and "shout" in reg.names()
    (failure,) = reg.failures
    assert failure.distribution == "janus-ancient"
    assert f"declares interface 0, this janus-decoding provides {INTERFACE_VERSION}" in failure.error


def test_registering_a_non_strategy_is_refused_by_name():
    with pytest.raises(RegistryError, match="not a Strategy class"):
        StrategyRegistry().register(bad_registration.NotAStrategy, distribution="x")
    with pytest.raises(RegistryError, match="NotAStrategy.*not a Strategy class"):
        build_registry(extra_plugins=[bad_registration])  # loud at registration, not at token 300


def test_strategy_name_must_be_an_identifier():
    class Nameless(Strategy):
        """No name."""

    with pytest.raises(RegistryError, match="needs a `name`"):
        StrategyRegistry().register(Nameless, distribution="x")


def test_unknown_hook_point_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="unknown hook point 'post_logits'"):
        type("Typo", (Strategy,), {"name": "typo", "hooks": ("post_logits",)})
    with pytest.raises(TypeError, match="declares hook 'pre_logits' but defines no such method"):
        type("Lazy", (Strategy,), {"name": "lazy", "hooks": ("pre_logits",)})


def test_default_registry_is_built_once_and_list_strategies_uses_it():
    assert default_registry() is default_registry()
    listed = janus_decoding.list_strategies()
    assert [s["name"] for s in listed] == BUILTIN_NAMES
    temperature = next(s for s in listed if s["name"] == "temperature")
    assert temperature["distribution"] == BUILTIN_DISTRIBUTION
    assert temperature["parameters"]["properties"]["temperature"] == {
        "type": "number", "exclusiveMinimum": 0.0, "default": 1.0, "description": "T"}
