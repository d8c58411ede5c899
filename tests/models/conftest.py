"""Shared fixtures for tests/models: tiny checkpoints written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from janus_decoding.models.tiny import write_tiny_checkpoint, write_tiny_llama


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-hf", seed=0, format="hf")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-deepseek", seed=0, format="deepseek")
