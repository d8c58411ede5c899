"""Safe, memory-lean reading of checkpoint folders into models built without materialised weights.

- `.safetensors` files are read with safetensors; `.bin` files only with
  `torch.load(weights_only=True, mmap=True, map_location="cpu")`, so a pickle that would run code is refused
  before anything runs.
- A shard index (`*.index.json`) may only name files inside the folder: absolute paths, `..` and symlinks that
  resolve outside are refused (one exception: a Hugging Face cache snapshot, whose files are symlinks into the
  sibling `blobs/` folder of the same cache entry). Every shard it names must exist.
- The model is built with its parameters on the meta device (no random init is materialised) while buffers are
  real, so non-persistent buffers (rotary `inv_freq`, `position_ids`) are computed by the modules themselves. The
  weights are then assigned shard by shard, cast to the target dtype, and every parameter/buffer is checked:
  a missing, unexpected or wrongly shaped key is a `ModelLoadError` naming it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from .loading import ModelLoadError

__all__ = [
    "Converter",
    "UnmappedKeyError",
    "build_on_meta",
    "find_weight_files",
    "iter_checkpoint_shards",
    "load_causal_lm",
    "load_janus",
    "load_state_into",
    "read_weight_file",
]

# Preferred weight layouts, first match wins.
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class UnmappedKeyError(KeyError):
    """Raised by a `Converter` for a checkpoint key it does not know."""


# Maps one checkpoint entry to zero or more (model key, tensor) pairs; raises UnmappedKeyError for unknown names.
Converter = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "mmap can only be used" in text:
        return "legacy (non-zip) pickle file; only torch.save zip checkpoints are read"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch's weights_only refusal puts the useful part ("Unsupported global: GLOBAL x.y ...") mid-message.
    match = re.search(r"Unsupported (?:global: GLOBAL [\w.]+|operand \S+)", text)
    if match:
        return match.group(0).strip()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Finding and reading weight files
# --------------------------------------------------------------------------------------------------------------


def _allowed_roots(folder: Path) -> list[Path]:
    roots = [folder]
    # Hugging Face cache: <entry>/snapshots/<revision>/file -> <entry>/blobs/<hash>
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    return roots


def _resolve_inside(folder: Path, name: str, *, source: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{source}: shard name {name!r} is not a file name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ModelLoadError(f"{source}: shard path {name!r} is absolute; shards must lie inside {folder}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ModelLoadError(f"{source}: shard path {name!r} contains '..'; shards must lie inside {folder}")
    candidate = folder / name
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in _allowed_roots(folder)):
        raise ModelLoadError(f"{source}: shard {name!r} resolves to {resolved}, outside {folder}")
    if not resolved.is_file():
        raise ModelLoadError(f"{source}: shard {name!r} is missing ({candidate})")
    return candidate


def _read_index(folder: Path, index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{index}: unreadable shard index ({_one_line(exc)})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: shard index has no 'weight_map'")
    files: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        files.append(_resolve_inside(folder, shard, source=index))
    return files


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of `folder`, validated: an index's shards, or the single weights file."""
    folder = Path(folder)
    for name in _INDEX_NAMES:
        index = folder / name
        if index.is_file():
            return _read_index(folder, index)
    for name in _SINGLE_NAMES:
        single = folder / name
        if single.exists():
            return [_resolve_inside(folder, name, source=folder)]
    looked = ", ".join(_INDEX_NAMES + _SINGLE_NAMES)
    raise ModelLoadError(f"{folder}: no weights found (looked for {looked})")


