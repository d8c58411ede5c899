"""Runs made with deterministic algorithms on keep cuDNN's attention kernels out (see core/repeatable.py)."""

from __future__ import annotations

import pytest
import torch

import janus_decoding
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.models.tiny import write_tiny_checkpoint
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import Strategy


class _SeeKernels(Strategy):
    """Records, at every logits call, whether SDPA may pick cuDNN's kernels right now."""

    name = "see_kernels"
    hooks = ("pre_logits",)

    def __init__(self, **config):
        super().__init__(**config)
        self.seen: list[bool] = []

    def pre_logits(self, state, logits):
        self.seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return logits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return janus_decoding.load_model(str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _both_modes(model) -> list[bool]:
    seer = _SeeKernels()
    decoder = Decoder([seer])
    with torch.inference_mode():
        run_images(model, decoder, [ImageRequest("a fox", 0, 0)], cfg=decoder.cfg, sampler=Sampler())
        run_text(model, decoder, [model.chat_prompt_ids("hi")], max_new_tokens=3, sampler=Sampler(), seeds=[0])
    return seer.seen


def test_deterministic_runs_leave_cudnn_attention_out(model, deterministic):
    seen = _both_modes(model)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the run


def test_other_runs_leave_the_choice_to_sdpa(model):
    assert not torch.are_deterministic_algorithms_enabled()
    seen = _both_modes(model)
    assert seen and all(seen)
