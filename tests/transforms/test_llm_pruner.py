"""The llm_pruner transform: LLM-Pruner's default layer ranges and counts, ranking by the score on
the dense model, soft = hard, GQA-valid query-head removal, earlier masks kept, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.gradients import gradient_pass
from nnxprune.errors import UserError
from nnxprune.graph import find_group
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
