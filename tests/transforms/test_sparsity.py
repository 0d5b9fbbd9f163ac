"""Magnitude, Wanda, SparseGPT and OWL as transforms: exact sparsity, faithful scores, the
sequential driver feeding pruned outputs forward, determinism, and validation before work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.algorithms.owl import owl_allocation
from nnxprune.algorithms.sparsegpt import hessian
from nnxprune.calibration.collectors import InputSumSq, InputXtX
from nnxprune.calibration.sequential import embed_inputs, run_sequential
from nnxprune.errors import UserError
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.transforms import OWL, Context, Magnitude, SparseGPT, Wanda

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, head_dim=8, max_position_embeddings=64)
TOKENS = np.random.default_rng(0).integers(0, 96, (8, 32)).astype(np.int32)
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build(seed=0) -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def lin(model, i, name):
    node = model.layers[i]
    for part in name.split("."):
        node = getattr(node, part)
    return node


def run(transform, model=None, tokens=TOKENS):
    model = model or build()
    transform.check(model.config)
    ctx = Context(tokens=tokens, progress=False)
    transform(model, ctx)
    return model, ctx


def layer_input(model, i, name, tokens=TOKENS):
    """The input of projection `name` in layer i, computed by hand from the model."""
    x = model.embed_tokens(jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for layer in model.layers[:i]:
        x = layer(x, pos, model.inv_freq)[0]
    layer = model.layers[i]
    h = layer.input_layernorm(x)
    if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return h
    a = layer.self_attn(h, pos, model.inv_freq)[0]
    x = x + a
    h2 = layer.post_attention_layernorm(x)
    if name in ("mlp.gate_proj", "mlp.up_proj"):
        return h2
    if name == "mlp.down_proj":
        return jax.nn.silu(layer.mlp.gate_proj(h2)) * layer.mlp.up_proj(h2)
    raise ValueError(name)


# -- exact sparsity --------------------------------------------------------------------------------
def test_magnitude_per_matrix_exact():
    dense = build()
    model, ctx = run(Magnitude(sparsity=0.5))
    for i in range(3):
        for name in NAMES:
            k = np.asarray(lin(model, i, name).effective_kernel())
            assert (k == 0).sum() == int(k.size * 0.5)
            # the pruned weights are the smallest of the matrix
            w = np.abs(np.asarray(lin(dense, i, name).kernel[...]))
            assert w[k == 0].max() <= w[k != 0].min()
    assert ctx.report["transforms"][0]["mean_sparsity"] == 0.5


@pytest.mark.parametrize("method", [Magnitude, Wanda, SparseGPT])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:4"])
def test_every_nm_group_holds_exactly_n_zeros(method, pattern):
    n, m = map(int, pattern.split(":"))
    model, _ = run(method(pattern=pattern))
    for i in range(3):
        for name in NAMES:
            keep = np.asarray(lin(model, i, name).mask[...])
            zeros = (~keep).reshape(keep.shape[0] // m, m, keep.shape[1]).sum(axis=1)
            assert (zeros == n).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_exact_per_output_and_faithful_scores(sparsity):
    dense = build()
    model, _ = run(Wanda(sparsity=sparsity))
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        keep = np.asarray(lin(model, 0, name).mask[...])
        assert ((~keep).sum(axis=0) == int(keep.shape[0] * sparsity)).all()
        # layer 0 sees the dense model's inputs: the score is |W| * ||x_j|| over all tokens
        x = np.asarray(layer_input(dense, 0, name)).reshape(-1, keep.shape[0])
        score = np.abs(np.asarray(lin(dense, 0, name).kernel[...])) * np.linalg.norm(x, axis=0)[:, None]
        for col in range(keep.shape[1]):
            assert score[~keep[:, col], col].max() <= score[keep[:, col], col].min() + 1e-6


def test_sequential_driver_feeds_pruned_outputs_forward():
    """Layer 1's statistics must come from the outputs of the already pruned layer 0."""
    model = build()
    seen = {}

    def visit(i, layer, calib):
        seen[i] = np.asarray(calib.stats["sumsq"]["self_attn.q_proj"])
        for name in NAMES:  # prune something visible: half of every matrix
            node = lin(model, i, name)
            node.set_mask(np.arange(node.kernel.shape[0])[:, None] % 2 == 0
                          * np.ones(node.kernel.shape, bool))

    run_sequential(model, TOKENS, visit, [InputSumSq(names=NAMES)], progress=False)
    x_pruned = np.asarray(layer_input(model, 1, "self_attn.q_proj"))  # model is pruned now
    np.testing.assert_allclose(seen[1], (x_pruned.reshape(-1, 32) ** 2).sum(0), rtol=2e-4)
    dense_x = np.asarray(layer_input(build(), 1, "self_attn.q_proj"))
    assert not np.allclose(seen[1], (dense_x.reshape(-1, 32) ** 2).sum(0), rtol=1e-2)


