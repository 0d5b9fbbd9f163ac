"""Depth (ShortGPT's block influence, Minitron's block search) and width (Minitron) on tiny
models: the layers and channels that go are the ones the scores say, shapes are exactly as asked,
soft edits fold to the hard ones, and bad settings fail before any work."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import graph
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.evaluate.perplexity import token_nll
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig
from nnxprune.scoring import get_score
from nnxprune.transforms import Context, Pipeline, from_dict
from nnxprune.transforms.depth import Depth, block_influences, block_search
from nnxprune.transforms.width import Width

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=5, num_heads=6, num_kv_heads=2,
                          intermediate_size=40, head_dim=8, max_position_embeddings=128)
TOKENS = np.random.default_rng(4).integers(0, 96, (4, 24)).astype(np.int32)


def build(cfg=CFG, seed=0) -> Llama:
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def ctx():
    return Context(tokens=TOKENS, progress=False)


def test_block_influence_drops_the_lowest_layers():
    model = build()
    bi = block_influences(model, TOKENS, progress=False)
    c = ctx()
    Depth(count=2)(model, c)
    drop = sorted(np.argsort(bi)[:2].tolist())
    assert c.report["transforms"][0]["dropped"] == drop
    assert model.config.num_layers == 3
    ref = build()
    graph.drop_layers(ref, drop)
    np.testing.assert_array_equal(model(jnp.asarray(TOKENS)), ref(jnp.asarray(TOKENS)))


def test_block_search_scores_every_contiguous_block_by_perplexity():
    model = build()
    ppl = block_search(model, TOKENS, 2, batch_size=2, progress=False)
    assert len(ppl) == CFG.num_layers - 2 + 1
    for start, value in enumerate(ppl):
        cut = copy.deepcopy(model)
        graph.drop_layers(cut, [start, start + 1])
        expected = float(np.exp(np.mean(np.asarray(token_nll(cut, jnp.asarray(TOKENS))))))
        np.testing.assert_allclose(value, expected, rtol=1e-5)
    c = ctx()
    Depth(count=2, method="block_search", search_samples=4)(model, c)
    best = int(np.argmin(ppl))
    assert c.report["transforms"][0]["dropped"] == [best, best + 1]
    assert model.config.num_layers == 3


@pytest.mark.parametrize("settings, match", [
    (dict(count=0), "positive"),
    (dict(count=5), "at least one must stay"),
    (dict(count=7), "at least one must stay"),
    (dict(count=1, method="block_serch"), "did you mean 'block_search'"),
    (dict(count=1, search_samples=0), "search_samples"),
])
def test_depth_bad_settings_fail_before_work(settings, match):
    with pytest.raises(UserError, match=match):
        Depth(**settings).check(CFG)


def test_width_keeps_the_highest_scoring_channels_with_exact_shapes():
    model = build(CFG.__class__.uniform(**{**_kw(), "tie_word_embeddings": True}))
    dense = copy.deepcopy(model)
    score = get_score("activation")
    stats = collect_statistics(dense, TOKENS, score.collectors(), progress=False)
    Width(hidden=24, intermediate=30, heads=4)(model, ctx())
    cfg = model.config
    assert cfg.hidden_size == 24 and model.embed_tokens.embedding.shape == (96, 24)
    assert all(s == LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=30) for s in cfg.layers)
    hidden = score(dense, graph.find_group(dense, "embed"), stats)
    np.testing.assert_array_equal(model.embed_tokens.embedding[...],
                                  dense.embed_tokens.embedding[...][:, np.sort(np.argsort(hidden)[8:])])
    for i in range(CFG.num_layers):
        mlp = score(dense, graph.find_group(dense, "mlp", i), stats)
        kept = np.sort(np.argsort(mlp)[10:])
        np.testing.assert_array_equal(model.layers[i].mlp.down_proj.kernel[...],
                                      dense.layers[i].mlp.down_proj.kernel[...][kept][:, np.sort(np.argsort(hidden)[8:])])
        heads = score(dense, graph.find_group(dense, "q", i), stats).reshape(2, 3)
        kept_heads = [g * 3 + h for g in range(2) for h in sorted(np.argsort(heads[g])[1:])]
        cols = np.concatenate([np.arange(h * 8, (h + 1) * 8) for h in kept_heads])
        np.testing.assert_array_equal(model.layers[i].self_attn.o_proj.kernel[...][:, :3],
                                      dense.layers[i].self_attn.o_proj.kernel[...][cols][:, np.sort(np.argsort(hidden)[8:])][:, :3])


def _kw():
    return dict(vocab_size=96, hidden_size=32, num_layers=5, num_heads=6, num_kv_heads=2,
                intermediate_size=40, head_dim=8, max_position_embeddings=128)


def test_width_soft_folds_to_the_hard_edit():
    hard, soft = build(), build()
    Width(hidden=24, intermediate=[30, 20, 40, 10, 35], heads=[4, 6, 2, 4, 4])(hard, ctx())
    Width(hidden=24, intermediate=[30, 20, 40, 10, 35], heads=[4, 6, 2, 4, 4], soft=True)(soft, ctx())
    np.testing.assert_allclose(soft(jnp.asarray(TOKENS)), hard(jnp.asarray(TOKENS)), atol=1e-5, rtol=1e-5)
    graph.fold_masks(soft)
    assert soft.config == hard.config
    assert [s.intermediate_size for s in hard.config.layers] == [30, 20, 40, 10, 35]
    assert [s.num_heads for s in hard.config.layers] == [4, 6, 2, 4, 4]
    np.testing.assert_allclose(soft(jnp.asarray(TOKENS)), hard(jnp.asarray(TOKENS)), atol=1e-5, rtol=1e-5)


def test_width_kv_heads_option_removes_whole_groups_first():
    model = build()
    dense = copy.deepcopy(model)
    score = get_score("activation")
    stats = collect_statistics(dense, TOKENS, score.collectors(), progress=False)
    Width(kv_heads=1, heads=2)(model, ctx())
    assert all(s.num_kv_heads == 1 and s.num_heads == 2 for s in model.config.layers)
    kv = score(dense, graph.find_group(dense, "kv", 0), stats)
    q = score(dense, graph.find_group(dense, "q", 0), stats)
    g = int(np.argmax(kv))
    heads = sorted(g * 3 + np.argsort(q[g * 3:(g + 1) * 3])[1:])
    cols = np.concatenate([np.arange(h * 8, (h + 1) * 8) for h in heads])
    np.testing.assert_array_equal(model.layers[0].self_attn.o_proj.kernel[...],
                                  dense.layers[0].self_attn.o_proj.kernel[...][cols])


@pytest.mark.parametrize("settings, match", [
    (dict(hidden=40), r"hidden must be in \[1, 32\]"),
    (dict(intermediate=41), "intermediate of layer 0"),
    (dict(heads=5), "do not divide over 2 KV groups"),
    (dict(heads=8), "heads of layer 0 must be in"),
    (dict(kv_heads=3), "kv_heads of layer 0"),
    (dict(intermediate=[10, 10]), "2 values for 5 layers"),
    (dict(hidden=16, score="activaton"), "did you mean 'activation'"),
    (dict(hidden=16, score="block_influence"), "ranks layer groups"),
    (dict(), "at least one of"),
    (dict(kv_heads=1, soft=True), "soft edits do not remove KV groups"),
])
def test_width_bad_settings_fail_before_work(settings, match):
    with pytest.raises(UserError, match=match):
        Width(**settings).check(CFG)


def test_depth_then_width_then_wanda_compose_from_a_recipe():
    steps = [{"kind": "depth", "count": 2}, {"kind": "width", "hidden": 24, "heads": 4,
                                              "intermediate": 24},
             {"kind": "wanda", "pattern": "2:4"}]
    pipe = Pipeline(steps=tuple(from_dict(s) for s in steps))
    predicted = pipe.check(CFG)
    model = pipe(build(), ctx())
    assert model.config == predicted
    assert model.config.num_layers == 3 and model.config.hidden_size == 24
    kernel = np.asarray(model.layers[0].mlp.up_proj.effective_kernel())
    assert np.mean(kernel == 0) == pytest.approx(0.5)


@pytest.mark.parametrize("name, layers, hidden, shape", [
    ("shortgpt", 22, 576, (9, 3, 1536)), ("minitron-depth", 22, 576, (9, 3, 1536)),
    ("minitron-width", 30, 448, (6, 3, 1024)), ("shortgpt-distill", 22, 576, (9, 3, 1536)),
    ("minitron-depth-distill", 22, 576, (9, 3, 1536)),
    ("minitron-width-distill", 30, 448, (6, 3, 1024)),
    ("shortgpt-wanda-2of4-distill", 22, 576, (9, 3, 1536)),
])
def test_structured_recipes_predict_the_asked_shapes_for_smollm2(name, layers, hidden, shape):
    from pathlib import Path

    from nnxprune.recipes import load_recipe

    smollm2 = LlamaConfig.uniform(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                  num_kv_heads=3, intermediate_size=1536, head_dim=64,
                                  max_position_embeddings=8192, tie_word_embeddings=True)
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / f"{name}.toml")
    predicted = recipe.check(smollm2)
    assert predicted.num_layers == layers and predicted.hidden_size == hidden
    assert set(predicted.layers) == {LayerShape(num_heads=shape[0], num_kv_heads=shape[1],
                                                intermediate_size=shape[2])}
    assert (recipe.recovery is not None) == name.endswith("-distill")
    if recipe.recovery is not None:
        d = recipe.recovery.distill
        assert (recipe.recovery.kind, d.temperature, d.kd_weight, d.ce_weight) == ("distill", 1.0, 1.0, 0.0)
