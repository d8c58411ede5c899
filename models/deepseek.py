"""DeepSeek's original Janus layout (`model_type: "multi_modality"`): config conversion and the key map.

The original `MultiModalityCausalLM` keeps every part as a direct attribute of the root (no `model.` prefix) and
fuses the vision tower's q/k/v into one `attn.qkv`. Otherwise the state dicts hold the same tensors as
transformers' `JanusForConditionalGeneration` under other names (shared/README.md). The map, original → transformers:

| original | transformers |
|---|---|
| `vision_model.vision_tower.pos_embed` (1, N, D) | `model.vision_model.embeddings.position_embedding.weight` (N, D) |
| `vision_model.vision_tower.patch_embed.proj.*` | `model.vision_model.embeddings.patch_embedding.*` |
| `vision_model.vision_tower.blocks.N.norm1/norm2.*` | `model.vision_model.encoder.layers.N.layer_norm1/layer_norm2.*` |
| `vision_model.vision_tower.blocks.N.attn.qkv.*` | `...layers.N.self_attn.{q,k,v}_proj.*` (split in 3 equal parts) |
| `vision_model.vision_tower.blocks.N.attn.proj.*` | `...layers.N.self_attn.projection_layer.*` |
| `vision_model.vision_tower.blocks.N.mlp.fc1/fc2.*` | `...layers.N.mlp.fc1/fc2.*` |
| `vision_model.vision_tower.norm.*` | `model.vision_model.post_layernorm.*` |
| `aligner.layers.0.*`, `aligner.layers.2k.*` | `model.aligner.fc1.*`, `model.aligner.hidden_layers.{k-1}.*` |
| `gen_aligner.layers.0.*`, `.layers.2k.*` | `model.generation_aligner.fc1.*`, `.hidden_layers.{k-1}.*` |
| `gen_embed.weight` | `model.generation_embeddings.weight` |
| `gen_head.output_mlp_projector.*`, `gen_head.vision_head.*` | `model.generation_head.proj_out.*`, `.vision_head.*` |
| `gen_vision_model.{quant_conv,post_quant_conv,quantize.embedding}.*` | `model.vqmodel.` + same |
| `gen_vision_model.encoder.conv_blocks.L.res.i.*` | `model.vqmodel.encoder.down.L.block.i.*` |
| `gen_vision_model.encoder.conv_blocks.L.attn.i.*` | `model.vqmodel.encoder.down.L.attn.i.*` |
| `gen_vision_model.encoder.conv_blocks.L.downsample.conv.*` | `model.vqmodel.encoder.down.L.downsample.conv.*` |
| `gen_vision_model.decoder.conv_blocks.L.res.i/attn.i/upsample.conv.*` | `model.vqmodel.decoder.up.L.block.i/attn.i/upsample.conv.*` |
| `gen_vision_model.{encoder,decoder}.mid.0/1/2.*` | `model.vqmodel.{encoder,decoder}.mid.block_1/attn_1/block_2.*` |
| `gen_vision_model.{encoder,decoder}.{conv_in,conv_out,norm_out}.*` | same under `model.vqmodel.` |
| `language_model.model.*` | `model.language_model.*` |
| `language_model.lm_head.weight` | `lm_head.weight` |

Decoder levels: both trees list the decoder's levels from the lowest resolution (most channels, with attention)
to the highest; transformers builds `up` by iterating `reversed(range(levels))` and appending, so `up.L` is the
original `conv_blocks.L` (index unchanged), and `upsample` sits on every level but the last in both.

Ignored: `vision_model.vision_tower.attn_pool.*` (built but never used), `gen_vision_model.quantize.codebook_used`
(training statistics) and any `rotary_emb.inv_freq`. Any other name is an error.

Config extension: the original config fixes the SigLIP and VQ sizes by name (`siglip_large_patch16_384`, `VQ-16`).
To let small checkpoints use this layout, a params dict may carry a non-standard `"janus_decoding_dims"` dict that
overrides those fixed sizes (vision: image_size, patch_size, hidden_size, num_hidden_layers, num_attention_heads,
mlp_ratio; gen_vision: base_channels, channel_multiplier, num_res_blocks, latent_channels). DeepSeek's code does
not read it; real checkpoints do not have it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerBase

from .checkpoint_io import UnmappedKeyError
from .loading import ModelLoadError
from .shapes import LLAMA_DEFAULTS, SIGLIP_LARGE_PATCH16_384, VQ_16
from .tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, save_tokenizer

__all__ = [
    "DIMS_KEY",
    "deepseek_config_from_janus",
    "deepseek_converter",
    "deepseek_to_hf_names",
    "hf_to_deepseek_name",
    "iter_deepseek_state",
    "janus_config_from_deepseek",
    "write_deepseek_folder",
]

DIMS_KEY = "janus_decoding_dims"
SIGLIP_NAME = "siglip_large_patch16_384"
VQ_NAME = "VQ-16"

_VT = "vision_model.vision_tower"
_HF_VT = "model.vision_model"
_GV = "gen_vision_model"
_HF_VQ = "model.vqmodel"

# (original pattern, transformers pattern). {n}/{l}/{i} are integers, {p} a parameter name; plain one-to-one renames.
_RENAMES: tuple[tuple[str, str], ...] = (
    (f"{_VT}.patch_embed.proj.{{p}}", f"{_HF_VT}.embeddings.patch_embedding.{{p}}"),
    (f"{_VT}.blocks.{{n}}.norm1.{{p}}", f"{_HF_VT}.encoder.layers.{{n}}.layer_norm1.{{p}}"),
    (f"{_VT}.blocks.{{n}}.norm2.{{p}}", f"{_HF_VT}.encoder.layers.{{n}}.layer_norm2.{{p}}"),
    (f"{_VT}.blocks.{{n}}.attn.proj.{{p}}", f"{_HF_VT}.encoder.layers.{{n}}.self_attn.projection_layer.{{p}}"),
    (f"{_VT}.blocks.{{n}}.mlp.fc1.{{p}}", f"{_HF_VT}.encoder.layers.{{n}}.mlp.fc1.{{p}}"),
    (f"{_VT}.blocks.{{n}}.mlp.fc2.{{p}}", f"{_HF_VT}.encoder.layers.{{n}}.mlp.fc2.{{p}}"),
    (f"{_VT}.norm.{{p}}", f"{_HF_VT}.post_layernorm.{{p}}"),
    ("gen_embed.{p}", "model.generation_embeddings.{p}"),
    ("gen_head.output_mlp_projector.{p}", "model.generation_head.proj_out.{p}"),
    ("gen_head.vision_head.{p}", "model.generation_head.vision_head.{p}"),
    (f"{_GV}.quant_conv.{{p}}", f"{_HF_VQ}.quant_conv.{{p}}"),
    (f"{_GV}.post_quant_conv.{{p}}", f"{_HF_VQ}.post_quant_conv.{{p}}"),
    (f"{_GV}.quantize.embedding.{{p}}", f"{_HF_VQ}.quantize.embedding.{{p}}"),
    *(
        pair
        for part, levels in (("encoder", "down"), ("decoder", "up"))
        for pair in (
            (f"{_GV}.{part}.conv_in.{{p}}", f"{_HF_VQ}.{part}.conv_in.{{p}}"),
            (f"{_GV}.{part}.conv_out.{{p}}", f"{_HF_VQ}.{part}.conv_out.{{p}}"),
            (f"{_GV}.{part}.norm_out.{{p}}", f"{_HF_VQ}.{part}.norm_out.{{p}}"),
            (f"{_GV}.{part}.mid.0.{{r}}", f"{_HF_VQ}.{part}.mid.block_1.{{r}}"),
            (f"{_GV}.{part}.mid.1.{{r}}", f"{_HF_VQ}.{part}.mid.attn_1.{{r}}"),
            (f"{_GV}.{part}.mid.2.{{r}}", f"{_HF_VQ}.{part}.mid.block_2.{{r}}"),
            (f"{_GV}.{part}.conv_blocks.{{l}}.res.{{i}}.{{r}}", f"{_HF_VQ}.{part}.{levels}.{{l}}.block.{{i}}.{{r}}"),
            (f"{_GV}.{part}.conv_blocks.{{l}}.attn.{{i}}.{{r}}", f"{_HF_VQ}.{part}.{levels}.{{l}}.attn.{{i}}.{{r}}"),
        )
    ),
    (f"{_GV}.encoder.conv_blocks.{{l}}.downsample.conv.{{p}}", f"{_HF_VQ}.encoder.down.{{l}}.downsample.conv.{{p}}"),
    (f"{_GV}.decoder.conv_blocks.{{l}}.upsample.conv.{{p}}", f"{_HF_VQ}.decoder.up.{{l}}.upsample.conv.{{p}}"),
    ("language_model.lm_head.{p}", "lm_head.{p}"),
    ("language_model.model.{r}", "model.language_model.{r}"),
)
_POS_EMBED = (f"{_VT}.pos_embed", f"{_HF_VT}.embeddings.position_embedding.weight")
_QKV = f"{_VT}.blocks.{{n}}.attn.qkv.{{p}}"
_QKV_PARTS = ("q_proj", "k_proj", "v_proj")
_HF_QKV = f"{_HF_VT}.encoder.layers.{{n}}.self_attn.{{part}}.{{p}}"
_ALIGNERS = (("aligner", "model.aligner"), ("gen_aligner", "model.generation_aligner"))
_IGNORED = (
    re.compile(rf"^{re.escape(_VT)}\.attn_pool\..+$"),
    re.compile(rf"^{re.escape(_GV)}\.quantize\.codebook_used$"),
    re.compile(r"^(.+\.)?rotary_emb\.inv_freq$"),
)
_GROUPS = {
    "n": r"(?P<n>\d+)",
    "l": r"(?P<l>\d+)",
    "i": r"(?P<i>\d+)",
    "p": r"(?P<p>weight|bias)",
    "r": r"(?P<r>[A-Za-z0-9_.]+)",
    "part": r"(?P<part>q_proj|k_proj|v_proj)",
}


def _compile(pattern: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(_GROUPS[m.group(1)])
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


_FORWARD = tuple((_compile(src), dst) for src, dst in _RENAMES)
_BACKWARD = tuple((_compile(dst), src) for src, dst in _RENAMES)
_QKV_RE, _HF_QKV_RE = _compile(_QKV), _compile(_HF_QKV)
_ALIGNER_RES = tuple((re.compile(rf"^{src}\.layers\.(?P<k>\d+)\.(?P<p>weight|bias)$"), dst) for src, dst in _ALIGNERS)
_HF_ALIGNER_RES = tuple(
    (re.compile(rf"^{re.escape(dst)}\.(?:(?P<fc1>fc1)|hidden_layers\.(?P<k>\d+))\.(?P<p>weight|bias)$"), src)
    for src, dst in _ALIGNERS
)


def deepseek_to_hf_names(name: str) -> tuple[str, ...]:
    """The transformers key(s) for original key `name`: one name, three for a fused qkv, none if ignored.

    Raises `UnmappedKeyError` for a name the original tree does not have.
    """
    if any(rx.match(name) for rx in _IGNORED):
        return ()
    if name == _POS_EMBED[0]:
        return (_POS_EMBED[1],)
    m = _QKV_RE.match(name)
    if m:
        return tuple(_HF_QKV.format(n=m["n"], part=part, p=m["p"]) for part in _QKV_PARTS)
    for rx, dst in _ALIGNER_RES:
        m = rx.match(name)
        if m:
            k = int(m["k"])
            if k == 0:
                return (f"{dst}.fc1.{m['p']}",)
            if k % 2 == 0:
                return (f"{dst}.hidden_layers.{k // 2 - 1}.{m['p']}",)
            raise UnmappedKeyError(name)
    for rx, dst in _FORWARD:
        m = rx.match(name)
        if m:
            return (dst.format(**m.groupdict()),)
    raise UnmappedKeyError(name)


def hf_to_deepseek_name(name: str) -> tuple[str, int | None]:
    """The original key holding transformers key `name`, and its third (0 q, 1 k, 2 v) for a fused qkv part."""
    if name == _POS_EMBED[1]:
        return _POS_EMBED[0], None
    m = _HF_QKV_RE.match(name)
    if m:
        return _QKV.format(n=m["n"], p=m["p"]), _QKV_PARTS.index(m["part"])
    for rx, src in _HF_ALIGNER_RES:
        m = rx.match(name)
        if m:
            k = 0 if m["fc1"] else 2 * (int(m["k"]) + 1)
            return f"{src}.layers.{k}.{m['p']}", None
    for rx, src in _BACKWARD:
        m = rx.match(name)
        if m:
            return src.format(**m.groupdict()), None
    raise UnmappedKeyError(name)


def deepseek_converter() -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """A `checkpoint_io.Converter` from original tensors to transformers tensors (splits qkv, reshapes pos_embed).

    Raises `UnmappedKeyError` for an unknown name and `ValueError` for a qkv tensor that does not split in 3.
    """
    def convert(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        targets = deepseek_to_hf_names(name)
        if len(targets) == 3:
            if tensor.shape[0] % 3:
                raise ValueError(f"key {name!r}: fused qkv of shape {tuple(tensor.shape)} does not split in 3")
            return list(zip(targets, tensor.chunk(3, dim=0), strict=True))
        if name == _POS_EMBED[0] and tensor.dim() == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]  # (1, N, D) -> (N, D); checkpoint_io checks N against the model
        return [(t, tensor) for t in targets]

    return convert


def iter_deepseek_state(hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename transformers tensors to the original layout, fusing q/k/v parts as soon as all three are seen."""
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in hf_tensors:
        target, part = hf_to_deepseek_name(name)
        if part is None:
            yield target, tensor.unsqueeze(0) if target == _POS_EMBED[0] else tensor
            continue
        parts = pending.setdefault(target, [None, None, None])
        parts[part] = tensor
        if all(p is not None for p in parts):
            del pending[target]
            yield target, torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if pending:
        raise ValueError(f"incomplete fused qkv for {sorted(pending)[0]!r}")


