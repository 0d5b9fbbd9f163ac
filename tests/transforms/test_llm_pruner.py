"""The llm_pruner transform: LLM-Pruner's default layer ranges and counts, ranking by the score on
the dense model, soft = hard, GQA-valid query-head removal, earlier masks kept, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.gradients import gradient_pass
from nnxprune.errors import UserError
from nnxprune.graph import find_group, take
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.scoring import get_score, lowest
from nnxprune.transforms import Context, FoldMasks, Pipeline, from_dict
from nnxprune.transforms.coupled import LLMPruner, removed_heads, removed_neurons

DH = 8


def model_and_tokens(num_layers=8, heads=6, kv=2, seed=0):
    cfg = LlamaConfig.uniform(vocab_size=128, hidden_size=32, num_layers=num_layers, num_heads=heads,
                              num_kv_heads=kv, intermediate_size=40, head_dim=DH)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.15)
    return model, np.random.default_rng(seed).integers(0, 128, (4, 16)).astype(np.int32)


def ctx(tokens):
    return Context(tokens=tokens, progress=False)


def test_counts_follow_prune_local():
    assert removed_neurons(1536, 0.34) == 523 and removed_neurons(11008, 0.25) == 2752
    assert removed_heads(32, 128, 0.25) == 8        # LLaMA-7B: 8 of 32 heads
    assert removed_heads(3, 64, 0.25) == 0          # SmolLM2: no KV group at 25%
    assert removed_heads(3, 64, 0.34) == 1


def test_default_ranges_keep_first_four_and_last_two_layers_whole():
    model, tokens = model_and_tokens()
    before = model.config.layers
    step = LLMPruner(ratio=0.5, score="taylor")
    want = step.check(model.config)
    step(model, ctx(tokens))
    assert model.config == want
    for i, (old, new) in enumerate(zip(before, model.config.layers)):
        if 4 <= i < 6:
            assert (new.num_kv_heads, new.num_heads, new.intermediate_size) == (1, 3, 20)
        else:
            assert new == old


@pytest.mark.parametrize("score", ["taylor", "taylor_vector", "taylor_mix", "l2", "random"])
def test_keeps_the_highest_scoring_groups_of_the_dense_model(score):
    model, tokens = model_and_tokens(num_layers=3)
    grads = gradient_pass(model, tokens, second_order=True)
    s = get_score(score)
    want = {}
    for kind, i in [("kv", 1), ("mlp", 1), ("mlp", 2)]:
        g = find_group(model, kind, i)
        want[(kind, i)] = lowest(s(model, g, grads.stats), 1 if kind == "kv" else 20)
    ref_kernel = np.asarray(model.layers[1].mlp.up_proj.kernel[...])
    ref_k = np.asarray(model.layers[1].self_attn.k_proj.kernel[...])
    LLMPruner(ratio=0.5, score=score, attention_start=1, attention_end=2, mlp_start=1,
              mlp_end=3, heads="kv")(model, ctx(tokens))
    np.testing.assert_array_equal(model.layers[1].mlp.up_proj.kernel[...], ref_kernel[:, want[("mlp", 1)]])
    np.testing.assert_array_equal(model.layers[1].self_attn.k_proj.kernel[...],
                                  ref_k[:, want[("kv", 1)][0] * DH:(want[("kv", 1)][0] + 1) * DH])
    assert model.layers[1].self_attn.num_kv_heads == 1 and model.layers[2].mlp.intermediate_size == 20


def test_soft_equals_hard():
    (hard, tokens), (soft, _) = model_and_tokens(), model_and_tokens()
    step = dict(ratio=0.4, score="taylor_element2", heads="q")
    LLMPruner(**step)(hard, ctx(tokens))
    Pipeline(steps=(LLMPruner(soft=True, **step), FoldMasks()))(soft, ctx(tokens))
    assert soft.config == hard.config
    np.testing.assert_allclose(soft(jnp.asarray(tokens)), hard(jnp.asarray(tokens)), atol=1e-5)


def test_query_heads_leave_the_same_number_in_every_kv_group():
    model, tokens = model_and_tokens(num_layers=7, heads=6, kv=2)
    LLMPruner(ratio=0.34, heads="q")(model, ctx(tokens))
    layer = model.config.layers[4]
    assert (layer.num_kv_heads, layer.num_heads) == (2, 4)
    model(jnp.asarray(tokens))  # still a valid GQA model


def test_masks_of_earlier_sparsity_stay_exact():
    model, tokens = model_and_tokens(num_layers=3)
    lin = model.layers[1].mlp.down_proj
    mask = np.random.default_rng(3).random(lin.kernel.shape) > 0.5
    lin.set_mask(mask)
    grads = gradient_pass(model, tokens)
    keep = lowest(get_score("taylor")(model, find_group(model, "mlp", 1), grads.stats), 20)
    LLMPruner(ratio=0.5, attention_start=0, attention_end=0, mlp_start=1, mlp_end=2)(model, ctx(tokens))
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.mask[...]), mask[keep])


def test_from_a_recipe_entry():
    step = from_dict({"kind": "llm_pruner", "ratio": 0.34, "score": "taylor", "heads": "q",
                      "mlp_start": 2, "mlp_end": 5})
    assert isinstance(step, LLMPruner) and step.needs_calibration
    assert not LLMPruner(ratio=0.3, score="l2").needs_calibration


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=0.3, mlp_end=9), r"MLP layer range \[4, 9\) is not inside the model's 8 layers"),
    (dict(ratio=0.3, attention_start=-1), r"attention layer range"),
    (dict(ratio=0.3, attention_start=5, attention_end=3), r"attention layer range"),
    (dict(ratio=0.99, heads="q", attention_end=4), r"removes all 40 MLP neurons"),
    (dict(ratio=0.99), r"removes all 2 KV groups of layer 4"),
    (dict(ratio=0.3), r"removes no KV group in any layer of \[4, 6\)"),
    (dict(ratio=1.0), r"ratio must be in \(0, 1\)"),
    (dict(ratio=0.5, score="taylr"), r"did you mean 'taylor'"),
    (dict(ratio=0.5, heads="o"), r"heads must be one of kv, q"),
    (dict(ratio=0.5, reduction="median"), r"reduction must be one of"),
])
def test_bad_input_fails_in_check(kw, match):
    model, _ = model_and_tokens()
    with pytest.raises(UserError, match=match):
        LLMPruner(**kw).check(model.config)


def test_default_range_of_a_tiny_model_is_checked():
    model, _ = model_and_tokens(num_layers=5)  # [4, 3): empty and inverted
    with pytest.raises(UserError, match=r"range \[4, 3\)"):
        LLMPruner(ratio=0.5).check(model.config)


def test_gradient_score_without_calibration_is_a_user_error():
    model, _ = model_and_tokens()
    with pytest.raises(UserError, match="needs calibration data"):
        LLMPruner(ratio=0.5)(model, Context(progress=False))
    assert model.config.layers[4].intermediate_size == 40  # nothing was touched


def _param_count(cfg) -> int:
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", ["element1", "element2", "vector", "mix", "l2", "random", "element1-lora"])
def test_recipes_remove_about_a_fifth_of_smollm2(name):
    from pathlib import Path

    from nnxprune.recipes import load_recipe

    cfg = LlamaConfig.uniform(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                              num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                              tie_word_embeddings=True)
    path = Path(__file__).resolve().parents[2] / "recipes" / f"llm-pruner-{name}.toml"
    after = load_recipe(path).check(cfg)
    before_n, after_n = _param_count(cfg), _param_count(after)
    assert before_n == 134_515_008
    assert before_n - after_n == 26_998_272  # 20.07%
    assert after.layers[3] == cfg.layers[3] and after.layers[28] == cfg.layers[28]
    assert (after.layers[4].num_heads, after.layers[4].intermediate_size) == (6, 1013)


def test_structured_transforms_rank_by_taylor_through_its_gradient_pass():
    from nnxprune.transforms import ShrinkMLP

    (a, tokens), (b, _) = model_and_tokens(num_layers=3), model_and_tokens(num_layers=3)
    ShrinkMLP(fraction=0.5, layers=(1,), score="taylor")(a, ctx(tokens))
    LLMPruner(ratio=0.5, attention_start=0, attention_end=0, mlp_start=1, mlp_end=2)(b, ctx(tokens))
    np.testing.assert_array_equal(a.layers[1].mlp.down_proj.kernel[...], b.layers[1].mlp.down_proj.kernel[...])


# -- issue 30, item 5: iterative rounds, global ranking, hidden channels ---------------------------
def test_step_counts_follow_the_linear_scheduler():
    from nnxprune.transforms.coupled import step_counts

    assert step_counts(40, 1, 0.5, 1) == [20] and step_counts(40, 1, 0.5, 2) == [10, 10]
    cumulative = [1536 - int(1536 * (1 - s / 3 * 0.34)) for s in (1, 2, 3)]  # 175, 349, 523
    assert step_counts(1536, 1, 0.34, 3) == list(np.diff([0] + cumulative)) == [175, 174, 174]
    assert removed_neurons(1536, 0.34, 3) == removed_neurons(1536, 0.34) == 523
    # heads round down per round: 0 of SmolLM2's 3 KV groups at 17%, then 1 at 34% (one-shot: 1)
    assert step_counts(3, 64, 0.34, 2) == [0, 1] and step_counts(3, 64, 0.34, 1) == [1]
    assert removed_heads(32, 128, 0.25, 4) == 8


def _manual_rounds(model, tokens, counts):
    """Round by round by hand: gradient pass on the current model, drop each group's lowest."""
    for count in counts:
        grads = gradient_pass(model, tokens)
        plan = [(g, lowest(get_score("taylor")(model, g, grads.stats), count))
                for g in (find_group(model, "mlp", i) for i in (1, 2))]
        for g, keep in plan:
            take(model, g, keep)
    return model


