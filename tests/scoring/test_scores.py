"""Scores: the registry, the member reduction, weight_norm and structured Wanda against hand
computations, and structured transforms that calibrate only when their score needs it."""

import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.collectors import InputSumSq
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.graph import find_group
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.scoring import SCORES, get_score, lowest, reduce_members
from nnxprune.transforms import Context, RemoveQueryHeads, ShrinkHidden, ShrinkMLP

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, head_dim=8, max_position_embeddings=64)
TOKENS = np.random.default_rng(2).integers(0, 96, (4, 24)).astype(np.int32)


def build() -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=0, scale=0.3)


def k(model, i, name):
    node = model.layers[i]
    for part in name.split("."):
        node = getattr(node, part)
    return np.asarray(node.effective_kernel(), np.float64)


def test_registry_and_unknown_names():
    assert {"weight_norm", "wanda"} <= set(SCORES)
    assert not get_score("weight_norm").needs_calibration()
    assert get_score("wanda").needs_calibration()
    with pytest.raises(UserError, match="did you mean 'wanda'"):
        get_score("wandaa")


def test_weight_norm_of_an_mlp_group_by_hand():
    model = build()
    got = get_score("weight_norm")(model, find_group(model, "mlp", 1))
    want = np.sqrt((k(model, 1, "mlp.gate_proj") ** 2).sum(0) + (k(model, 1, "mlp.up_proj") ** 2).sum(0)
                   + (k(model, 1, "mlp.down_proj") ** 2).sum(1))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_structured_wanda_by_hand():
    model = build()
    stats = collect_statistics(model, TOKENS, get_score("wanda").collectors(), progress=False)
    norm = {n: np.sqrt(np.asarray(stats[0]["sumsq"][n], np.float64))
            for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj",
                      "self_attn.o_proj")}
    got = get_score("wanda")(model, find_group(model, "mlp", 0), stats)
    want = ((np.abs(k(model, 0, "mlp.gate_proj")) * norm["mlp.gate_proj"][:, None]).sum(0)
            + (np.abs(k(model, 0, "mlp.up_proj")) * norm["mlp.up_proj"][:, None]).sum(0)
            + (np.abs(k(model, 0, "mlp.down_proj")) * norm["mlp.down_proj"][:, None]).sum(1))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # query heads: q columns and o_proj rows of each head (unit head_dim = 8)
    got = get_score("wanda")(model, find_group(model, "q", 0), stats)
    q = (np.abs(k(model, 0, "self_attn.q_proj")) * norm["self_attn.q_proj"][:, None]).sum(0)
    o = (np.abs(k(model, 0, "self_attn.o_proj")) * norm["self_attn.o_proj"][:, None]).sum(1)
    np.testing.assert_allclose(got, (q + o).reshape(4, 8).sum(1), rtol=1e-4)
    with pytest.raises(ValueError, match="needs calibration"):
        get_score("wanda")(model, find_group(model, "mlp", 0))


def test_reduce_members():
    model = build()
    group = find_group(model, "mlp", 0)
    a, b, c = (np.arange(48.0), np.ones(48), np.full(48, 2.0))
    np.testing.assert_allclose(reduce_members(group, [a, None, c], "max"), np.maximum(a, 2.0))
    np.testing.assert_allclose(reduce_members(group, [a, b, c], "mean"), (a + 3) / 3)
    np.testing.assert_allclose(reduce_members(group, [a, b, c], "prod"), a * 2)
    with pytest.raises(ValueError, match="reduction"):
        reduce_members(group, [a, b, c], "median")


def test_calibrated_score_in_a_structured_transform():
    """`shrink_mlp` with `score = "wanda"` asks for calibration, keeps the neurons the score
    ranks highest, and its soft edit equals its hard edit."""
    step = ShrinkMLP(fraction=0.25, score="wanda")
    assert step.needs_calibration and not ShrinkMLP(fraction=0.25).needs_calibration
    with pytest.raises(UserError, match="calibration"):
        step(build(), Context(progress=False))
    model = build()
    stats = collect_statistics(model, TOKENS, [InputSumSq(names=("mlp.gate_proj", "mlp.up_proj",
                                                                  "mlp.down_proj"))], progress=False)
    want = {i: lowest(get_score("wanda")(model, find_group(model, "mlp", i), stats), 12)
            for i in range(2)}
    ctx = Context(tokens=TOKENS, progress=False)
    step(model, ctx)
    assert ctx.report["transforms"][-1]["widths"] == {0: [48, 36], 1: [48, 36]}
    for i in range(2):
        np.testing.assert_array_equal(k(model, i, "mlp.up_proj"), k(build(), i, "mlp.up_proj")[:, want[i]])
    soft = build()
    ShrinkMLP(fraction=0.25, score="wanda", soft=True)(soft, Context(tokens=TOKENS, progress=False))
    tokens = TOKENS[:2]
    np.testing.assert_allclose(np.asarray(soft(tokens)), np.asarray(model(tokens)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("step", [RemoveQueryHeads(per_kv_group=1, score="wanda"),
                                  ShrinkHidden(count=8, score="wanda")])
def test_every_group_kind_takes_a_calibrated_score(step):
    model = build()
    step.check(model.config)
    step(model, Context(tokens=TOKENS, progress=False))
    assert np.isfinite(np.asarray(model(TOKENS[:1]))).all()
    assert model.config == step.check(CFG)
