"""Shortened LLaMA on tiny models: the PPL criterion is the perplexity of the model with each block
alone removed, Taylor+ is the sum of |W * dL/dW| over a block's weights (norm scales included),
the "+" heuristic keeps the first and last blocks, and bad settings fail before any work."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import graph
from nnxprune.errors import UserError
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.transforms import Context, from_dict
from nnxprune.transforms.shortened import (Shortened, ppl_block_scores, removal_order,
                                           taylor_block_scores)

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=8, num_heads=6, num_kv_heads=2,
                          intermediate_size=40, head_dim=8, max_position_embeddings=128)
TOKENS = np.random.default_rng(6).integers(0, 96, (4, 20)).astype(np.int32)


def build(seed=0) -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def mean_ce(model, tokens):
    logits = model(jnp.asarray(tokens))[:, :-1].astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(tokens)[:, 1:, None], axis=-1))


def test_ppl_criterion_is_the_perplexity_without_each_block():
    model = build()
    scores = ppl_block_scores(model, TOKENS, batch_size=2)
    for i in range(CFG.num_layers):
        cut = copy.deepcopy(model)
        graph.drop_layers(cut, [i])
        np.testing.assert_allclose(scores[i], float(jnp.exp(mean_ce(cut, TOKENS))), rtol=1e-4)


def hand_taylor(model, batches):
    """sum over a block's weights of |sum_b W * g_b|, by nnx.grad over the whole model."""
    total = {}
    for rows in batches:
        grads = nnx.grad(lambda m: mean_ce(m, TOKENS[rows]))(model)
        params = nnx.state(model, nnx.Param)
        for (path, w), (gpath, g) in zip(nnx.to_flat_state(params), nnx.to_flat_state(grads)):
            assert path == gpath
            if path[0] == "layers":
                total[path] = total.get(path, 0) + np.asarray(w[...]) * np.asarray(g[...])
    scores = [0.0] * CFG.num_layers
    names = [set() for _ in range(CFG.num_layers)]
    for path, s in total.items():
        scores[int(path[1])] += float(np.abs(s).sum())
        names[int(path[1])].add(".".join(map(str, path[2:])))
    return scores, names


@pytest.mark.parametrize("batch_size, batches", [(4, [slice(0, 4)]),
                                                 (2, [slice(0, 2), slice(2, 4)])])
def test_taylor_plus_is_the_summed_weight_times_gradient(batch_size, batches):
    model = build(1)
    scores = taylor_block_scores(model, TOKENS, batch_size=batch_size)
    expected, names = hand_taylor(model, batches)
    assert {"input_layernorm.scale", "post_attention_layernorm.scale", "mlp.down_proj.kernel",
            "self_attn.q_proj.kernel"} <= names[0]  # norms take part, as in the reference
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_plus_heuristic_keeps_the_first_and_last_blocks():
    scores = [0.1, 0.2, 5.0, 0.05, 3.0, 0.3, 0.0, 0.01]
    assert removal_order(scores, 2, 1) == [6, 3, 5, 4, 2]
    assert removal_order(scores, 0, 0)[:3] == [6, 7, 3]
    assert removal_order([1.0, 1.0, 1.0, 1.0], 1, 1) == [1, 2]  # ties: the earlier block first


@pytest.mark.parametrize("criterion", ["ppl", "taylor"])
def test_transform_drops_the_lowest_allowed_blocks(criterion):
    model = build(2)
    if criterion == "ppl":
        scores = ppl_block_scores(copy.deepcopy(model), TOKENS)
    else:
        scores = taylor_block_scores(copy.deepcopy(model), TOKENS)
    t = from_dict({"kind": "shortened", "criterion": criterion, "count": 2, "keep_first": 2,
                   "keep_last": 1, "batch_size": 4})
    predicted = t.check(model.config)
    ctx = Context(tokens=TOKENS, progress=False)
    t(model, ctx)
    entry = ctx.report["transforms"][0]
    allowed = [i for i in np.argsort(scores, kind="stable") if 2 <= i < CFG.num_layers - 1]
    assert entry["dropped"] == sorted(int(i) for i in allowed[:2])
    np.testing.assert_allclose(entry["scores"], scores, rtol=1e-5)
    assert model.config == predicted and model.config.num_layers == CFG.num_layers - 2


@pytest.mark.parametrize("settings, match", [
    (dict(count=0), r"count must be in \[1, 2\]"),
    (dict(count=3), r"count must be in \[1, 2\]"),
    (dict(count=1, criterion="tailor"), "did you mean 'taylor'"),
    (dict(count=1, keep_first=-1), "keep_first"),
    (dict(count=1, batch_size=0), "batch_size"),
])
def test_bad_settings_fail_before_work(settings, match):
    with pytest.raises(UserError, match=match):
        Shortened(**settings).check(CFG)
