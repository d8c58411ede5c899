"""Safety and strictness of checkpoint reading: every refusal is one line naming the culprit."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus_decoding.models.checkpoint_io import find_weight_files
from janus_decoding.models.loading import ModelLoadError, load_model


class _Trap:
    """Unpickling this calls open(marker, "w"), which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _to_bin_shards(folder: Path, n: int = 2) -> dict[str, str]:
    """Replace model.safetensors by n torch .bin shards plus pytorch_model.bin.index.json."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = list(state)
    weight_map: dict[str, str] = {}
    for i in range(n):
        shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k] for k in names[i::n]}
        torch.save(part, folder / shard)
        weight_map.update({k: shard for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def _load_error(folder: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bin_shards_load_like_safetensors(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "bin")
    _to_bin_shards(folder)
    a, b = load_model(tiny_hf).model, load_model(folder).model
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_load_in_bfloat16(tiny_hf: Path) -> None:
    model = load_model(tiny_hf, dtype=torch.bfloat16).model
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.vision_model.embeddings.position_ids.dtype == torch.int64


@pytest.mark.parametrize(
    "shard, fragment",
    [
        ("/etc/passwd", "absolute"),
        ("../outside.bin", "'..'"),
        ("sub/../../outside.bin", "'..'"),
    ],
)
def test_index_pointing_outside_is_refused(tiny_hf: Path, tmp_path: Path, shard: str, fragment: str) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    weight_map = _to_bin_shards(folder)
    weight_map[next(iter(weight_map))] = shard
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = _load_error(folder)
    assert fragment in message and "pytorch_model.bin.index.json" in message


def test_index_symlink_escaping_is_refused(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    weight_map = _to_bin_shards(folder)
    first = sorted(set(weight_map.values()))[0]
    outside = tmp_path / "elsewhere.bin"
    os.replace(folder / first, outside)
    (folder / first).symlink_to(outside)
    message = _load_error(folder)
    assert first in message and "outside" in message


def test_missing_shard_is_refused(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    weight_map = _to_bin_shards(folder)
    second = sorted(set(weight_map.values()))[1]
    (folder / second).unlink()
    message = _load_error(folder)
    assert second in message and "missing" in message


def test_code_running_pickle_is_refused_without_running(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"lm_head.weight": _Trap(marker)}, folder / "pytorch_model.bin")
    message = _load_error(folder)
    assert not marker.exists()
    assert "pytorch_model.bin" in message and "refused" in message and "weights_only" in message


def test_raw_pickle_is_refused_without_running(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Trap(marker)}))
    message = _load_error(folder)
    assert not marker.exists()
    assert "pytorch_model.bin" in message and "refused" in message


def _rewrite_safetensors(folder: Path, edit) -> None:  # noqa: ANN001
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_key_and_shapes(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    key = "model.language_model.layers.1.mlp.up_proj.weight"

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = torch.zeros(7, 5)

    _rewrite_safetensors(folder, edit)
    message = _load_error(folder)
    assert key in message and "(7, 5)" in message and "(128, 64)" in message


def test_missing_key_is_named(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    key = "model.vqmodel.decoder.conv_out.bias"
    _rewrite_safetensors(folder, lambda state: state.pop(key))
    assert key in _load_error(folder)


def test_unexpected_key_is_named(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")

    def edit(state: dict[str, torch.Tensor]) -> None:
        state["model.surprise.weight"] = torch.zeros(2)

    _rewrite_safetensors(folder, edit)
    message = _load_error(folder)
    assert "unexpected" in message and "model.surprise.weight" in message


def test_missing_folder(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nowhere")
    assert "nowhere" in message and "not found" in message


def test_missing_config(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    (folder / "config.json").unlink()
    assert "config.json" in _load_error(folder)


def test_unknown_model_type(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"model_type": "flux_capacitor"}))
    message = _load_error(folder)
    assert "flux_capacitor" in message and "config.json" in message


def test_missing_weights(tiny_hf: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_hf, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    message = _load_error(folder)
    assert "no weights" in message and str(folder.resolve()) in message


def test_hf_cache_snapshot_symlinks_are_allowed(tiny_hf: Path, tmp_path: Path) -> None:
    entry = tmp_path / "models--x--tiny"
    snapshot = entry / "snapshots" / "abc123"
    (entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in tiny_hf.iterdir():
        blob = entry / "blobs" / item.name
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(Path("../../blobs") / item.name)
    assert find_weight_files(snapshot) == [snapshot / "model.safetensors"]
    assert load_model(snapshot).kind == "janus"