# --------------------------------------------------------------------------------------------------------------
# Config conversion
# --------------------------------------------------------------------------------------------------------------

_LLAMA_BOOKKEEPING = {
    "model_type",
    "architectures",
    "torch_dtype",
    "dtype",
    "_attn_implementation_autoset",
    "_name_or_path",
    "transformers_version",
    "rope_theta",
    "rope_scaling",
}


def _section(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    section = raw.get(key)
    if not isinstance(section, dict):
        raise ModelLoadError(f"{path}: multi_modality config lacks {key!r}")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ModelLoadError(f"{path}: {key}.params is not an object")
    return params


def _token_ids(folder: Path | None) -> dict[str, int]:
    """Special-token ids looked up by string in the folder's tokenizer.json (added tokens, then the vocab)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return {}
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: unreadable ({exc})".replace("\n", " ")) from exc
    table: dict[str, int] = dict((data.get("model") or {}).get("vocab") or {})
    table.update({t["content"]: t["id"] for t in data.get("added_tokens", []) if "content" in t and "id" in t})
    wanted = {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN, "image": IMAGE_TOKEN}
    return {key: table[tok] for key, tok in wanted.items() if tok in table}


def janus_config_from_deepseek(raw: dict[str, Any], *, folder: Path | None = None) -> JanusConfig:
    """Build a transformers `JanusConfig` from DeepSeek's `multi_modality` config.json.

    Missing LLaMA fields take LlamaConfig defaults (4096/11008/32 heads/32 KV heads/1e-6/10000); the vision and VQ
    sizes are fixed by their names unless a `janus_decoding_dims` extension overrides them. Special-token ids come
    from the folder's tokenizer, looked up by string.
    """
    path = (folder / "config.json") if folder is not None else Path("config.json")
    vision_p = _section(raw, "vision_config", path)
    aligner_p = _section(raw, "aligner_config", path)
    gen_vision_p = _section(raw, "gen_vision_config", path)
    gen_aligner_p = _section(raw, "gen_aligner_config", path)
    gen_head_p = _section(raw, "gen_head_config", path)
    language = raw.get("language_config")
    if not isinstance(language, dict):
        raise ModelLoadError(f"{path}: multi_modality config lacks 'language_config'")

    model_name = vision_p.get("model_name", SIGLIP_NAME)
    vision_dims = dict(vision_p.get(DIMS_KEY) or {})
    if model_name != SIGLIP_NAME and not vision_dims:
        raise ModelLoadError(f"{path}: unsupported vision model_name {model_name!r} (known: {SIGLIP_NAME!r})")
    if vision_p.get("select_layer", -1) != -1:
        raise ModelLoadError(f"{path}: unsupported vision select_layer {vision_p['select_layer']!r} (only -1)")
    vq_name = raw["gen_vision_config"].get("cls", VQ_NAME)
    vq_dims = dict(gen_vision_p.get(DIMS_KEY) or {})
    if vq_name != VQ_NAME and not vq_dims:
        raise ModelLoadError(f"{path}: unsupported gen_vision cls {vq_name!r} (known: {VQ_NAME!r})")

    llama = {k: v for k, v in language.items() if k not in _LLAMA_BOOKKEEPING}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps"):
        llama.setdefault(key, LLAMA_DEFAULTS[key])
    llama.setdefault("num_key_value_heads", llama["num_attention_heads"])
    rope_theta = float(language.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    if language.get("rope_scaling"):
        raise ModelLoadError(f"{path}: language_config.rope_scaling is not supported")
    ids = _token_ids(folder)
    for key in ("bos", "eos", "pad"):
        if key in ids:
            llama[f"{key}_token_id"] = ids[key]
    llama["tie_word_embeddings"] = False
    hidden = int(llama["hidden_size"])
    text = LlamaConfig(**llama, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})

    siglip = {**SIGLIP_LARGE_PATCH16_384, **vision_dims}
    siglip["image_size"] = int(vision_p.get("image_size", siglip["image_size"]))
    grid = int(siglip["image_size"]) // int(siglip["patch_size"])
    if int(aligner_p.get("input_dim", siglip["hidden_size"])) != int(siglip["hidden_size"]):
        raise ModelLoadError(f"{path}: aligner input_dim {aligner_p['input_dim']} != vision width")
    if aligner_p.get("projector_type", "mlp_gelu") != "mlp_gelu":
        raise ModelLoadError(f"{path}: unsupported aligner projector_type {aligner_p['projector_type']!r}")
    vision = JanusVisionConfig(
        **siglip,
        projection_dim=int(aligner_p.get("n_embed", hidden)),
        depth=int(aligner_p.get("depth", 2)),
        num_image_tokens=grid * grid,
    )

    vq_sizes = {**VQ_16, **vq_dims}
    vq_sizes["channel_multiplier"] = list(vq_sizes["channel_multiplier"])  # type: ignore[call-overload]
    vq_sizes["num_embeddings"] = int(gen_vision_p.get("image_token_size", vq_sizes["num_embeddings"]))
    vq_sizes["embed_dim"] = int(gen_vision_p.get("n_embed", vq_sizes["embed_dim"]))
    gen_out = int(gen_aligner_p.get("n_embed", hidden))
    head_in, head_mid = int(gen_head_p.get("n_embed", hidden)), int(gen_head_p.get("image_token_embed", hidden))
    if int(gen_head_p.get("image_token_size", vq_sizes["num_embeddings"])) != vq_sizes["num_embeddings"]:
        raise ModelLoadError(f"{path}: gen_head image_token_size differs from the VQ codebook size")
    if head_mid != gen_out:
        # transformers' Janus shares one `projection_dim` between the generation aligner and head.
        raise ModelLoadError(f"{path}: gen_head image_token_embed {head_mid} != gen_aligner n_embed {gen_out}")
    vq = JanusVQVAEConfig(
        **vq_sizes,
        projection_dim=gen_out,
        image_token_embed_dim=head_in,
        num_hidden_layers=int(gen_aligner_p.get("depth", 2)),
    )
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)
    if "image" in ids:
        config.image_token_id = ids["image"]
    for key in ("bos", "eos", "pad"):
        if key in ids:
            setattr(config, f"{key}_token_id", ids[key])
    return config


def deepseek_config_from_janus(config: JanusConfig) -> dict[str, Any]:
    """DeepSeek's `multi_modality` config.json for `config` (with `janus_decoding_dims` where sizes differ)."""
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    vision_dims = {k: getattr(vision, k) for k in SIGLIP_LARGE_PATCH16_384 if k != "image_size"}
    vision_dims = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vision_dims.items()}
    siglip_fixed = {k: v for k, v in SIGLIP_LARGE_PATCH16_384.items() if k != "image_size"}
    vq_dims = {k: getattr(vq, k) for k in ("base_channels", "channel_multiplier", "num_res_blocks", "latent_channels")}
    vq_dims["channel_multiplier"] = list(vq_dims["channel_multiplier"])
    vq_fixed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in VQ_16.items() if k in vq_dims}
    vision_params: dict[str, Any] = {
        "image_size": vision.image_size,
        "model_name": SIGLIP_NAME,
        "select_feature": "same",
        "select_layer": -1,
    }
    if vision_dims != siglip_fixed:
        vision_params[DIMS_KEY] = vision_dims
    gen_vision_params: dict[str, Any] = {"image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim}
    if vq_dims != vq_fixed:
        gen_vision_params[DIMS_KEY] = vq_dims
    rope = (text.rope_parameters or {}).get("rope_theta", LLAMA_DEFAULTS["rope_theta"])
    language = {
        "model_type": "llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": rope,
        "torch_dtype": str(config.dtype or "float32").removeprefix("torch."),
    }
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": vision_params},
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "projector_type": "mlp_gelu",
                "depth": vision.depth,
                "input_dim": vision.hidden_size,
                "n_embed": vision.projection_dim,
            },
        },
        "gen_vision_config": {"cls": VQ_NAME, "model_type": "gen_vision", "params": gen_vision_params},
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {
                "projector_type": "mlp_gelu",
                "depth": vq.num_hidden_layers,
                "input_dim": vq.embed_dim,
                "n_embed": vq.projection_dim,
            },
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                "n_embed": vq.image_token_embed_dim,
                "image_token_embed": vq.projection_dim,
                "image_token_size": vq.num_embeddings,
            },
        },
        "language_config": language,
        "torch_dtype": language["torch_dtype"],
    }