class _SafetensorsShard:
    """The tensors of one .safetensors file, read one at a time on `pop` (peak memory: one tensor)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._names = list(self._file.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def pop(self, name: str) -> torch.Tensor:
        self._names.remove(name)
        try:
            return self._file.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{self._path}: cannot read tensor {name!r} ({_one_line(exc)})") from exc


def read_weight_file(path: Path) -> dict[str, torch.Tensor] | _SafetensorsShard:
    """Open one weights file: a lazy reader for .safetensors, a memory-mapped dict for torch .bin files.

    Both support iteration over names and `pop(name)`.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        try:
            return _SafetensorsShard(path)
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise ModelLoadError(f"{path}: unreadable safetensors file ({_one_line(exc)})") from exc
    if path.name.endswith((".bin", ".pt", ".pth")):
        try:
            state = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... ; report one line
            raise ModelLoadError(
                f"{path}: refused: not a plain tensor checkpoint (torch.load weights_only=True: {_one_line(exc)})"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ModelLoadError(f"{path}: not a mapping of tensor names to tensors")
        return state
    raise ModelLoadError(f"{path}: unknown weights file type (expected .safetensors or .bin)")


def iter_checkpoint_shards(
    files: list[Path],
) -> Iterator[tuple[Path, dict[str, torch.Tensor] | _SafetensorsShard]]:
    """Yield `(file, tensors)` one file at a time (see `read_weight_file`)."""
    for path in files:
        yield path, read_weight_file(path)


# --------------------------------------------------------------------------------------------------------------
# Building on meta and filling
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter registered on any module is moved to the meta device; buffers stay real.

    Module constructors allocate their weights with `torch.empty` (no pages touched) and this moves them to meta
    at registration, so initialisers run on meta tensors and cost nothing.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(cls: type[nn.Module], config: Any) -> nn.Module:
    """Construct `cls(config)` with parameters on meta and real (correctly initialised) buffers."""
    with _parameters_on_meta():
        return cls(config)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
    else:
        module._buffers[leaf] = value


def load_state_into(
    model: nn.Module,
    shards: Iterator[tuple[Path, dict[str, torch.Tensor] | _SafetensorsShard]],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    convert: Converter | None = None,
    optional: frozenset[str] = frozenset(),
    source_name: Callable[[str], str] | None = None,
) -> set[str]:
    """Fill `model` (built by `build_on_meta`) from `shards`, casting floating tensors to `dtype` on `device`.

    Every persistent state-dict key of the model must be filled exactly once, except those in `optional` (e.g. a
    tied `lm_head.weight`). Returns the set of filled keys. Errors name the key and the file.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    filled: dict[str, Path] = {}
    for path, state in shards:
        for src_name in list(state):
            tensor = state.pop(src_name)
            try:
                pairs = convert(src_name, tensor) if convert is not None else [(src_name, tensor)]
            except UnmappedKeyError as exc:
                raise ModelLoadError(f"{path}: unexpected key {src_name!r} (no mapping for it)") from exc
            except ValueError as exc:  # a converter that cannot split or reshape the tensor
                raise ModelLoadError(f"{path}: {exc}") from exc
            for key, value in pairs:
                if key not in expected:
                    detail = "" if key == src_name else f" (mapped to {key!r}, which the model lacks)"
                    raise ModelLoadError(f"{path}: unexpected key {src_name!r}{detail}")
                if tuple(value.shape) != expected[key]:
                    target = "the model" if key == src_name else f"the model's {key!r}"
                    raise ModelLoadError(
                        f"{path}: key {src_name!r} has shape {tuple(value.shape)} but {target} expects "
                        f"{expected[key]}"
                    )
                if key in filled:
                    raise ModelLoadError(f"{path}: key {key!r} given twice (also in {filled[key].name})")
                # A copy: the model owns contiguous memory, not a view into the file's mapping or a fused tensor.
                target_dtype = dtype if value.is_floating_point() else value.dtype
                value = value.to(device=device, dtype=target_dtype, copy=True)
                _set_tensor(model, key, value.contiguous())
                filled[key] = path
        del state
    missing = [k for k in expected if k not in filled and k not in optional]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        origin = f" (checkpoint name {source_name(missing[0])!r})" if source_name is not None else ""
        where = _describe(filled) or "checkpoint"
        raise ModelLoadError(f"{where}: missing key {missing[0]!r}{origin}{more}")
    return set(filled)


def _describe(filled: dict[str, Path]) -> str:
    folders = {p.parent for p in filled.values()}
    return str(next(iter(folders))) if len(folders) == 1 else ""


def _tie_or_untie(model: nn.Module, filled: set[str], output_key: str, input_key: str, path: Path) -> None:
    """Untie the text head when the checkpoint has its own, else tie it to the input embeddings."""
    configs = [model.config]
    text = model.config.get_text_config()
    if text is not model.config:
        configs.append(text)
    if output_key in filled:
        for cfg in configs:
            cfg.tie_word_embeddings = False
        return
    if not getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError(f"{path}: missing key {output_key!r} and the config does not tie it to {input_key!r}")
    model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _finish(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    leftover = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [name for name, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise ModelLoadError(f"internal: {leftover[0]!r} was not filled")
    model.to(device)  # the weights are there already; this moves the buffers built on the CPU
    model.config.dtype = dtype
    for name in ("text_config", "vision_config", "vq_config"):
        sub = getattr(model.config, name, None)
        if sub is not None:
            sub.dtype = dtype
    model.eval()
    model.requires_grad_(False)
    return model


def load_janus(
    folder: Path,
    raw_config: dict[str, Any],
    *,
    dtype: torch.dtype,
    source_format: str,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build a `JanusForConditionalGeneration` from a transformers or DeepSeek folder and fill it."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    convert: Converter | None = None
    source_name: Callable[[str], str] | None = None
    if source_format == "deepseek":
        from .deepseek import deepseek_converter, hf_to_deepseek_name, janus_config_from_deepseek

        config = janus_config_from_deepseek(raw_config, folder=folder)
        convert = deepseek_converter()

        def source_name(key: str) -> str:
            return hf_to_deepseek_name(key)[0]

    else:
        try:
            config = JanusConfig.from_dict(raw_config)
        except Exception as exc:  # noqa: BLE001 - config validation errors vary; report one line
            raise ModelLoadError(f"{folder / 'config.json'}: invalid Janus config ({_one_line(exc)})") from exc
    files = find_weight_files(folder)
    model = build_on_meta(JanusForConditionalGeneration, config)
    filled = load_state_into(
        model,
        iter_checkpoint_shards(files),
        dtype=dtype,
        device=device,
        convert=convert,
        optional=frozenset({"lm_head.weight"}),
        source_name=source_name,
    )
    _tie_or_untie(model, filled, "lm_head.weight", "model.language_model.embed_tokens.weight", folder)
    return _finish(model, dtype, device)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def load_causal_lm(
    folder: Path, raw_config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build an `AutoModelForCausalLM` for a plain text model folder (e.g. LLaMA) and fill it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / "config.json"
    model_type = raw_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{path}: unknown model_type {model_type!r}")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise ModelLoadError(f"{path}: model_type {model_type!r} is not a causal language model") from exc
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: invalid config ({_one_line(exc)})") from exc
    files = find_weight_files(folder)
    model = build_on_meta(cls, config)
    output = model.get_output_embeddings()
    out_key = f"{_module_name(model, output)}.weight" if output is not None else None
    optional = frozenset({out_key}) if out_key else frozenset()
    filled = load_state_into(model, iter_checkpoint_shards(files), dtype=dtype, device=device, optional=optional)
    if out_key is not None:
        in_key = f"{_module_name(model, model.get_input_embeddings())}.weight"
        _tie_or_untie(model, filled, out_key, in_key, folder)
    return _finish(model, dtype, device)
