"""The gradient pass: chunked = whole, per-sample squares by hand, float32, masks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.gradients import GRADIENT, GRADIENT_SQ, gradient_pass, mean_next_token_ce
from nnxprune.models.llama import Llama


@pytest.fixture
def model(tiny_config):
    return randomize_params(Llama(tiny_config, rngs=nnx.Rngs(0)), scale=0.1)


def toks(n=4, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, t)).astype(np.int32)


def test_chunks_average_to_the_whole_batch(model):
    whole, parts = gradient_pass(model, toks()), gradient_pass(model, toks(), batch_size=2)
    np.testing.assert_allclose(parts.loss, whole.loss, rtol=1e-6)
    for name, g in whole.stats[1][GRADIENT].items():
        np.testing.assert_allclose(parts.stats[1][GRADIENT][name], g, rtol=1e-4, atol=1e-7)
    assert set(whole.stats) == {0, 1} and GRADIENT_SQ not in whole.stats[0]


def test_second_order_is_the_mean_of_per_row_squared_gradients(model):
    tokens = toks()
    got = gradient_pass(model, tokens, second_order=True).stats[0][GRADIENT_SQ]["mlp.up_proj"]
    rows = [gradient_pass(model, tokens[j:j + 1]).stats[0][GRADIENT]["mlp.up_proj"]
            for j in range(len(tokens))]
    want = np.mean([np.square(r) for r in rows], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)


def test_loss_is_the_mean_next_token_cross_entropy(model):
    tokens = toks()
    logits = model(jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    want = -np.mean(np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1))
    np.testing.assert_allclose(gradient_pass(model, tokens).loss, want, rtol=1e-6)
    np.testing.assert_allclose(float(mean_next_token_ce(logits, jnp.asarray(tokens))), want, rtol=1e-6)


def test_bfloat16_parameters_are_differentiated_in_float32(model):
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    g = gradient_pass(model, toks()).stats[0][GRADIENT]["self_attn.q_proj"]
    assert g.dtype == jnp.float32


def test_masked_weights_get_zero_gradient(model):
    lin = model.layers[0].mlp.up_proj
    mask = np.ones(lin.kernel.shape, bool)
    mask[:, :5] = False
    lin.set_mask(mask)
    g = np.asarray(gradient_pass(model, toks()).stats[0][GRADIENT]["mlp.up_proj"])
    assert np.all(g[:, :5] == 0) and np.abs(g[:, 5:]).max() > 0


@pytest.mark.parametrize("shape,batch,match", [((4,), None, "must be"), ((4, 1), None, "T >= 2"),
                                               ((4, 8), 3, "must divide")])
def test_bad_input(model, shape, batch, match):
    with pytest.raises(ValueError, match=match):
        gradient_pass(model, np.zeros(shape, np.int32), batch_size=batch)
