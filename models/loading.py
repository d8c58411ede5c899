"""Load a Janus (transformers or DeepSeek layout) or plain causal-LM folder for the decoding runtime.

Nothing here reaches a model hub: every transformers `from_pretrained` call passes `local_files_only=True`, and the
special path "tiny" writes a random tiny checkpoint into a local cache folder once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .tokenizer import PAD_TOKEN

__all__ = ["LoadedModel", "ModelLoadError", "default_cache_dir", "load_model"]

TINY = "tiny"
_CACHE_ENV = "JANUS_DECODING_CACHE"


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; the message is one line naming the path or file at fault."""


@dataclass
class LoadedModel:
    """A model ready for inference, with what the runtime needs around it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: Literal["janus", "causal_lm"]
    image_processor: Any | None
    source_format: Literal["hf", "deepseek", "causal_lm"]
    path: Path


def default_cache_dir() -> Path:
    """Where `load_model("tiny")` writes its checkpoint: `$JANUS_DECODING_CACHE` or ~/.cache/janus_decoding."""
    root = os.environ.get(_CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "janus_decoding"
    return base / "tiny-seed0"


def _tiny_folder() -> Path:
    from .tiny import GENERATOR_VERSION, TINY_MARKER, write_tiny_checkpoint

    folder = default_cache_dir()
    marker = folder / TINY_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        wanted = {"generator_version": GENERATOR_VERSION, "seed": 0, "format": "hf", "shape": "tiny"}
        if all(info.get(k) == v for k, v in wanted.items()) and (folder / "config.json").is_file():
            return folder
    return write_tiny_checkpoint(folder, seed=0, format="hf", shape="tiny")


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: missing config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable config.json ({type(exc).__name__}: {exc})".replace("\n", " "))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: config.json is not a JSON object")
    return data


def _load_tokenizer(folder: Path, config: Any) -> PreTrainedTokenizerBase:
    try:
        # Passing the (converted) config stops AutoTokenizer from re-reading config.json, which it cannot parse
        # for DeepSeek's multi_modality layout.
        return AutoTokenizer.from_pretrained(str(folder), config=config, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; report one line naming the folder
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({msg})") from exc


def _load_image_processor(folder: Path, image_size: int) -> Any:
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    path = folder / "preprocessor_config.json"
    kwargs: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: unreadable ({exc})".replace("\n", " ")) from exc
        if "image_mean" in raw:
            kwargs["image_mean"] = raw["image_mean"]
        if "image_std" in raw:
            kwargs["image_std"] = raw["image_std"]
        if "min_size" in raw:
            kwargs["min_size"] = raw["min_size"]
    kwargs["size"] = {"height": image_size, "width": image_size}
    return JanusImageProcessorPil(**kwargs)


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load the model folder at `path` (or "tiny") onto `device` in `dtype`, in eval mode without gradients.

    Recognised folders: transformers Janus (`model_type` "janus"), DeepSeek's original Janus
    (`model_type` "multi_modality") and plain causal LMs (e.g. "llama"). Raises `ModelLoadError` naming the path or
    file for a missing folder, missing config.json, unknown model_type, missing or unsafe weights.
    """
    from .checkpoint_io import load_causal_lm, load_janus

    if str(path) == TINY:
        folder = _tiny_folder()
    else:
        folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found")
    folder = folder.resolve()
    raw = _read_config_json(folder)
    model_type = raw.get("model_type")

    if model_type == "janus":
        model = load_janus(folder, raw, dtype=dtype, device=device, source_format="hf")
        kind, source = "janus", "hf"
    elif model_type == "multi_modality":
        model = load_janus(folder, raw, dtype=dtype, device=device, source_format="deepseek")
        kind, source = "janus", "deepseek"
    else:
        model = load_causal_lm(folder, raw, dtype=dtype, device=device)
        kind, source = "causal_lm", "causal_lm"

    tokenizer = _load_tokenizer(folder, model.config)
    if kind == "janus" and tokenizer.pad_token is None and PAD_TOKEN in tokenizer.get_vocab():
        # DeepSeek's tokenizer_config.json ships `pad_token: null`; its processor pads with this token by string.
        tokenizer.pad_token = PAD_TOKEN
    image_processor = None
    if kind == "janus":
        image_processor = _load_image_processor(folder, model.config.vision_config.image_size)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,  # type: ignore[arg-type]
        image_processor=image_processor,
        source_format=source,  # type: ignore[arg-type]
        path=folder,
    )