def test_iterative_one_round_is_one_shot_and_more_rounds_rescore():
    model, tokens = model_and_tokens(num_layers=3)
    step = dict(ratio=0.5, attention_start=0, attention_end=0, mlp_start=1, mlp_end=3)
    one = nnx.clone(model)
    LLMPruner(iterative_steps=1, **step)(one, ctx(tokens))
    want_one = _manual_rounds(nnx.clone(model), tokens, [20])
    two = nnx.clone(model)
    c = ctx(tokens)
    LLMPruner(iterative_steps=2, **step)(two, c)
    want_two = _manual_rounds(nnx.clone(model), tokens, [10, 10])
    for i in (1, 2):
        for got, want in ((one, want_one), (two, want_two)):
            np.testing.assert_array_equal(got.layers[i].mlp.up_proj.kernel[...],
                                          want.layers[i].mlp.up_proj.kernel[...])
        assert two.layers[i].mlp.intermediate_size == one.layers[i].mlp.intermediate_size == 20
    # the second round ranks on the half-pruned model: it keeps a different set of neurons
    assert any(not np.array_equal(one.layers[i].mlp.up_proj.kernel[...],
                                  two.layers[i].mlp.up_proj.kernel[...]) for i in (1, 2))
    entry = c.report["transforms"][-1]
    assert len(entry["rounds"]) == 2 and entry["kept"]["mlp[1]"] == [40, 20]
    assert entry["rounds"][0]["loss"] != entry["rounds"][1]["loss"]  # two gradient passes


