"""Tiny (and full-shape) random Janus checkpoints for tests, demos and benchmarks.

The tiny model is structurally faithful to Janus-Pro: a LLaMA with an untied `lm_head`, a SigLIP-style vision tower
with an aligner, a LlamaGen-style VQ with five resolution levels (16x down/upsampling), a generation embedding table,
aligner and head. Only the widths are small:

- LLM: hidden 64, 4 layers, 4 heads, 2 KV heads, intermediate 128, vocab = tiny tokenizer size, RMS eps 1e-6,
  RoPE theta 10000.
- Vision: 64 px, patch 16 (a 4x4 = 16 token grid), hidden 32, 2 layers, 2 heads.
- VQ: codebook 512 x 8, base channels 32 (GroupNorm(32) needs a multiple of 32), channel multipliers (1,1,1,1,2),
  1 res block per level, latent channels 32; a 4x4 grid decodes to 64x64 px.

Weights are drawn tensor by tensor from a `torch.Generator` seeded from `(seed, tensor name)`, so the same seed gives
the same weights in every format and on every run, and one tensor never depends on the order of the others.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from .tokenizer import BOI_TOKEN, IMAGE_TOKEN, build_tokenizer, save_tokenizer

__all__ = [
    "TINY_MARKER",
    "tiny_janus_config",
    "tiny_llama_config",
    "write_tiny_checkpoint",
    "write_tiny_llama",
]

Format = Literal["hf", "deepseek"]
Shape = Literal["tiny", "1b", "7b"]

# A file written into every folder made here; its presence marks a folder that may be overwritten.
TINY_MARKER = "janus_decoding_tiny.json"
# Bump when the weights or layout for a given (seed, format, shape) change, so caches are rebuilt.
GENERATOR_VERSION = 1

_IMAGE_MEAN = (0.5, 0.5, 0.5)
_IMAGE_STD = (0.5, 0.5, 0.5)
_BACKGROUND = (127, 127, 127)
_MIN_IMAGE_SIZE = 14
# Elements drawn per call when filling a large tensor chunk by chunk (bounds peak RAM at full shapes).
_DRAW_CHUNK_ELEMENTS = 1 << 24
# Target size of one weights file when the checkpoint is sharded (full shapes only).
_SHARD_BYTES = 2 << 30


@functools.lru_cache(maxsize=1)
def _tiny_token_ids() -> dict[str, int]:
    """Vocabulary size and special-token ids of the tiny tokenizer, looked up by string."""
    tok = build_tokenizer()
    return {
        "vocab_size": len(tok),
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "image": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "boi": tok.convert_tokens_to_ids(BOI_TOKEN),
    }


def tiny_llama_config() -> LlamaConfig:
    """The tiny LLaMA text config (also the backbone of the tiny Janus)."""
    ids = _tiny_token_ids()
    return LlamaConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
    )


def tiny_janus_config() -> JanusConfig:
    """A tiny, structurally faithful Janus-Pro config (numbers in the module docstring)."""
    ids = _tiny_token_ids()
    text = tiny_llama_config()
    image_size, patch_size = 64, 16
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        mlp_ratio=4.0,
        layer_norm_eps=1e-6,
        projection_dim=text.hidden_size,
        depth=2,
        num_image_tokens=(image_size // patch_size) ** 2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=512,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1, 2],
        num_res_blocks=1,
        projection_dim=text.hidden_size,
        image_token_embed_dim=text.hidden_size,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=ids["image"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["bos"]
    config.eos_token_id = ids["eos"]
    config.pad_token_id = ids["pad"]
    return config


def _generation_config(config: JanusConfig | LlamaConfig) -> GenerationConfig:
    ids = _tiny_token_ids()
    kwargs = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    if isinstance(config, JanusConfig):
        # transformers' Janus image generation reads the begin-of-image id from here.
        kwargs["generation_kwargs"] = {"boi_token_id": ids["boi"]}
    return GenerationConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Deterministic random weights
# --------------------------------------------------------------------------------------------------------------


def tensor_spec(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the persistent state (parameters and persistent buffers) of `model`."""
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def meta_model(config: JanusConfig | LlamaConfig) -> torch.nn.Module:
    """Build the transformers model for `config` on the meta device (no memory, no random init)."""
    cls = JanusForConditionalGeneration if isinstance(config, JanusConfig) else LlamaForCausalLM
    with torch.device("meta"):
        return cls(config)


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def draw_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The random value of tensor `name` for `seed`: depends only on (seed, name, shape).

    Norm weights are 1 + 0.1 N(0,1); other 1-D tensors (biases) 0.02 N(0,1); matrices and kernels
    N(0,1) / sqrt(fan_in). Large tensors are drawn chunk by chunk along the first dimension.
    """
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    out = torch.empty(shape, dtype=dtype)
    if len(shape) == 0:
        return out.fill_(0.0)
    rows = shape[0]
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _DRAW_CHUNK_ELEMENTS // per_row)
    if len(shape) == 1:
        scale, offset = (0.1, 1.0) if "norm" in leaf else (0.02, 0.0)
    else:
        scale, offset = 1.0 / math.sqrt(per_row), 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = torch.randn((stop - start, *shape[1:]), generator=gen, dtype=torch.float32)
        out[start:stop].copy_(chunk.mul_(scale).add_(offset))
    return out


def iter_random_state(
    spec: list[tuple[str, tuple[int, ...]]], seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every entry of `spec`, one at a time."""
    for name, shape in spec:
        yield name, draw_tensor(name, shape, seed, dtype)


