"""Every image token's input embedding, computed once, so that a decode step looks its rows up.

Why: Janus re-embeds each sampled image token through a small MLP (the generation embedding, then the aligner's
two linears with a GELU between). At 16 images with CFG that is five kernels a step, 19 µs of an H200's step at the
7B shape, to map 16 ids into a fixed table of ``image_vocab_size`` rows — a row lookup gives the same vectors.

The table is the model's own ``embed_image_tokens`` over all ids, in chunks (the temporaries stay small). Its rows
are the same function of the same weights, but a GEMM of thousands of rows may round differently in the last bit
from one of 16, so the fast loop uses the table on CUDA only, where its steps are compared to the eager loop within
bf16 tolerance; on CPU (compared token for token in fp32) it re-embeds as the eager loop does.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["image_embedding_table"]

CHUNK = 2048  # ids embedded at once while building (the aligner's temporaries are CHUNK × hidden)


def image_embedding_table(adapter: Any, chunk: int = CHUNK) -> torch.Tensor | None:
    """``[image_vocab_size, hidden]``: row ``i`` is ``adapter.embed_image_tokens([i])``; None when the model has no
    image vocabulary."""
    vocab = getattr(adapter, "image_vocab_size", None)
    if not vocab:
        return None
    device = adapter.device
    with torch.no_grad():
        parts = [adapter.embed_image_tokens(torch.arange(start, min(start + chunk, vocab), device=device))
                 for start in range(0, vocab, chunk)]
        return torch.cat(parts, 0)