def test_iterative_soft_equals_hard():
    (hard, tokens), (soft, _) = model_and_tokens(), model_and_tokens()
    step = dict(ratio=0.5, score="taylor", heads="q", iterative_steps=3)
    LLMPruner(**step)(hard, ctx(tokens))
    Pipeline(steps=(LLMPruner(soft=True, **step), FoldMasks()))(soft, ctx(tokens))
    assert soft.config == hard.config == LLMPruner(**step).check(model_and_tokens()[0].config)
    np.testing.assert_allclose(soft(jnp.asarray(tokens)), hard(jnp.asarray(tokens)), atol=1e-5)


def test_global_ranking_removes_the_globally_lowest_units():
    model, tokens = model_and_tokens(num_layers=4, heads=4, kv=4)
    dense = nnx.clone(model)
    grads = gradient_pass(dense, tokens)
    groups = [find_group(dense, k, i) for k in ("kv", "mlp") for i in (1, 2)]
    scores = [get_score("taylor")(dense, g, grads.stats) for g in groups]
    flat = np.concatenate(scores)  # brute force: every unit of every group in one list
    n = flat.size - int(flat.size * (1 - 0.3))
    removed = set(np.argsort(flat, kind="stable")[:n].tolist())
    offsets = np.cumsum([0] + [s.size for s in scores])
    want = {(g.kind, g.layer): [j for j in range(g.size) if offsets[k] + j not in removed]
            for k, g in enumerate(groups)}
    assert all(len(v) >= 1 for v in want.values())
    LLMPruner(ratio=0.3, global_pruning=True, attention_start=1, attention_end=3, mlp_start=1,
              mlp_end=3)(model, ctx(tokens))
    for i in (1, 2):
        keep = want[("mlp", i)]
        np.testing.assert_array_equal(model.layers[i].mlp.up_proj.kernel[...],
                                      dense.layers[i].mlp.up_proj.kernel[...][:, keep])
        cols = np.concatenate([np.arange(h * DH, (h + 1) * DH) for h in want[("kv", i)]])
        np.testing.assert_array_equal(model.layers[i].self_attn.k_proj.kernel[...],
                                      dense.layers[i].self_attn.k_proj.kernel[...][:, cols])
    sizes = [len(want[("mlp", i)]) for i in (1, 2)] + [len(want[("kv", i)]) for i in (1, 2)]
    local = [40 - removed_neurons(40, 0.3)] * 2 + [4 - removed_heads(4, DH, 0.3)] * 2
    assert sizes != local  # one ranking across layers: not the per-layer counts
    model(jnp.asarray(tokens))


