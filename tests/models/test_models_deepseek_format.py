"""Tiny checkpoints in DeepSeek's original layout load to the same model as the transformers layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from janus_decoding.models.loading import ModelLoadError, load_model


def test_folder_layout(tiny_deepseek: Path) -> None:
    names = {p.name for p in tiny_deepseek.iterdir()}
    assert {
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "processor_config.json",
    } <= names
    config = json.loads((tiny_deepseek / "config.json").read_text())
    assert config["model_type"] == "multi_modality"
    assert config["vision_config"]["params"]["model_name"] == "siglip_large_patch16_384"
    index = json.loads((tiny_deepseek / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert "vision_model.vision_tower.blocks.0.attn.qkv.weight" in index
    assert "language_model.lm_head.weight" in index
    assert "gen_vision_model.quantize.codebook_used" in index  # written, ignored on load
    processor = json.loads((tiny_deepseek / "processor_config.json").read_text())
    assert processor["image_tag"] == "<image_placeholder>" and processor["num_image_tokens"] == 16


def test_same_weights_same_logits(tiny_hf: Path, tiny_deepseek: Path) -> None:
    hf, ds = load_model(tiny_hf), load_model(tiny_deepseek)
    assert ds.kind == "janus" and ds.source_format == "deepseek"
    assert ds.tokenizer.get_vocab() == hf.tokenizer.get_vocab()
    assert ds.model.config.image_token_id == hf.model.config.image_token_id
    a, b = hf.model.state_dict(), ds.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = hf.tokenizer(["a lighthouse at dusk", "a red cube"], return_tensors="pt", padding=True)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a = hf.model(**ids, output_hidden_states=True)
        out_b = ds.model(**ids, output_hidden_states=True)
        assert torch.equal(out_a.logits, out_b.logits)
        last = out_a.hidden_states[-1]
        assert torch.equal(hf.model.model.generation_head(last), ds.model.model.generation_head(last))
        feats_a = hf.model.model.get_image_features(pixels).pooler_output
        feats_b = ds.model.model.get_image_features(pixels).pooler_output
        assert torch.equal(feats_a, feats_b)
    assert not torch.equal(ds.model.lm_head.weight, ds.model.model.language_model.embed_tokens.weight)


def _edit_first_shard(folder: Path, edit) -> None:  # noqa: ANN001
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    edit(state)
    torch.save(state, shard)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in state or v != shard.name}
    index["weight_map"].update({k: shard.name for k in state})
    index_path.write_text(json.dumps(index))


def test_unmapped_key_is_refused(tiny_deepseek: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_deepseek, tmp_path / "m")
    _edit_first_shard(folder, lambda s: s.__setitem__("vision_model.vision_tower.blocks.0.attn.extra", torch.zeros(1)))
    with pytest.raises(ModelLoadError, match=r"unexpected key 'vision_model\.vision_tower\.blocks\.0\.attn\.extra'"):
        load_model(folder)


def test_bad_qkv_shape_names_the_original_key(tiny_deepseek: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_deepseek, tmp_path / "m")
    key = "vision_model.vision_tower.blocks.1.attn.qkv.weight"

    def edit(state: dict) -> None:
        state[key] = torch.zeros(99, 32)

    _edit_first_shard(folder, edit)
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    assert key in str(info.value) and "(33, 32)" in str(info.value) and "(32, 32)" in str(info.value)


def test_missing_original_key_is_named(tiny_deepseek: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_deepseek, tmp_path / "m")
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    victim = "gen_embed.weight"
    assert victim in index
    shard = folder / index[victim]
    state = torch.load(shard, weights_only=True)
    del state[victim]
    torch.save(state, shard)
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert "missing key 'model.generation_embeddings.weight'" in message and repr(victim) in message


def test_deepseek_style_tokenizer_config(tiny_deepseek: Path, tmp_path: Path) -> None:
    """DeepSeek ships tokenizer_class LlamaTokenizer and pad_token null; the pad token is found by string."""
    folder = shutil.copytree(tiny_deepseek, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({"tokenizer_class": "LlamaTokenizer", "pad_token": None})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special.pop("pad_token")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    loaded = load_model(folder)
    reference = load_model(tiny_deepseek).tokenizer
    assert loaded.tokenizer.pad_token == "<｜▁pad▁｜>"
    assert loaded.tokenizer.pad_token_id == reference.pad_token_id
    text = "<|User|>: a red cube\n\n<|Assistant|>:<begin_of_image>"
    assert loaded.tokenizer(text).input_ids == reference(text).input_ids


def test_qkv_that_does_not_split_in_three(tiny_deepseek: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_deepseek, tmp_path / "m")
    key = "vision_model.vision_tower.blocks.0.attn.qkv.bias"
    _edit_first_shard(folder, lambda s: s.__setitem__(key, torch.zeros(100)))
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert key in message and "split in 3" in message and "pytorch_model-00001-of-00002.bin" in message
