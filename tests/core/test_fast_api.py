"""The API's fast path (graph loop; on CPU the same step without capture) gives the eager loop's tokens."""

from __future__ import annotations

import warnings

import torch

from janus_decoding.core.graph import EagerStepWarning
from janus_decoding.plugins.decoder import Decoder


def test_generate_images_fast_equals_eager_on_cpu(janus) -> None:
    decoder = Decoder.from_spec("top_k(top_k=50) > temperature(temperature=0.8)")
    eager = decoder.generate_images(janus, ["a red cube", "a dog on a beach"], n=2, seed=4, fast=False)
    with warnings.catch_warnings():  # said once per process: "no CUDA device; the fast step runs without graphs"
        warnings.simplefilter("ignore", EagerStepWarning)
        fast = decoder.generate_images(janus, ["a red cube", "a dog on a beach"], n=2, seed=4, fast=True)
    assert torch.equal(eager.tokens, fast.tokens)