# --------------------------------------------------------------------------------------------------------------
# Writing folders
# --------------------------------------------------------------------------------------------------------------


def _check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / TINY_MARKER).is_file():
        raise FileExistsError(f"{folder}: folder is not empty and is not a tiny checkpoint; refusing to write")


def _same_marker(a: Path, b: Path) -> bool:
    try:
        return json.loads((a / TINY_MARKER).read_text()) == json.loads((b / TINY_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _publish(tmp: Path, folder: Path) -> None:
    """Move the finished `tmp` folder to `folder`, replacing a previous tiny checkpoint there."""
    # mkdtemp makes a private (0700) folder and some writers create 0600 files: use ordinary permissions.
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    for item in tmp.iterdir():
        item.chmod(0o666 & ~mask)
    if _same_marker(tmp, folder):
        # An identical checkpoint (same generator version, kind, seed, format, shape) is already in place, maybe
        # written by a concurrent process that is reading it now: keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / "x")
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another writer published the same folder first: keep theirs if it is complete.
        if not (folder / TINY_MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_marker(folder: Path, **info: object) -> None:
    payload = {"generator_version": GENERATOR_VERSION, **info}
    (folder / TINY_MARKER).write_text(json.dumps(payload, indent=2) + "\n")


def _write_preprocessor(folder: Path, image_size: int) -> None:
    """preprocessor_config.json for transformers' JanusImageProcessorPil."""
    cfg = {
        "image_processor_type": "JanusImageProcessorPil",
        "size": {"height": image_size, "width": image_size},
        "min_size": _MIN_IMAGE_SIZE,
        "do_resize": True,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(_IMAGE_MEAN),
        "image_std": list(_IMAGE_STD),
        "do_pad": True,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_safetensors(
    folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], *, shard_bytes: int, progress: object | None = None
) -> None:
    """Write tensors to model.safetensors, or to shards plus model.safetensors.index.json past `shard_bytes`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush(final: bool) -> None:
        nonlocal size
        if not shards[-1]:
            return
        tmp_name = f"shard-{len(written):05d}.safetensors.part"
        save_file(shards[-1], str(folder / tmp_name), metadata={"format": "pt"})
        written.append((tmp_name, list(shards[-1])))
        shards[-1] = {}
        size = 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            flush(False)
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
        if progress is not None:
            progress.update(nbytes)  # type: ignore[attr-defined]
    flush(True)

    if len(written) == 1:
        os.replace(folder / written[0][0], folder / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (tmp_name, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _full_shape_config(shape: str) -> JanusConfig:
    from .shapes import janus_pro_config

    config = janus_pro_config(shape)  # type: ignore[arg-type]
    ids = _tiny_token_ids()
    # The tiny tokenizer's ids all lie below the real vocabulary size (102400), so every id it can produce is a
    # valid row of the full-shape embedding table; the special-token ids recorded here are the tiny tokenizer's.
    config.image_token_id = ids["image"]
    for cfg in (config, config.text_config):
        cfg.bos_token_id = ids["bos"]
        cfg.eos_token_id = ids["eos"]
        cfg.pad_token_id = ids["pad"]
    return config


def write_tiny_checkpoint(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    format: Format = "hf",
    shape: Shape = "tiny",
) -> Path:
    """Write a random-weight Janus checkpoint into `folder` and return its path.

    `format="hf"`: transformers' layout (config.json of model_type "janus", safetensors, generation_config.json).
    `format="deepseek"`: DeepSeek's original layout (model_type "multi_modality", `.bin` shards, same weights).
    `shape="tiny"` is the tiny model of this module (float32, 1.28 M parameters, about 5 MB); `"1b"`/`"7b"` are
    Janus-Pro's real sizes (bfloat16 on disk, drawn chunk by chunk; several GB and minutes to write).

    Refuses a non-empty folder unless it holds a previous checkpoint written here. Everything is written into a
    temporary sibling folder that is renamed into place at the end, so a crash leaves nothing half-written.
    """
    if format not in ("hf", "deepseek"):
        raise ValueError(f"format must be 'hf' or 'deepseek', got {format!r}")
    if shape not in ("tiny", "1b", "7b"):
        raise ValueError(f"shape must be 'tiny', '1b' or '7b', got {shape!r}")
    folder = Path(folder).expanduser().absolute()
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)

    config = tiny_janus_config() if shape == "tiny" else _full_shape_config(shape)
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    config.dtype = dtype
    config.text_config.dtype = dtype
    spec = tensor_spec(meta_model(config))
    tokenizer = build_tokenizer()

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        progress = None
        total = sum(math.prod(s) for _, s in spec) * torch.finfo(dtype).bits // 8
        if shape != "tiny":
            from tqdm.auto import tqdm

            progress = tqdm(total=total, unit="B", unit_scale=True, desc=f"janus-pro-{shape} ({format})")
        tensors = iter_random_state(spec, seed, dtype)
        if format == "hf":
            config.save_pretrained(str(tmp))
            _generation_config(config).save_pretrained(str(tmp))
            _write_safetensors(tmp, tensors, shard_bytes=_SHARD_BYTES, progress=progress)
            save_tokenizer(tokenizer, tmp)
            _write_preprocessor(tmp, config.vision_config.image_size)
        else:
            from .deepseek import write_deepseek_folder

            write_deepseek_folder(
                tmp, config, tensors, tokenizer, seed=seed, dtype=dtype, total_bytes=total, progress=progress
            )
        if progress is not None:
            progress.close()
        _write_marker(tmp, kind="janus", seed=seed, format=format, shape=shape)
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_tiny_llama(folder: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny plain `LlamaForCausalLM` folder (transformers layout, the tiny tokenizer, no chat template)."""
    folder = Path(folder).expanduser().absolute()
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config()
    config.dtype = torch.float32
    spec = tensor_spec(meta_model(config))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        config.save_pretrained(str(tmp))
        _generation_config(config).save_pretrained(str(tmp))
        _write_safetensors(tmp, iter_random_state(spec, seed, torch.float32), shard_bytes=_SHARD_BYTES)
        save_tokenizer(build_tokenizer(), tmp)
        _write_marker(tmp, kind="causal_lm", seed=seed, format="hf", shape="tiny")
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
