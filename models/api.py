"""``janus_decoding.load_model``: load a folder (see ``loading.py``) and wrap it for the loop (``adapter.py``)."""

from __future__ import annotations

from typing import Any

import torch

from .adapter import JanusAdapter
from .loading import ModelLoadError, load_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")


def load(path_or_name: str, *, device: str | torch.device = "cpu", dtype: Any = None) -> JanusAdapter:
    loaded = load_model(path_or_name, device=device, dtype=parse_dtype(dtype))
    adapter = JanusAdapter(loaded.model, loaded.tokenizer, loaded.image_processor, name=str(path_or_name))
    adapter.loaded = loaded
    return adapter


__all__ = ["load", "parse_dtype", "ModelLoadError"]
