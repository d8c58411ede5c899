"""The tiny checkpoint: tokenizer facts, config numbers, write/load round trip, untied text head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, JanusForConditionalGeneration

from janus_decoding.models.loading import load_model
from janus_decoding.models.tiny import (
    iter_random_state,
    meta_model,
    tensor_spec,
    tiny_janus_config,
    write_tiny_checkpoint,
)
from janus_decoding.models.tokenizer import JANUS_SPECIAL_TOKENS, build_tokenizer


def test_tokenizer_special_tokens_and_bos() -> None:
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    for token in JANUS_SPECIAL_TOKENS:
        assert token in vocab, token
        assert tok(token, add_special_tokens=False).input_ids == [vocab[token]]
    assert tok("a red cube").input_ids[0] == tok.bos_token_id
    assert 300 <= len(tok) <= 1100


def test_tokenizer_is_deterministic() -> None:
    assert build_tokenizer().backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()


def test_tiny_config_numbers() -> None:
    cfg = tiny_janus_config()
    tok = build_tokenizer()
    assert cfg.tie_word_embeddings is False and cfg.text_config.tie_word_embeddings is False
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image_placeholder>")
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert cfg.vq_config.num_patches == grid and cfg.vision_config.num_image_tokens == grid * grid
    upsampling = 2 ** (len(cfg.vq_config.channel_multiplier) - 1)
    assert grid * upsampling == cfg.vision_config.image_size
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.text_config.bos_token_id == tok.bos_token_id
    assert cfg.text_config.eos_token_id == tok.eos_token_id


def test_folder_files_and_size(tiny_hf: Path) -> None:
    names = {p.name for p in tiny_hf.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert required in names
    assert (tiny_hf / "model.safetensors").stat().st_size < 8_000_000
    pre = json.loads((tiny_hf / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 64, "width": 64} and pre["image_mean"] == [0.5] * 3
    tok = AutoTokenizer.from_pretrained(str(tiny_hf), local_files_only=True)
    assert tok("hello").input_ids[0] == tok.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")


def test_write_is_deterministic(tmp_path: Path) -> None:
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_refuses_non_empty_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tiny_checkpoint(tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_overwrites_previous_tiny_checkpoint(tmp_path: Path) -> None:
    first = write_tiny_checkpoint(tmp_path / "x", seed=1)
    again = write_tiny_checkpoint(tmp_path / "x", seed=2)
    assert first == again
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary siblings left behind


def _reference_model(seed: int = 0) -> JanusForConditionalGeneration:
    cfg = tiny_janus_config()
    model = JanusForConditionalGeneration(cfg)
    model.load_state_dict(dict(iter_random_state(tensor_spec(meta_model(cfg)), seed, torch.float32)))
    return model.eval()


def test_round_trip_identical_logits(tiny_hf: Path) -> None:
    loaded = load_model(tiny_hf)
    assert loaded.kind == "janus" and loaded.source_format == "hf" and loaded.path == tiny_hf.resolve()
    assert loaded.image_processor is not None
    model, ref = loaded.model, _reference_model()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = loaded.tokenizer(["a red cube on a blue sphere"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        hidden = model.model(input_ids=ids).last_hidden_state
        assert torch.equal(model.model.generation_head(hidden), ref.model.generation_head(hidden))
        codes = torch.randint(0, model.config.vq_config.num_embeddings, (2, model.config.vq_config.num_patches**2))
        assert torch.equal(model.decode_image_tokens(codes), ref.decode_image_tokens(codes))
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name


def test_lm_head_is_untied(tiny_hf: Path) -> None:
    model = load_model(tiny_hf).model
    head, emb = model.lm_head.weight, model.model.language_model.embed_tokens.weight
    assert head.data_ptr() != emb.data_ptr()
    assert not torch.equal(head, emb)
    assert model.config.tie_word_embeddings is False


def test_tiny_alias_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JANUS_DECODING_CACHE", str(tmp_path))
    first = load_model("tiny")
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    second = load_model("tiny")
    assert first.path == second.path == (tmp_path / "tiny-seed0").resolve()
    assert (second.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_plain_llama_loads_as_causal_lm(tiny_llama: Path) -> None:
    loaded = load_model(tiny_llama)
    assert loaded.kind == "causal_lm" and loaded.source_format == "causal_lm"
    assert loaded.image_processor is None
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    ids = loaded.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert loaded.model(input_ids=ids).logits.shape[-1] == len(loaded.tokenizer)


def test_sharded_safetensors_round_trip(tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import janus_decoding.models.tiny as tiny

    monkeypatch.setattr(tiny, "_SHARD_BYTES", 1_000_000)
    folder = write_tiny_checkpoint(tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (folder / "model.safetensors").exists()
    a, b = load_model(tiny_hf).model, load_model(folder).model
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        write_tiny_checkpoint(tmp_path / "a", format="gguf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        write_tiny_checkpoint(tmp_path / "b", shape="70b")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_full_shape_config_uses_tiny_tokenizer_ids() -> None:
    from janus_decoding.models.tiny import _full_shape_config

    tok = build_tokenizer()
    for shape, hidden in (("1b", 2048), ("7b", 4096)):
        cfg = _full_shape_config(shape)
        assert cfg.text_config.vocab_size == 102400 and cfg.text_config.hidden_size == hidden
        assert cfg.image_token_id == tok.convert_tokens_to_ids("<image_placeholder>") < 102400
        assert cfg.text_config.bos_token_id == tok.bos_token_id
        assert cfg.vq_config.num_embeddings == 16384 and cfg.vision_config.num_image_tokens == 576
        assert cfg.tie_word_embeddings is False
