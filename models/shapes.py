"""Janus-Pro's real sizes, as transformers `JanusConfig`s (for full-shape random checkpoints and benchmarks).

Sources (see shared/reference/janus.md §2-3): the published config.json of Janus-Pro-1B/-7B (the 7B language config
lists only layers/vocab/max positions; the rest are LlamaConfig defaults), SigLIP-L/16 at 384 px for the
understanding tower (`siglip_large_patch16_384`) and LlamaGen's VQ-16 for the image tokenizer (`VQ_16()` takes no
arguments, so its sizes are fixed).

Token ids are not set here beyond transformers' defaults: they belong to a tokenizer and must be looked up in it.
"""

from __future__ import annotations

from typing import Literal

from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

__all__ = ["LLAMA_DEFAULTS", "SIGLIP_LARGE_PATCH16_384", "VQ_16", "JANUS_PRO_LLM", "janus_pro_config"]

# LlamaConfig defaults that DeepSeek's 7B config.json relies on.
LLAMA_DEFAULTS: dict[str, float | int] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

# timm's SigLIP-L/16 at 384 px as DeepSeek builds it ("siglip_large_patch16_384").
SIGLIP_LARGE_PATCH16_384: dict[str, float | int] = {
    "image_size": 384,
    "patch_size": 16,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4.0,
}

# LlamaGen's VQ-16 (`VQ_16()`): codebook 16384 x 8, 16x downsampling.
VQ_16: dict[str, object] = {
    "num_embeddings": 16384,
    "embed_dim": 8,
    "base_channels": 128,
    "channel_multiplier": (1, 1, 2, 2, 4),
    "num_res_blocks": 2,
    "latent_channels": 256,
}

JANUS_PRO_LLM: dict[str, dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32},
}
_VOCAB_SIZE = 102400
_MAX_POSITIONS = 16384


def janus_pro_config(shape: Literal["1b", "7b"]) -> JanusConfig:
    """The transformers config of Janus-Pro-1B or -7B (untied `lm_head`, bfloat16)."""
    if shape not in JANUS_PRO_LLM:
        raise ValueError(f"shape must be one of {sorted(JANUS_PRO_LLM)}, got {shape!r}")
    llm = JANUS_PRO_LLM[shape]
    hidden = llm["hidden_size"]
    text = LlamaConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_attention_heads"],
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=LLAMA_DEFAULTS["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA_DEFAULTS["rope_theta"]},
        tie_word_embeddings=False,
    )
    siglip = SIGLIP_LARGE_PATCH16_384
    grid = int(siglip["image_size"]) // int(siglip["patch_size"])
    vision = JanusVisionConfig(**siglip, projection_dim=hidden, depth=2, num_image_tokens=grid * grid)
    vq = JanusVQVAEConfig(**VQ_16, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=2)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)
    config.dtype = "bfloat16"
    return config
