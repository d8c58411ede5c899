"""pytest plugin (entry point ``pytest11``): fixtures for strategy authors.

* ``check_strategy`` — the :func:`janus_decoding.testing.check_strategy` function;
* ``janus_tiny_model`` — the tiny random Janus the contract runs on (written and loaded once per process);
* ``janus_hermetic`` — entry-point autoload off (``JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD=1``) and a fresh
  process-wide registry, so installed plugins cannot leak into a test.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

AUTOLOAD_OFF = "JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD"


@pytest.fixture
def check_strategy() -> Callable[..., None]:
    """``check_strategy(cls, **params)``: raise ContractError naming the broken property."""
    from .contract import check_strategy as check

    return check


@pytest.fixture
def janus_tiny_model():
    """The tiny random Janus (CPU, fp32) of :func:`janus_decoding.testing.tiny_model`; do not change its weights."""
    from .model_contract import tiny_model

    return tiny_model()


@pytest.fixture
def janus_hermetic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Entry-point plugins are not loaded; the default registry is rebuilt before and after the test."""
    from janus_decoding.plugins.registry import reset_default_registry

    monkeypatch.setenv(AUTOLOAD_OFF, "1")
    reset_default_registry()
    yield
    reset_default_registry()
