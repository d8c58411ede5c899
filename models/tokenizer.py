"""A tiny, deterministic byte-level BPE tokenizer that carries Janus's special tokens.

DeepSeek's real tokenizer is a byte-level BPE of 100k entries; the tiny one keeps its behaviour that matters to the
runtime: `encode` prepends BOS, the special tokens exist as single tokens under the same strings, and every id is
looked up by string (never hard-coded: the tiny ids differ from the real ones).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "IMAGE_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "JANUS_EXTRA_TOKENS",
    "JANUS_SPECIAL_TOKENS",
    "build_tokenizer",
    "save_tokenizer",
]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
# The additional special tokens of Janus-Pro's tokenizer (special_tokens_map.json) plus the image delimiters that
# the processor looks up by string.
JANUS_EXTRA_TOKENS: tuple[str, ...] = (
    IMAGE_TOKEN,
    "<patch_placeholder>",
    BOI_TOKEN,
    EOI_TOKEN,
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
)
JANUS_SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *JANUS_EXTRA_TOKENS)

# BPE merges learned on top of the 256 byte symbols; the total vocabulary is this plus the special tokens.
_BPE_VOCAB_SIZE = 640
_MODEL_MAX_LENGTH = 16384

_CORPUS = """\
A red cube sits on a blue sphere in the middle of a quiet room.
A lighthouse stands at dusk on a rocky coast, its lamp turning slowly over the sea.
The cat sleeps on the warm windowsill while the rain falls outside.
Describe the image in detail. What colour is the car parked near the tree?
There are three apples, two bananas and one orange on the wooden table.
A photo of a dog running across a green field under a bright summer sky.
The quick brown fox jumps over the lazy dog near the river bank.
An astronaut rides a horse on the surface of the moon, digital art.
A bowl of soup with fresh bread and a glass of water on a kitchen counter.
Please answer the question about the picture: how many people are standing?
A small boat drifts on a calm lake surrounded by tall mountains and pine trees.
The city street is busy with cars, bicycles and people walking to work in the morning.
A painting of a sunflower field in the style of an old master, oil on canvas.
What is written on the sign? The sign says open every day from nine to five.
A child builds a sandcastle on the beach while the waves come in.
Generate an image of a futuristic building made of glass and steel at night.
The teacher explains the lesson and the students take notes in their notebooks.
A close up of a butterfly resting on a purple flower in the garden.
You are a helpful language and vision assistant. You are able to understand the visual content that the user
provides, and assist the user with a variety of tasks using natural language.
A white bird flies above the ocean. The water is deep blue and the clouds are soft and white.
She reads a book by the fire, and the clock on the wall shows ten past eight.
Two friends share a pizza and talk about their plans for the weekend.
The train arrives at the station, the doors open and the passengers step onto the platform.
A yellow taxi waits at the corner of the street next to a red phone box.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 24 32 64 128 256 384 512 576 1024 2048 4096.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE on the built-in corpus and wrap it for transformers.

    Deterministic: the same corpus and settings give the same vocabulary and merges on every run. The special
    tokens are appended after the BPE entries; `tokenizer(text).input_ids[0]` is the BOS id.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    backend.add_special_tokens(list(JANUS_SPECIAL_TOKENS))
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(JANUS_EXTRA_TOKENS),
        # Named attributes that transformers' JanusProcessor reads (tokenizer.image_token, .boi_token, .eoi_token).
        image_token=IMAGE_TOKEN,
        boi_token=BOI_TOKEN,
        eoi_token=EOI_TOKEN,
        model_max_length=_MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`.

    transformers 5 no longer writes special_tokens_map.json; DeepSeek's checkpoints ship one, so it is written here
    in their layout (bos/eos/pad plus `additional_special_tokens`).
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    special_map = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": [t for t in JANUS_EXTRA_TOKENS if t in tokenizer.get_vocab()],
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
