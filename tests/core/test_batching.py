"""Batch invariance (rng="row", fp32): a row's tokens do not depend on who shares its batch or how it is split."""

from __future__ import annotations

import torch

from janus_decoding import Decoder
from janus_decoding.core.batch import image_rows, left_pad, uncond_ids

# Different token counts, so the batch needs left padding.
PROMPTS = ["a cat", "a lighthouse at dusk over a stormy sea, oil painting", "red"]
SEEDS = [11, 22, 33]


def _tokens(handle, prompts, *, seed, n=1, spec="", **kwargs) -> torch.Tensor:
    return Decoder.from_spec(spec).generate_images(handle, prompts, n=n, seed=seed, rng="row", **kwargs).tokens


def test_prompts_have_different_lengths(janus):
    lengths = {len(janus.generation_prompt_ids(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)


def test_padded_batch_rows_equal_each_prompt_alone(janus):
    batched = _tokens(janus, PROMPTS, seed=SEEDS, n=2)  # [3, 2, steps]
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        alone = _tokens(janus, [prompt], seed=[seed], n=2)[0]
        assert torch.equal(batched[i], alone), (prompt, batched[i], alone)


def test_micro_batch_one_equals_one_big_batch(janus):
    big = _tokens(janus, PROMPTS, seed=SEEDS, n=2)
    small = _tokens(janus, PROMPTS, seed=SEEDS, n=2, micro_batch=1)
    odd = _tokens(janus, PROMPTS, seed=SEEDS, n=2, micro_batch=4)
    assert torch.equal(big, small)
    assert torch.equal(big, odd)


def test_seed_per_prompt_is_respected(janus):
    # prompt i alone with seed s_i equals prompt i in a batch given the list of seeds, whatever its neighbours
    batched = _tokens(janus, ["a cat", "a cat"], seed=[5, 6])
    assert torch.equal(batched[0], _tokens(janus, ["a cat"], seed=[5])[0])
    assert torch.equal(batched[1], _tokens(janus, ["a cat"], seed=[6])[0])
    assert not torch.equal(batched[0], batched[1])


def test_integer_seed_gives_consecutive_seeds(janus):
    assert torch.equal(_tokens(janus, PROMPTS[:2], seed=40), _tokens(janus, PROMPTS[:2], seed=[40, 41]))


def test_same_seed_same_tokens_different_seed_different_tokens(janus):
    a = _tokens(janus, PROMPTS[:1], seed=3, n=2)
    b = _tokens(janus, PROMPTS[:1], seed=3, n=2)
    c = _tokens(janus, PROMPTS[:1], seed=4, n=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # images of one prompt differ from each other (the image index is part of the row key)
    assert not torch.equal(a[0, 0], a[0, 1])


def test_torch_rng_is_reproducible(janus):
    run = lambda: Decoder.from_spec("").generate_images(janus, PROMPTS[:2], n=2, seed=9, rng="torch").tokens
    assert torch.equal(run(), run())


def test_greedy_is_deterministic_and_seed_free(janus):
    a = _tokens(janus, PROMPTS, seed=1, greedy=True)
    b = _tokens(janus, PROMPTS, seed=999, greedy=True)
    assert torch.equal(a, b)
    alone = _tokens(janus, PROMPTS[1:2], seed=0, greedy=True)
    assert torch.equal(a[1], alone[0])


def test_decoder_that_does_not_couple_rows_keeps_invariance(janus):
    spec = "repetition_penalty(penalty=1.3) > top_k(top_k=40) > temperature(temperature=0.8)"
    batched = _tokens(janus, PROMPTS, seed=SEEDS, spec=spec, micro_batch=2)
    for i in range(len(PROMPTS)):
        assert torch.equal(batched[i], _tokens(janus, [PROMPTS[i]], seed=[SEEDS[i]], spec=spec)[0])


def test_uncond_rows_follow_deepseeks_rule():
    assert uncond_ids([1, 2, 3, 4, 5], pad_id=0) == [1, 0, 0, 0, 5]
    rows = image_rows([[1, 2, 3], [1, 7, 8, 9, 3]], [[1, 0, 3], [1, 0, 0, 0, 3]], "interleaved")
    assert rows == [[1, 2, 3], [1, 0, 3], [1, 7, 8, 9, 3], [1, 0, 0, 0, 3]]
    batch = left_pad(rows, pad_id=0, device="cpu")
    # only the left padding is masked; uncond rows attend their interior pads and share the cond row's positions
    assert batch.valid.tolist()[1] == [False, False, True, True, True]
    assert torch.equal(batch.positions[0], batch.positions[1])
    assert batch.positions[2].tolist() == [0, 1, 2, 3, 4]
    assert batch.next_positions.tolist() == [3, 3, 5, 5]
