"""The image tokens' embedding table the fast step looks rows up in: row i is what the model's own re-embedding
gives token i (``core/embedding_table.py``)."""

from __future__ import annotations

import torch

from janus_decoding.core.embedding_table import image_embedding_table


def test_each_row_is_the_models_embedding_of_that_token(janus):
    vocab = janus.image_vocab_size
    table = image_embedding_table(janus, chunk=7)  # chunks that do not divide the vocabulary
    assert table.shape == (vocab, janus.hidden_size) and table.dtype == janus.dtype
    ids = torch.tensor([0, 5, vocab - 1, 5, 3])  # repeats and the last id
    torch.testing.assert_close(table[ids], janus.embed_image_tokens(ids), rtol=1e-6, atol=1e-6)
    one_by_one = torch.cat([janus.embed_image_tokens(torch.tensor([i])) for i in range(vocab)])
    torch.testing.assert_close(table, one_by_one, rtol=1e-6, atol=1e-6)


def test_a_model_without_image_tokens_has_no_table(llama):
    assert image_embedding_table(llama) is None
