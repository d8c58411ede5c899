"""Fixtures for the batch job's tests: a tiny checkpoint, the faulty strategies, the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import batch_faulty
from janus_decoding.cli import main
from janus_decoding.models.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("batch-ckpt") / "tiny", seed=0)


@pytest.fixture
def faulty_registry():
    """The default registry with the faulty strategies (reset afterwards)."""
    from janus_decoding.plugins import registry

    batch_faulty.install()
    yield
    registry.reset_default_registry()


@pytest.fixture
def cli(tiny_folder: Path, faulty_registry):
    """Run ``janus-decode batch`` in this process: ``cli(prompts, out, *more_args)`` gives click's Result."""

    def run(prompts: Path, out: Path, *args: str):
        argv = ["batch", str(prompts), "--out", str(out), "--model", str(tiny_folder), *args]
        return CliRunner().invoke(main, argv, catch_exceptions=False)

    return run
