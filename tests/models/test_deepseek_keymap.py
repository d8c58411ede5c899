"""The original-format key map covers exactly DeepSeek's Janus-Pro-1B and -7B state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from janus_decoding.models.checkpoint_io import UnmappedKeyError
from janus_decoding.models.deepseek import deepseek_to_hf_names, hf_to_deepseek_name, janus_config_from_deepseek
from janus_decoding.models.shapes import janus_pro_config
from janus_decoding.models.tiny import meta_model

KEYS = Path(__file__).resolve().parents[1] / "data" / "keys"


def _published_config(shape: str) -> dict:
    """config.json of Janus-Pro-1B/-7B as published (shared/reference/janus.md §2)."""
    width = {"1b": 2048, "7b": 4096}[shape]
    language = {
        "1b": {
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 102400,
            "max_position_embeddings": 16384,
            "torch_dtype": "bfloat16",
        },
        # The 7B file lists only these: everything else is LlamaConfig defaults.
        "7b": {
            "model_type": "llama",
            "num_hidden_layers": 30,
            "vocab_size": 102400,
            "max_position_embeddings": 16384,
            "torch_dtype": "bfloat16",
            "_attn_implementation_autoset": True,
        },
    }[shape]
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": 384,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 1024, "n_embed": width},
        },
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 8, "n_embed": width},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"n_embed": width, "image_token_embed": width, "image_token_size": 16384},
        },
        "language_config": language,
        "torch_dtype": "bfloat16",
    }


IGNORED_PREFIXES = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")


@pytest.fixture(scope="module", params=["1b", "7b"])
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    shape = request.param
    original = json.loads((KEYS / f"janus-pro-{shape}-keys.json").read_text())["keys"]
    config = janus_config_from_deepseek(_published_config(shape))
    target = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    return shape, {k: tuple(v) for k, v in original.items()}, target


def test_map_covers_exactly_both_ways(case) -> None:  # noqa: ANN001
    _, original, target = case
    produced: list[str] = []
    ignored = []
    for name, shape in original.items():
        names = deepseek_to_hf_names(name)
        if not names:
            ignored.append(name)
            continue
        produced.extend(names)
        if len(names) == 3:
            assert name.endswith(("attn.qkv.weight", "attn.qkv.bias"))
            assert shape[0] % 3 == 0
            part = (shape[0] // 3, *shape[1:])
            assert all(target[n] == part for n in names), name
        elif name == "vision_model.vision_tower.pos_embed":
            assert shape[0] == 1 and target[names[0]] == shape[1:]
        else:
            assert target[names[0]] == shape, (name, names[0], shape, target.get(names[0]))
    assert len(produced) == len(set(produced))
    assert set(produced) == set(target)
    assert ignored and all(n.startswith(IGNORED_PREFIXES) for n in ignored)
    assert {n for n in original if n.startswith(IGNORED_PREFIXES)} == set(ignored)


def test_reverse_map_round_trips(case) -> None:  # noqa: ANN001
    _, original, target = case
    for name in target:
        source, part = hf_to_deepseek_name(name)
        assert source in original, name
        names = deepseek_to_hf_names(source)
        assert names[part or 0] == name


def test_shapes_module_matches_converted_config(case) -> None:  # noqa: ANN001
    shape, _, target = case
    ours = {name: tuple(t.shape) for name, t in meta_model(janus_pro_config(shape)).state_dict().items()}
    assert ours == target


def test_llama_defaults_filled_for_7b() -> None:
    text = janus_config_from_deepseek(_published_config("7b")).text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        4096,
        11008,
        32,
        32,
    )
    assert text.rms_norm_eps == 1e-6 and text.rope_parameters["rope_theta"] == 10000.0
    assert text.tie_word_embeddings is False


@pytest.mark.parametrize(
    "name",
    ["vision_model.vision_tower.blocks.0.attn.qkv.scale", "aligner.layers.1.weight", "gen_head.extra.weight", "foo"],
)
def test_unknown_names_raise(name: str) -> None:
    with pytest.raises(UnmappedKeyError):
        deepseek_to_hf_names(name)


def test_ignored_names() -> None:
    for name in (
        "vision_model.vision_tower.attn_pool.latent",
        "gen_vision_model.quantize.codebook_used",
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq",
    ):
        assert deepseek_to_hf_names(name) == ()