# --------------------------------------------------------------------------------------------------------------
# Writing a folder in the original layout
# --------------------------------------------------------------------------------------------------------------

# Target size of one .bin shard at full shapes (torch.save holds a whole shard in memory).
_BIN_SHARD_BYTES = 2 << 30
_CODEBOOK_USED_SIZE = 65536  # LlamaGen's VectorQuantizer keeps a (65536,) usage buffer


def _unused_extras(config: JanusConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the original tensors the loader ignores (attn_pool, codebook_used)."""
    width = config.vision_config.hidden_size
    mlp = int(width * config.vision_config.mlp_ratio)
    pool = f"{_VT}.attn_pool"
    return [
        (f"{pool}.latent", (1, 1, width)),
        (f"{pool}.q.weight", (width, width)),
        (f"{pool}.q.bias", (width,)),
        (f"{pool}.kv.weight", (2 * width, width)),
        (f"{pool}.kv.bias", (2 * width,)),
        (f"{pool}.proj.weight", (width, width)),
        (f"{pool}.proj.bias", (width,)),
        (f"{pool}.norm.weight", (width,)),
        (f"{pool}.norm.bias", (width,)),
        (f"{pool}.mlp.fc1.weight", (mlp, width)),
        (f"{pool}.mlp.fc1.bias", (mlp,)),
        (f"{pool}.mlp.fc2.weight", (width, mlp)),
        (f"{pool}.mlp.fc2.bias", (width,)),
    ]


def write_deepseek_folder(
    folder: Path,
    config: JanusConfig,
    hf_tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    dtype: torch.dtype,
    total_bytes: int,
    progress: Any | None = None,
) -> None:
    """Write config.json, `.bin` shards + index, tokenizer and processor files in DeepSeek's layout.

    `hf_tensors` are the transformers-named tensors (e.g. the random ones of `tiny.iter_random_state`); they are
    renamed and fused on the fly. The unused `attn_pool` and `codebook_used` tensors are added (drawn from the same
    seed) so the folder holds every key the original tree has. Tiny checkpoints use two shards like Janus-Pro-7B.
    """
    from .tiny import draw_tensor

    n_shards = 2 if total_bytes < _BIN_SHARD_BYTES else max(2, math.ceil(total_bytes / _BIN_SHARD_BYTES))
    per_shard = math.ceil(total_bytes / n_shards)

    def extras() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in _unused_extras(config):
            yield name, draw_tensor(name, shape, seed, dtype)
        yield f"{_GV}.quantize.codebook_used", torch.zeros(_CODEBOOK_USED_SIZE, dtype=dtype)

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 1
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, size, index
        if not shard:
            return
        part = f"pytorch_model.part{index}"
        torch.save(shard, folder / part)
        written.append((part, list(shard)))
        shard, size, index = {}, 0, index + 1

    def all_tensors() -> Iterator[tuple[str, torch.Tensor, bool]]:
        for name, tensor in iter_deepseek_state(hf_tensors):
            yield name, tensor, True
        for name, tensor in extras():
            yield name, tensor, False  # not part of the model: not counted in `progress`

    for name, tensor, counted in all_tensors():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > per_shard and index < n_shards:
            flush()
        shard[name] = tensor
        size += nbytes
        if progress is not None and counted:
            progress.update(nbytes)
    flush()
    count = len(written)
    total = 0
    for i, (part, names) in enumerate(written, start=1):
        final = f"pytorch_model-{i:05d}-of-{count:05d}.bin"
        (folder / part).rename(folder / final)
        weight_map.update({n: final for n in names})
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_json, indent=2) + "\n")

    (folder / "config.json").write_text(json.dumps(deepseek_config_from_janus(config), indent=2) + "\n")
    save_tokenizer(tokenizer, folder)
    image_size = config.vision_config.image_size
    preprocessor = {
        "image_processor_type": "VLMImageProcessor",
        "image_size": image_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "min_size": 14,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "background_color": [127, 127, 127],
        "processor_class": "VLChatProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {
        "image_tag": IMAGE_TOKEN,
        "num_image_tokens": config.vision_config.num_image_tokens,
        "sft_format": "deepseek",
        "add_special_token": False,
        "mask_prompt": True,
        "ignore_id": -100,
        "processor_class": "VLChatProcessor",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
