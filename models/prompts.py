"""Prompt formatting as DeepSeek's Janus processor does it (the "deepseek" SFT template), in token space.

Generation: ``"<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>"`` with BOS, no system prompt.
Understanding: the processor's fixed system prompt, then ``"<|User|>: <image_placeholder>\\n{question}\\n\\n<|Assistant|>:"``,
each ``<image_placeholder>`` expanded to ``<begin_of_image>`` + N × ``<image_placeholder>`` + ``<end_of_image>``.
"""

from __future__ import annotations

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
IMAGE_TAG = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
PAD = "<｜▁pad▁｜>"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SEP = "\n\n"

# VLChatProcessor's class-level system prompt, always prepended for understanding.
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)


def generation_text(prompt: str) -> str:
    return f"{USER}: {prompt.strip()}{SEP}{ASSISTANT}:{BEGIN_OF_IMAGE}"


def understanding_text(question: str, num_images: int) -> str:
    images = (IMAGE_TAG + "\n") * num_images
    return f"{SYSTEM_PROMPT}{SEP}{USER}: {images}{question.strip()}{SEP}{ASSISTANT}:"


def chat_text(prompt: str) -> str:
    return f"{USER}: {prompt.strip()}{SEP}{ASSISTANT}:"


def expand_image_tags(ids: list[int], *, tag_id: int, begin_id: int, end_id: int, tokens_per_image: int) -> list[int]:
    """Replace each image tag id by ``[begin] + tokens_per_image × [tag] + [end]`` (``add_special_token`` False)."""
    out: list[int] = []
    for i in ids:
        if i == tag_id:
            out += [begin_id, *([tag_id] * tokens_per_image), end_id]
        else:
            out.append(i)
    return out
