"""Fixture plugins: real plugin modules (Strategy subclasses + a ``register_strategies`` hookimpl) for the tests.

They report what they saw through ``state.trace`` (``trace.write(name, ...)``), so tests read it from the result and
no fixture keeps global state.
"""
