"""Mask-aware layers against numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.layers import Embed, Linear, RMSNorm
from nnxprune.variables import Mask


def _linear(in_features=12, out_features=8, seed=0):
    lin = Linear(in_features, out_features, in_space="embed", out_space="mlp", rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    lin.kernel[...] = jnp.asarray(rng.standard_normal((in_features, out_features)), jnp.float32)
    return lin


def test_linear_without_mask_is_plain_matmul():
    lin = _linear()
    assert lin.mask is None
    assert len(nnx.to_flat_state(nnx.state(lin, Mask))) == 0
    x = np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), x @ np.asarray(lin.kernel[...]),
                               rtol=1e-5, atol=1e-5)
    assert (lin.in_features, lin.out_features) == (12, 8)


def test_linear_with_mask_matches_numpy_reference():
    lin = _linear()
    rng = np.random.default_rng(2)
    mask = rng.random((12, 8)) > 0.5
    assert 0 < mask.sum() < mask.size
    lin.set_mask(mask)

    masks = nnx.to_flat_state(nnx.state(lin, Mask))
    assert len(masks) == 1
    kernel = np.asarray(lin.kernel[...])
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    expected = x @ (kernel * mask)
    out = np.asarray(lin(jnp.asarray(x)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # The mask really changes the output (it is not a no-op).
    assert np.abs(out - x @ kernel).max() > 1e-2

    eff = np.asarray(lin.effective_kernel())
    assert np.all(eff[~mask] == 0.0)
    np.testing.assert_array_equal(eff[mask], kernel[mask])
    # The underlying parameter is untouched: masking is not destructive.
    assert np.all(kernel[~mask] != 0.0)


def test_set_mask_replaces_previous_mask():
    lin = _linear()
    lin.set_mask(np.zeros((12, 8), bool))
    assert np.all(np.asarray(lin.effective_kernel()) == 0)
    lin.set_mask(np.ones((12, 8), bool))
    np.testing.assert_array_equal(np.asarray(lin.effective_kernel()), np.asarray(lin.kernel[...]))


def test_mask_of_wrong_shape_raises():
    lin = _linear()
    with pytest.raises(ValueError):
        lin.set_mask(np.ones((8, 12), bool))
    with pytest.raises(ValueError):
        lin.set_mask(np.ones((12,), bool))
    assert lin.mask is None


@pytest.mark.parametrize("spaces", [("embed", "nope"), ("heads", "mlp")])
def test_unknown_channel_space_raises(spaces):
    with pytest.raises(ValueError):
        Linear(4, 4, in_space=spaces[0], out_space=spaces[1], rngs=nnx.Rngs(0))


def test_rmsnorm_matches_numpy_reference():
    rng = np.random.default_rng(3)
    norm = RMSNorm(16, eps=1e-5)
    scale = (1.0 + 0.3 * rng.standard_normal(16)).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    x = (5.0 * rng.standard_normal((2, 3, 16))).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = scale * x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_eps_matters_for_small_inputs():
    norm = RMSNorm(4, eps=1.0)
    x = np.full((1, 4), 0.1, np.float32)
    expected = x / np.sqrt(0.01 + 1.0)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-6)


def test_embed_lookup_and_attend():
    rng = np.random.default_rng(4)
    emb = Embed(10, 6, rngs=nnx.Rngs(0))
    table = rng.standard_normal((10, 6)).astype(np.float32)
    emb.embedding[...] = jnp.asarray(table)
    tokens = np.array([[0, 3, 9], [1, 1, 2]])
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(tokens))), table[tokens])
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(emb.attend(jnp.asarray(x))), x @ table.T, rtol=1e-5, atol=1e-5)