def test_driver_hessian_matches_inputs():
    model = build()
    got = {}
    run_sequential(model, TOKENS, lambda i, layer, c: got.setdefault(i, c), [InputXtX(names=NAMES)],
                   progress=False, batch_size=3)  # 3 does not divide 8: batches of 2
    x = np.asarray(layer_input(model, 0, "mlp.down_proj"), np.float64).reshape(-1, 64)
    c = got[0]
    assert c.tokens == 8 * 32 and c.sequences == 8
    H = hessian(c.stats["xtx"]["mlp.down_proj"], c.sequences)
    np.testing.assert_allclose(np.asarray(H), 2 / 8 * x.T @ x, rtol=1e-3, atol=1e-3)
    # the projections SparseGPT factors once per input (SHARED_INPUT) do read one tensor
    from nnxprune.transforms.sparsegpt import SHARED_INPUT

    for i, calib in got.items():
        stats = calib.stats["xtx"]
        for shared in set(SHARED_INPUT.values()):
            names = [n for n, key in SHARED_INPUT.items() if key == shared]
            for n in names[1:]:
                np.testing.assert_array_equal(np.asarray(stats[n]), np.asarray(stats[names[0]]))


def test_same_seed_same_masks_and_embed_once():
    a, _ = run(Wanda(sparsity=0.5))
    b, _ = run(Wanda(sparsity=0.5))
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(lin(a, 2, name).mask[...]),
                                      np.asarray(lin(b, 2, name).mask[...]))
    x = embed_inputs(build(), TOKENS, batch_size=3)
    np.testing.assert_allclose(np.asarray(x), np.asarray(build().embed_tokens(jnp.asarray(TOKENS))))


def test_sparsegpt_reconstruction_beats_wanda_and_magnitude():
    """Layer-wise reconstruction error of each projection on the same calibration inputs."""
    dense = build()
    errors = {}
    for method in (Magnitude, Wanda, SparseGPT):
        model, _ = run(method(sparsity=0.5))
        total = 0.0
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            x = np.asarray(layer_input(dense, 0, name)).reshape(-1, lin(dense, 0, name).in_features)
            ref = x @ np.asarray(lin(dense, 0, name).kernel[...])
            got = x @ np.asarray(lin(model, 0, name).effective_kernel())
            total += float(((ref - got) ** 2).sum())
        errors[method.kind] = total
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


# -- OWL -------------------------------------------------------------------------------------------
def test_owl_allocation():
    s = owl_allocation([1.0, 3.0, 2.0, 5.0], target=0.7, lam=0.08)
    assert s.mean() == pytest.approx(0.7)
    assert s.max() - s.min() == pytest.approx(0.16)
    assert s[3] == s.min() and s[0] == s.max()  # more outliers, less pruning
    np.testing.assert_allclose(owl_allocation([2.0, 2.0], 0.5, 0.08), [0.5, 0.5])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_prunes_each_layer_at_its_allocation(method):
    model, ctx = run(OWL(sparsity=0.6, lam=0.05, method=method))
    owl = next(t for t in ctx.report["transforms"] if t["kind"] == "owl")
    assert len(set(owl["layer_sparsity"])) > 1
    for i, target in enumerate(owl["layer_sparsity"]):
        keep = np.asarray(lin(model, i, "mlp.up_proj").mask[...])
        if method == "wanda":  # Wanda compares weights per output row
            assert (~keep).sum(axis=0).max() == int(32 * target)
        else:  # SparseGPT prunes the share of each column block
            assert (~keep).mean() == pytest.approx(target, abs=1 / 32)
    assert np.mean(owl["layer_sparsity"]) == pytest.approx(0.6)


def test_owl_rejects_an_unknown_method():
    with pytest.raises(UserError, match="one of wanda, magnitude, sparsegpt"):
        OWL(sparsity=0.5, method="sparsellm").check(build().config)


# -- validation before work ------------------------------------------------------------------------
@pytest.mark.parametrize("transform, match", [
    (Wanda(sparsity=1.0), r"\[0, 1\)"),
    (Wanda(sparsity=-0.1), r"\[0, 1\)"),
    (Wanda(pattern="4:4"), "0 < N < M"),
    (Wanda(pattern="2-4"), "look like"),
    (Magnitude(pattern="3:7"), "not a multiple of M=7"),
    (Magnitude(sparsity=0.5, pattern="2:8"), "contradicts"),
    (Magnitude(), "give 'sparsity'"),
    (Wanda(sparsity=0.5, targets="attention"), "matches no projection"),
    (Wanda(sparsity=0.5, ignore="lm_head"), "matches no targeted projection"),
    (Wanda(sparsity=0.5, targets="mlp", ignore="mlp"), "no projection left"),
    (OWL(sparsity=0.7, pattern="2:4"), "not supported"),
    (OWL(sparsity=0.7, lam=0.5), "lam must be"),
    (SparseGPT(pattern="2:4", blocksize=126), "multiple of M=4"),
])
def test_bad_settings(transform, match):
    with pytest.raises(UserError, match=match):
        transform.check(CFG)


def test_targets_and_ignore_scope():
    model, ctx = run(Wanda(sparsity=0.5, targets=r"mlp\.", ignore=r"layers\.1\."))
    pruned = set(ctx.report["transforms"][0]["per_matrix"])
    assert pruned == {f"layers.{i}.mlp.{p}" for i in (0, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert lin(model, 1, "mlp.up_proj").mask is None and lin(model, 0, "self_attn.q_proj").mask is None
    assert model.embed_tokens.mask is None and model.lm_head.mask is None


def test_calibrated_method_without_data():
    model = build()
    with pytest.raises(UserError, match="calibration"):
        Wanda(sparsity=0.5)(model, Context(progress=False))
