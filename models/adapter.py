"""The model as the loop sees it: transformers' Janus classes (or a plain causal LM) behind a small surface.

Nothing here decides anything about decoding; it names the parts (layers, norm, heads, generation embeddings, vision
tower, VQ decoder, tokenizer ids) so that ``core`` can drive them without knowing transformers' attribute paths.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import prompts


#: DeepSeek's VLMImageProcessor `min_size`: the shortest side it will work with.
MIN_IMAGE_SIDE = 14


class ModelKindError(ValueError):
    """An image feature was asked of a text-only model (or the reverse)."""


class JanusAdapter:
    """Wraps ``JanusForConditionalGeneration`` (kind ``janus``) or a plain causal LM (kind ``causal_lm``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any | None = None, *,
                 name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        is_janus = hasattr(model, "model") and hasattr(model.model, "generation_head")
        self.kind: Literal["janus", "causal_lm"] = "janus" if is_janus else "causal_lm"
        self.lm = model.model.language_model if is_janus else model.model
        text_config = self.lm.config
        self.layers = self.lm.layers
        self.num_layers = len(self.layers)
        self.hidden_size = text_config.hidden_size
        self.intermediate_size = text_config.intermediate_size  # MLP width (FLOPs models)
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.vocab_size = text_config.vocab_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tied_embeddings = bool(self.model.lm_head.weight is self.lm.embed_tokens.weight)
        if is_janus:
            vq = model.model.vqmodel
            side = vq.config.num_patches
            self.image_grid: tuple[int, int] | None = (side, side)
            self.image_vocab_size = vq.config.num_embeddings
            self.image_size = model.config.vision_config.image_size
            self.tokens_per_image = model.config.vision_config.num_image_tokens
        else:
            self.image_grid = None
            self.image_vocab_size = None
            self.image_size = None
            self.tokens_per_image = None

    # -- kind checks -----------------------------------------------------------------------------------------
    def require_janus(self, what: str) -> None:
        if self.kind != "janus":
            raise ModelKindError(f"{what} needs a Janus model; {self.name} is a plain causal language model")

    # -- text side -------------------------------------------------------------------------------------------
    def special_id(self, token: str) -> int:
        """Look a special token's id up by its string (ids differ between checkpoints: never hard-code them)."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or (self.tokenizer.unk_token_id is not None and tid == self.tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer of {self.name} has no token {token!r}")
        return int(tid)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        if self.kind == "janus":
            return self.special_id(prompts.PAD)
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.eos_id or 0))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(hidden, positions)

    def query(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated query states ``[B, heads, T, D]`` of ``layer`` for its input ``hidden`` ``[B, T, H]``."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        cos, sin = self.rotary(x, positions)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        return q

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(hidden)

    def head(self, hidden: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "image":
            self.require_janus("image generation")
            return self.model.model.generation_head(hidden)
        return self.model.lm_head(hidden)

    # -- image side ------------------------------------------------------------------------------------------
    def embed_image_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids → LLM input embeddings through the generation embeddings and aligner."""
        self.require_janus("image generation")
        return self.model.prepare_embeddings_for_image_generation(ids)

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → ``[n, 3, S, S]`` pixels as Janus's processor prepares them (pad to square, [-1, 1])."""
        self.require_janus("image understanding")
        smallest = getattr(self.image_processor, "min_size", None) or MIN_IMAGE_SIDE
        for i, image in enumerate(images):
            if min(image.size) < smallest:
                raise ValueError(f"image {i + 1} is {image.size[0]}×{image.size[1]} pixels; images need at least "
                                 f"{smallest} pixels on each side")
        batch = self.image_processor(images=list(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype)

    def encode_images(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """SigLIP features through the aligner → ``[n, tokens, H]``.

        ``layers=None``: what Janus feeds its aligner (the tower's last layer after its final norm). Otherwise the
        hidden states entering the given encoder layers (index k = input of layer k; N = the last output, normed),
        each through the aligner, averaged.
        """
        self.require_janus("image understanding")
        janus = self.model.model
        if layers is None:
            return janus.get_image_features(pixel_values, return_dict=True).pooler_output
        out = janus.vision_model(pixel_values, output_hidden_states=True, return_dict=True)
        n = len(out.hidden_states) - 1
        picked = []
        for k in layers:
            if not 0 <= k <= n:
                raise ValueError(f"vision layer {k} is outside [0, {n}]")
            h = out.last_hidden_state if k == n else out.hidden_states[k]
            picked.append(janus.aligner(h))
        return torch.stack(picked).mean(0)

    def decode_image_tokens(self, ids: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Image-token ids ``[B, rows·cols]`` (raster order) → pixels ``[B, 3, rows·16, cols·16]``, nominally [-1, 1].

        Partial grids (``rows`` < the grid's rows) decode to the right height: the decoder is convolutional.
        """
        self.require_janus("image decoding")
        vq = self.model.model.vqmodel
        grid_rows, cols = self.image_grid
        rows = grid_rows if rows is None else rows
        if ids.shape[1] != rows * cols:
            raise ValueError(f"expected {rows}×{cols} = {rows * cols} image tokens per row, got {ids.shape[1]}")
        codes = F.normalize(vq.quantize.embedding(ids), p=2, dim=-1)  # [B, rows·cols, D]
        codes = codes.view(ids.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()
        return vq.decoder(vq.post_quant_conv(codes))

    # -- prompts ---------------------------------------------------------------------------------------------
    def generation_prompt_ids(self, prompt: str) -> list[int]:
        self.require_janus("image generation")
        return self.tokenize(prompts.generation_text(prompt))

    def understanding_prompt_ids(self, question: str, num_images: int) -> list[int]:
        self.require_janus("image understanding")
        ids = self.tokenize(prompts.understanding_text(question, num_images))
        return prompts.expand_image_tags(
            ids, tag_id=self.special_id(prompts.IMAGE_TAG), begin_id=self.special_id(prompts.BEGIN_OF_IMAGE),
            end_id=self.special_id(prompts.END_OF_IMAGE), tokens_per_image=self.tokens_per_image,
        )

    def chat_prompt_ids(self, prompt: str) -> list[int]:
        if self.kind == "janus":
            return self.tokenize(prompts.chat_text(prompt))
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True, tokenize=True))
        return self.tokenize(prompt)
