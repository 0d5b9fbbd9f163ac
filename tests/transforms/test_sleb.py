"""SLEB on tiny models: every step removes the block a brute-force search over hard-pruned copies
removes, switching a block off equals its soft removal, one compiled layer program serves every
candidate, and bad settings fail before any work."""

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
from nnxprune.transforms import sleb
from nnxprune.transforms.sleb import SLEB, removal_nll, sleb_search

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=7, num_heads=6, num_kv_heads=2,
                          intermediate_size=40, head_dim=8, max_position_embeddings=128)
TOKENS = np.random.default_rng(5).integers(0, 96, (4, 24)).astype(np.int32)


def build(seed=0) -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def full_nll(model) -> float:
    """Total next-token NLL from the model's own forward (logits, log-softmax): no shared code."""
    logits = model(jnp.asarray(TOKENS))[:, :-1].astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(lp, jnp.asarray(TOKENS)[:, 1:, None], axis=-1)
    return float(-jnp.sum(picked))


@pytest.mark.parametrize("seed", [0, 1])
def test_each_step_removes_the_block_brute_force_removes(seed):
    model = build(seed)
    removed, history = sleb_search(model, TOKENS, 4, batch_size=2)
    predicted = TOKENS.shape[0] * (TOKENS.shape[1] - 1)
    gone = []
    for step in range(4):
        alive = [i for i in range(CFG.num_layers) if i not in gone]
        candidates = alive[1:-1]  # the reference's barriers: first and last surviving block stay
        assert sorted(history[step]) == candidates
        brute = {}
        for c in candidates:
            cut = copy.deepcopy(model)
            graph.drop_layers(cut, gone + [c])
            brute[c] = full_nll(cut)
            np.testing.assert_allclose(history[step][c], np.exp(brute[c] / predicted), rtol=1e-4)
        pick = min(candidates, key=lambda c: (brute[c], c))
        assert removed[step] == pick
        gone.append(pick)
    assert len(set(removed)) == 4 and model.config.num_layers == CFG.num_layers  # scoring is soft


def test_switching_a_block_off_equals_its_soft_removal():
    model = build()
    alive = [0, 1, 3, 4, 6]
    nll = removal_nll(model, TOKENS, [1, 4], alive=alive, batch_size=4)
    for c, value in zip([1, 4], nll):
        soft = copy.deepcopy(model)
        for i in set(range(CFG.num_layers)) - set(alive) | {c}:
            graph.mask_group(soft, graph.find_group(soft, "layer", i), [])
        np.testing.assert_allclose(value, full_nll(soft), rtol=1e-4)


def test_one_compiled_layer_program_serves_every_candidate():
    model = build(2)
    before = sleb._layer_forward._cache_size()
    sleb_search(model, TOKENS, 3, batch_size=4)  # 5 + 4 + 3 candidates over 7 layers of one shape
    assert sleb._layer_forward._cache_size() - before <= 1


def test_transform_drops_the_search_order_and_predicts_the_config():
    model = build(3)
    expected, _ = sleb_search(copy.deepcopy(model), TOKENS, 2, batch_size=2)
    t = from_dict({"kind": "sleb", "count": 2, "batch_size": 2})
    assert t == SLEB(count=2, batch_size=2)
    predicted = t.check(model.config)
    ctx = Context(tokens=TOKENS, progress=False)
    t(model, ctx)
    entry = ctx.report["transforms"][0]
    assert entry["removal_order"] == expected and entry["dropped"] == sorted(expected)
    assert model.config == predicted and model.config.num_layers == CFG.num_layers - 2
    reference = copy.deepcopy(build(3))
    graph.drop_layers(reference, expected)
    np.testing.assert_allclose(full_nll(model), full_nll(reference), rtol=1e-6)


@pytest.mark.parametrize("settings, match", [
    (dict(count=0), "positive"),
    (dict(count=6), "no block would be left"),
    (dict(count=4, early_barrier=2, latter_barrier=2), "no block would be left"),
    (dict(count=1, early_barrier=-1), "early_barrier"),
    (dict(count=1, batch_size=0), "batch_size"),
])
def test_bad_settings_fail_before_work(settings, match):
    with pytest.raises(UserError, match=match):
        SLEB(**settings).check(CFG)


def test_needs_calibration():
    with pytest.raises(UserError, match="calibration"):
        SLEB(count=1)(build(), Context(progress=False))