def test_global_query_heads_stay_gqa_valid_and_soft_equals_hard():
    (hard, tokens), (soft, _) = model_and_tokens(), model_and_tokens()
    step = dict(ratio=0.4, heads="q", global_pruning=True, iterative_steps=2)
    assert LLMPruner(**step).shapes_from_scores
    LLMPruner(**step)(hard, ctx(tokens))
    Pipeline(steps=(LLMPruner(soft=True, **step), FoldMasks()))(soft, ctx(tokens))
    assert soft.config == hard.config
    for shape in hard.config.layers:
        assert shape.num_kv_heads == 2 and shape.num_heads % 2 == 0 and shape.num_heads >= 2
    np.testing.assert_allclose(soft(jnp.asarray(tokens)), hard(jnp.asarray(tokens)), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_channel_mode_removes_hidden_channels_everywhere(tied):
    cfg = LlamaConfig.uniform(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=40, head_dim=DH,
                              tie_word_embeddings=tied)
    make = lambda: randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), seed=0, scale=0.15)  # noqa: E731
    hard, soft = make(), make()
    tokens = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)
    from nnxprune.scoring.taylor import hidden_gradient_pass

    dense = make()
    grads = hidden_gradient_pass(dense, tokens)
    want = lowest(get_score("taylor")(dense, find_group(dense, "embed"), grads.stats), 8)
    step = LLMPruner(ratio=0.25, mode="channel")
    assert step.check(cfg).hidden_size == 24
    step(hard, ctx(tokens))
    assert hard.config.hidden_size == 24
    np.testing.assert_array_equal(hard.embed_tokens.embedding[...],
                                  dense.embed_tokens.embedding[...][:, want])
    np.testing.assert_array_equal(hard.norm.scale[...], dense.norm.scale[...][want])
    for layer, ref in zip(hard.layers, dense.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(getattr(layer, norm).scale[...], getattr(ref, norm).scale[...][want])
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            a, b = (nnx_get(m, lin).kernel[...] for m in (layer, ref))
            np.testing.assert_array_equal(a, b[want])
        for lin in ("self_attn.o_proj", "mlp.down_proj"):
            a, b = (nnx_get(m, lin).kernel[...] for m in (layer, ref))
            np.testing.assert_array_equal(a, b[:, want])
    if not tied:
        np.testing.assert_array_equal(hard.lm_head.kernel[...], dense.lm_head.kernel[...][want])
    Pipeline(steps=(LLMPruner(ratio=0.25, mode="channel", soft=True), FoldMasks()))(soft, ctx(tokens))
    assert soft.config == hard.config
    np.testing.assert_allclose(soft(jnp.asarray(tokens)), hard(jnp.asarray(tokens)), atol=1e-5)


def nnx_get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=0.3, mode="hidden"), r"mode must be one of block, channel"),
    (dict(ratio=0.3, mode="channel", mlp_start=1), r"layer ranges apply to mode = 'block'"),
    (dict(ratio=0.3, iterative_steps=0), r"iterative_steps must be an integer >= 1"),
    (dict(ratio=0.3, global_pruning="yes"), r"global_pruning must be true or false"),
])
def test_new_options_bad_input_fails_in_check(kw, match):
    model, _ = model_and_tokens()
    with pytest.raises(UserError, match=match):
        LLMPruner(**kw).check(model.config)
