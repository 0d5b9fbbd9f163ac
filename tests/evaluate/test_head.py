"""The tiled output head equals full logits followed by log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.evaluate import head as head_lib
from nnxprune.models.llama import Llama, LlamaConfig
from tests.conftest import randomize_params


def _model(tie: bool, vocab: int) -> Llama:
    cfg = LlamaConfig.uniform(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, head_dim=16,
                              tie_word_embeddings=tie)
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("tile,rows", [(64, 50), (256, 512), (1000, 7)],
                         ids=["ragged-tail", "one-tile", "tile-over-vocab"])
def test_tiled_head_equals_full_log_softmax(monkeypatch, tie, tile, rows):
    vocab, n = 300, 173  # 300 % 64 != 0: a narrower last tile; 173 % 50 != 0: padded rows
    monkeypatch.setattr(head_lib, "VOCAB_TILE", tile)
    monkeypatch.setattr(head_lib, "ROW_CHUNK", rows)
    model = _model(tie, vocab)
    h = jax.random.normal(jax.random.PRNGKey(1), (n, 32)) * 2.0
    logits = np.asarray(model.logits(h), np.float64)
    targets = np.array(jax.random.randint(jax.random.PRNGKey(2), (n,), 0, vocab))
    targets[::2] = logits.argmax(-1)[::2]  # every other target is the greedy token
    targets = jnp.asarray(targets)
    ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(n), np.asarray(targets)]
    assert np.ptp(ref) > 1.0  # real spread, not near-uniform logits
    lp, greedy = jax.jit(lambda h, t: head_lib.head_logprobs(model, h, t, with_greedy=True))(h, targets)
    np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == np.asarray(targets))
    assert 0 < np.asarray(greedy).sum() < n
    assert np.all(np.asarray(lp) <= 0)
    lp_only, none = head_lib.head_logprobs(model, h, targets)
    assert none is None
    np.testing.assert_allclose(np.asarray(lp_only), ref, atol=2e-5, rtol=0)  # target by dot product


def test_greedy_ties_go_to_the_first_index(monkeypatch):
    monkeypatch.setattr(head_lib, "VOCAB_TILE", 64)
    model = _model(True, 300)
    emb = np.asarray(model.embed_tokens.embedding[...]).copy()
    emb[200] = emb[10]  # tokens 10 and 200 (different tiles) give identical logits
    model.embed_tokens.embedding[...] = jnp.asarray(emb)
    h = jnp.asarray(emb[10:11] * 10.0)  # makes token 10 (and 200) the top logit
    assert int(np.argmax(np.asarray(model.logits(h))[0])) == 10
    _, greedy = head_lib.head_logprobs(model, jnp.tile(h, (3, 1)), jnp.array([10, 200, 11]),
                                       with_greedy=True)
    assert np.asarray(greedy).tolist() == [True, False, False]
