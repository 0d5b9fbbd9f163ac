"""FLAP on tiny models: the statistics are the exact moments of o_proj / down_proj inputs, the scores
are the reference's fluctuation metrics, the adaptive allocation picks what a brute-force global
threshold on the standardized scores picks, and the compensation bias makes the pruned o_proj /
down_proj give the dense outputs on the calibration mean input."""

import dataclasses

import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import graph
from nnxprune.calibration.collectors import Activations
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.scoring import get_score
from nnxprune.scoring.flap import TAPS, InputMoments
from nnxprune.transforms import FLAP, Context, from_dict

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=4,
                          intermediate_size=40, head_dim=8, max_position_embeddings=64)
TOKENS = np.random.default_rng(5).integers(0, 96, (6, 16)).astype(np.int32)


def build(seed=0) -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def inputs(model):
    """The dense model's o_proj / down_proj inputs `[tokens, channels]` per layer (captured)."""
    stats = collect_statistics(model, TOKENS, (Activations(names=TAPS),), progress=False)
    return {i: {n: np.asarray(s["activations"][n], np.float64) for n in TAPS}
            for i, s in stats.items()}


def metric(x, kernel, which):
    w = np.asarray(kernel, np.float64)
    if which == "ifv":
        return x.var(axis=0, ddof=1)
    if which == "wifv":
        return x.var(axis=0, ddof=1) * (w * w).sum(axis=1)
    return np.abs(w).mean(axis=1) * np.sqrt((x * x).mean(axis=0))


def standardized(v):
    return (v - v.mean()) / v.std(ddof=1)


def test_moments_are_exact():
    model = build()
    acts = inputs(model)
    stats = collect_statistics(model, TOKENS, (InputMoments(),), progress=False)
    for i in range(CFG.num_layers):
        for n in TAPS:
            x, m = acts[i][n], stats[i]["moments"][n]
            np.testing.assert_allclose(m["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m["var"], x.var(axis=0, ddof=1), rtol=1e-4)
            np.testing.assert_allclose(m["sumsq"], (x * x).sum(axis=0), rtol=1e-5)
            assert m["tokens"] == TOKENS.size


@pytest.mark.parametrize("which", ["wifv", "ifv", "wifn"])
def test_scores_are_the_reference_metrics(which):
    model = build(1)
    acts = inputs(model)
    score = get_score(f"flap_{which}")
    stats = collect_statistics(model, TOKENS, score.collectors(), progress=False)
    for i in range(CFG.num_layers):
        layer = model.layers[i]
        down = metric(acts[i]["mlp.down_proj"], layer.mlp.down_proj.kernel[...], which)
        np.testing.assert_allclose(score(model, graph.find_group(model, "mlp", i), stats), down,
                                   rtol=2e-4)
        o = metric(acts[i]["self_attn.o_proj"], layer.self_attn.o_proj.kernel[...], which) ** 2
        np.testing.assert_allclose(score(model, graph.find_group(model, "kv", i), stats),
                                   o.reshape(4, -1).sum(axis=1), rtol=5e-4)
        np.testing.assert_allclose(score(model, graph.find_group(model, "q", i), stats),
                                   o.reshape(8, -1).sum(axis=1), rtol=5e-4)


def brute_force(model, acts, ratio, which="wifv"):
    """Every score tried as the threshold; the one whose kept-or-at weight is closest to
    `(1 - ratio)` of the total wins (the reference's rule); structures above it stay."""
    kv, mlp = [], []
    for i, layer in enumerate(model.layers):
        o = metric(acts[i]["self_attn.o_proj"], layer.self_attn.o_proj.kernel[...], which) ** 2
        kv.append(standardized(o).reshape(CFG.layers[i].num_kv_heads, -1).mean(axis=1))
        mlp.append(standardized(metric(acts[i]["mlp.down_proj"], layer.mlp.down_proj.kernel[...],
                                       which)))
    d, dh, per = CFG.hidden_size, CFG.head_dim, 2
    scores = np.concatenate(kv + mlp)
    weights = np.concatenate([np.full(k.size, (2 * per + 2) * dh * d) for k in kv]
                             + [np.full(m.size, 3 * d) for m in mlp]).astype(float)
    target = weights.sum() * (1 - ratio)
    best = min(scores, key=lambda t: (abs(weights[scores >= t].sum() - target), -t))
    return [(np.flatnonzero(k > best), np.flatnonzero(m > best)) for k, m in zip(kv, mlp)]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_adaptive_allocation_equals_brute_force_threshold(ratio):
    model = build(2)
    expected = brute_force(model, inputs(model), ratio)
    flap = FLAP(ratio=ratio)
    stats = collect_statistics(model, TOKENS, (InputMoments(),), progress=False)
    plan = flap.plan(model, stats)
    for (kv, mlp), (kv_bf, mlp_bf) in zip(plan, expected, strict=True):
        if kv_bf.size:  # a layer with every group below the threshold keeps its best one
            np.testing.assert_array_equal(kv, kv_bf)
        else:
            assert kv.size == 1
        np.testing.assert_array_equal(mlp, mlp_bf)
    sizes = {(len(kv), len(mlp)) for kv, mlp in plan}
    assert len(sizes) > 1, "the layers should get different widths on these scores"
    pruned = flap(nnx.clone(model), Context(tokens=TOKENS, progress=False))
    assert [s.intermediate_size for s in pruned.config.layers] == [len(m) for _, m in plan]
    assert [s.num_kv_heads for s in pruned.config.layers] == [len(k) for k, _ in plan]
    kept = sum(len(k) * 6 * 8 * 32 + len(m) * 3 * 32 for k, m in plan)
    total = CFG.num_layers * (4 * 6 * 8 * 32 + 40 * 3 * 32)
    # within two KV groups (one at the threshold, one kept as a layer's last) of the target
    assert abs(kept - total * (1 - ratio)) <= 2 * 6 * 8 * 32


def projection(layer, name):
    lin = layer
    for part in name.split("."):
        lin = getattr(lin, part)
    return lin


def test_compensation_gives_the_dense_output_on_the_mean_input():
    dense = build(3)
    acts = inputs(dense)
    stats = collect_statistics(dense, TOKENS, (InputMoments(),), progress=False)
    plan = FLAP(ratio=0.4).plan(dense, stats)
    with_bias = FLAP(ratio=0.4)(nnx.clone(dense), Context(tokens=TOKENS, progress=False))
    without = FLAP(ratio=0.4, bias=False)(nnx.clone(dense), Context(tokens=TOKENS, progress=False))
    assert with_bias.config == without.config
    dh_group = 2 * CFG.head_dim
    for i, (kv, mlp) in enumerate(plan):
        rows = {"self_attn.o_proj": (kv[:, None] * dh_group + np.arange(dh_group)).reshape(-1),
                "mlp.down_proj": mlp}
        for name in TAPS:
            mean = acts[i][name].mean(axis=0).astype(np.float32)
            full = projection(dense.layers[i], name)
            lin, bare = projection(with_bias.layers[i], name), projection(without.layers[i], name)
            assert bare.bias is None and full.bias is None
            np.testing.assert_array_equal(np.asarray(lin.kernel[...]), np.asarray(bare.kernel[...]))
            gone = np.setdiff1d(np.arange(full.in_features), rows[name])
            contribution = mean[gone] @ np.asarray(full.kernel[...])[gone]
            # compensated = uncompensated + the removed channels' mean contribution ...
            np.testing.assert_allclose(np.asarray(lin.bias[...]), contribution, rtol=1e-5,
                                       atol=1e-6)
            x = mean[rows[name]][None]
            np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(bare(x)) + contribution,
                                       rtol=1e-5, atol=1e-5)
            # ... so on the calibration mean input it gives the dense projection's output
            np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(full(mean[None])),
                                       rtol=1e-4, atol=1e-5)
    assert np.abs(contribution).max() > 1e-2  # a real compensation, not a zero bias


