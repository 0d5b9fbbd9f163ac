"""Wanda-sp on tiny models: the score of a neuron, head or KV group is the per-weight Wanda score
summed over that structure's o_proj / down_proj input weights, the transform prunes layer by layer
on the already pruned layers' outputs as FLAP's code does, and the score serves the existing
structured transforms."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import graph
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig, default_positions
from nnxprune.scoring import get_score, lowest
from nnxprune.transforms import Context, from_dict
from nnxprune.transforms.wanda_sp import WandaSP

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=6, num_kv_heads=2,
                          intermediate_size=40, head_dim=8, max_position_embeddings=128)
TOKENS = np.random.default_rng(7).integers(0, 96, (4, 20)).astype(np.int32)
SCORE = get_score("wanda_sp")


def build(seed=0) -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def per_weight(kernel, sumsq):
    """Wanda's |W_ij| * ||X_j|| for a kernel [in, out] (row j = input channel j)."""
    return np.abs(np.asarray(kernel)) * np.sqrt(np.asarray(sumsq))[:, None]


def test_score_is_the_wanda_score_summed_over_the_group():
    model = build()
    stats = collect_statistics(model, TOKENS, SCORE.collectors(), progress=False)
    dh, per = CFG.head_dim, 3
    for i in range(CFG.num_layers):
        sumsq = stats[i]["sumsq"]
        layer = model.layers[i]
        down = per_weight(layer.mlp.down_proj.kernel[...], sumsq["mlp.down_proj"])
        o = per_weight(layer.self_attn.o_proj.kernel[...], sumsq["self_attn.o_proj"])
        np.testing.assert_allclose(SCORE(model, graph.find_group(model, "mlp", i), stats),
                                   down.sum(axis=1), rtol=1e-5)
        heads = [o[h * dh:(h + 1) * dh].sum() for h in range(6)]
        np.testing.assert_allclose(SCORE(model, graph.find_group(model, "q", i), stats), heads,
                                   rtol=1e-5)
        groups = [o[g * per * dh:(g + 1) * per * dh].sum() for g in range(2)]
        np.testing.assert_allclose(SCORE(model, graph.find_group(model, "kv", i), stats), groups,
                                   rtol=1e-5)
    with pytest.raises(UserError, match="not 'embed'"):
        SCORE(model, graph.find_group(model, "embed"), stats)


def test_the_statistic_is_the_squared_norm_of_the_down_proj_input():
    model = build(1)
    stats = collect_statistics(model, TOKENS, SCORE.collectors(), progress=False)
    layer, x = model.layers[0], model.embed_tokens(jnp.asarray(TOKENS))
    h = x + layer.self_attn(layer.input_layernorm(x), default_positions(jnp.asarray(TOKENS)),
                            model.inv_freq)[0]
    hn = layer.post_attention_layernorm(h)
    act = jax.nn.silu(layer.mlp.gate_proj(hn)) * layer.mlp.up_proj(hn)
    np.testing.assert_allclose(stats[0]["sumsq"]["mlp.down_proj"],
                               np.sum(np.asarray(act) ** 2, axis=(0, 1)), rtol=1e-4)


@pytest.mark.parametrize("heads", ["kv", "q"])
def test_transform_prunes_layer_by_layer_on_the_pruned_outputs(heads):
    model, manual = build(2), build(2)
    t = from_dict({"kind": "wanda_sp", "ratio": 0.5, "heads": heads})
    predicted = t.check(model.config)
    t(model, Context(tokens=TOKENS, progress=False))
    for i in range(CFG.num_layers):  # the reference's loop: layer i sees layers < i as pruned
        stats = collect_statistics(manual, TOKENS, SCORE.collectors(), progress=False)
        plan = []
        for kind, count in ((heads, 1), ("mlp", 20)):
            g = graph.find_group(manual, kind, i)
            plan.append((g, lowest(SCORE(manual, g, stats), count, g.blocks)))
        for g, keep in plan:
            graph.take(manual, g, keep)
    assert model.config == predicted == manual.config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(manual, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-6, err_msg=str(path))
    shape = LayerShape(num_heads=3, num_kv_heads=1 if heads == "kv" else 2, intermediate_size=20)
    if heads == "q":
        shape = LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=20)
    assert set(model.config.layers) == {shape}


def test_soft_edit_folds_to_the_hard_one():
    hard, soft = build(3), build(3)
    WandaSP(ratio=0.4)(hard, Context(tokens=TOKENS, progress=False))
    WandaSP(ratio=0.4, soft=True)(soft, Context(tokens=TOKENS, progress=False))
    x = jnp.asarray(TOKENS)
    np.testing.assert_allclose(np.asarray(soft(x)), np.asarray(hard(x)), rtol=1e-4, atol=1e-4)
    graph.fold_masks(soft)
    assert soft.config == hard.config


def test_score_serves_the_existing_structured_transforms():
    model = build(4)
    dense = copy.deepcopy(model)
    stats = collect_statistics(dense, TOKENS, SCORE.collectors(), progress=False)
    ctx = Context(tokens=TOKENS, progress=False)
    from_dict({"kind": "shrink_mlp", "score": "wanda_sp", "count": 10})(model, ctx)
    for i in range(CFG.num_layers):
        keep = lowest(SCORE(dense, graph.find_group(dense, "mlp", i), stats), 10)
        np.testing.assert_array_equal(np.asarray(model.layers[i].mlp.down_proj.kernel[...]),
                                      np.asarray(dense.layers[i].mlp.down_proj.kernel[...])[keep])


@pytest.mark.parametrize("settings, match", [
    (dict(ratio=0.0), "ratio must be in"),
    (dict(ratio=1.0), "ratio must be in"),
    (dict(ratio=0.5, heads="all"), "heads must be one of"),
    (dict(ratio=0.5, score="taylor"), "needs gradients"),
    (dict(ratio=0.5, score="wanda_spp"), "did you mean 'wanda_sp'"),
    (dict(ratio=0.5, heads="q", score="block_influence"), "ranks"),
])
def test_bad_settings_fail_before_work(settings, match):
    with pytest.raises(UserError, match=match):
        WandaSP(**settings).check(CFG)
