"""Fixtures shared by the whole suite: one tiny Janus checkpoint per session, hermetic plugin discovery."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without CUDA, Triton kernels (core/decode_attention.py) run through Triton's interpreter. It must be chosen before
# Triton is first imported (torch._dynamo imports it, so before anything loads transformers' models).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import janus_decoding  # noqa: E402
from janus_decoding.models.tiny import write_tiny_checkpoint, write_tiny_llama
from janus_decoding.plugins.registry import reset_default_registry  # noqa: E402

# The tiny model's ops are far too small to gain from intra-op threads; on a shared 2-core runner with two xdist
# workers, extra threads only spin against each other (an order of magnitude slower).
torch.set_num_threads(1)

# One fixed hypothesis profile: deterministic examples, no deadline (CPU timing varies on shared runners).
settings.register_profile("janus-ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("janus-ci")

AUTOLOAD_OFF = "JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD"
PLUGIN_ENV = (AUTOLOAD_OFF, "JANUS_DECODING_PLUGINS", "JANUS_DECODING_BLOCK_PLUGINS")


@pytest.fixture(autouse=True)
def hermetic_plugins(monkeypatch: pytest.MonkeyPatch):
    """No entry-point plugin leaks into a test; the process-wide registry is rebuilt for each test."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(AUTOLOAD_OFF, "1")
    reset_default_registry()
    yield
    reset_default_registry()


@pytest.fixture(scope="session")
def janus_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one tiny random Janus checkpoint (transformers format, seed 0) the suite runs on."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-janus", seed=0)


@pytest.fixture(scope="session")
def janus(janus_folder: Path):
    """The tiny Janus, loaded once (CPU, fp32). Tests must not change its weights."""
    return janus_decoding.load_model(str(janus_folder))


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain LLaMA folder (no chat template), for chat on a causal LM."""
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def llama(llama_folder: Path):
    return janus_decoding.load_model(str(llama_folder))