def test_soft_equals_hard_and_folds():
    model = build(4)
    hard = FLAP(ratio=0.3)(nnx.clone(model), Context(tokens=TOKENS, progress=False))
    soft = FLAP(ratio=0.3, soft=True)(nnx.clone(model), Context(tokens=TOKENS, progress=False))
    assert soft.config == model.config
    tokens = TOKENS[:2]
    np.testing.assert_allclose(np.asarray(soft(tokens)), np.asarray(hard(tokens)), rtol=1e-5,
                               atol=1e-5)
    graph.fold_masks(soft)
    assert soft.config == hard.config
    np.testing.assert_allclose(np.asarray(soft(tokens)), np.asarray(hard(tokens)), rtol=1e-5,
                               atol=1e-5)


def test_uniform_structure_removes_the_same_share_per_layer():
    model = build(5)
    step = from_dict({"kind": "flap", "ratio": 0.5, "structure": "UL-UM", "metric": "ifv"})
    predicted = step.check(model.config)
    stats = collect_statistics(model, TOKENS, (InputMoments(),), progress=False)
    score = get_score("flap_ifv")
    expected = [np.sort(np.argsort(score(model, graph.find_group(model, "mlp", i), stats),
                                   kind="stable")[20:]) for i in range(CFG.num_layers)]
    ctx = Context(tokens=TOKENS, progress=False)
    dense = nnx.clone(model)
    step(model, ctx)
    assert model.config == predicted
    for i in range(CFG.num_layers):  # the neurons of lowest unstandardized score went
        np.testing.assert_array_equal(np.asarray(model.layers[i].mlp.up_proj.kernel[...]),
                                      np.asarray(dense.layers[i].mlp.up_proj.kernel[...])[:, expected[i]])
    assert {s.intermediate_size for s in model.config.layers} == {20}
    assert {s.num_kv_heads for s in model.config.layers} == {2}
    assert ctx.report["transforms"][-1]["structure"] == "UL-UM"


@pytest.mark.parametrize("spec, message", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"),
    ({"ratio": 0.2, "metric": "wanda"}, "metric"),
    ({"ratio": 0.2, "structure": "AL-MM"}, "structure"),
    ({"ratio": 0.2, "batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_refused_before_work(spec, message):
    with pytest.raises(UserError, match=message):
        from_dict({"kind": "flap", **spec}).check(CFG)


def test_needs_calibration():
    with pytest.raises(UserError, match="calibration"):
        FLAP(ratio=0.2)(build(), Context())


def test_heterogeneous_layers():
    cfg = dataclasses.replace(CFG, layers=(CFG.layers[0], dataclasses.replace(
        CFG.layers[1], intermediate_size=24), CFG.layers[2]))
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(6)), seed=6, scale=0.3)
    FLAP(ratio=0.3)(model, Context(tokens=TOKENS, progress=False))
    assert all(lin.bias is not None for layer in model.layers
               for lin in (layer.self_attn.o_proj, layer.mlp.down_proj))
    assert np.isfinite(np.asarray(model(TOKENS[:1]))).all()
