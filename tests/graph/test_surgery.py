"""Groups from channel spaces; soft edits equal hard edits for every group kind."""

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.algorithms.masks import nm_keep, parse_nm, unstructured_keep
from nnxprune.errors import UserError
from nnxprune.graph import (drop_layers, find_group, fold_masks, groups, mask_group, mask_weights,
                            take)
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig

LAYERS = (LayerShape(num_heads=6, num_kv_heads=2, intermediate_size=40),
          LayerShape(num_heads=4, num_kv_heads=4, intermediate_size=24),
          LayerShape(num_heads=6, num_kv_heads=3, intermediate_size=32))


def build(tie: bool, seed: int = 0) -> Llama:
    cfg = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=8, head_dim=8,
                              tie_word_embeddings=tie, max_position_embeddings=64)
    cfg = dataclasses.replace(cfg, layers=LAYERS)
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.2)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 20)), jnp.int32)


def logits(model):
    return np.asarray(model(TOKENS))


def random_keep(group, rng):
    if group.kind == "q":  # same number of heads in every KV group
        per = group.size // group.blocks
        k = rng.integers(1, per)  # remove at least one head per group
        return [b * per + j for b in range(group.blocks) for j in rng.choice(per, k, replace=False)]
    low = 1 if group.kind in ("embed", "kv") else 0
    k = rng.integers(low, group.size) if group.size > 1 else 0
    return rng.choice(group.size, k, replace=False).tolist()


# -- groups ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_groups_follow_the_shapes(tie):
    model = build(tie)
    gs = groups(model)
    names = [g.name for g in gs]
    assert names[0] == "embed"
    assert names[1:] == [f"{k}[{i}]" for i in range(3) for k in ("kv", "q", "mlp", "layer")]
    embed = gs[0]
    assert embed.size == 32
    # embedding + 2 norms per layer + final norm; q/k/v/gate/up inputs and o/down outputs; lm_head
    assert len(embed.members) == 1 + 3 * 2 + 1 + 3 * 7 + (0 if tie else 1)
    for i, shape in enumerate(LAYERS):
        assert find_group(model, "kv", i).size == shape.num_kv_heads
        assert find_group(model, "q", i).size == shape.num_heads
        assert find_group(model, "q", i).blocks == shape.num_kv_heads
        assert find_group(model, "mlp", i).size == shape.intermediate_size
    kv0 = find_group(model, "kv", 0)
    text = str(kv0)
    assert "layers.0.self_attn.q_proj.kernel" in text and "3 query heads" in text
    assert "layers.0.self_attn.o_proj.kernel" in text and "axis 0" in text
    assert {m.unit for m in kv0.members} == {8, 24}


def test_find_group_errors():
    model = build(False)
    with pytest.raises(UserError, match="unknown group kind 'mpl'"):
        find_group(model, "mpl", 0)
    with pytest.raises(UserError, match=r"layer index in \[0, 3\)"):
        find_group(model, "mlp", 3)


# -- soft == hard ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind, layer", [("embed", None), ("mlp", 0), ("mlp", 2), ("kv", 0),
                                         ("kv", 2), ("q", 0), ("q", 2), ("layer", 1)])
def test_soft_edit_equals_hard_edit(tie, kind, layer):
    """The central invariant, property-style: for several random keep sets of the group."""
    for draw in range(4):
        rng = np.random.default_rng(zlib.crc32(f"{kind}{layer}{draw}".encode()))
        soft, hard = build(tie), build(tie)
        dense = logits(soft)
        group = find_group(soft, kind, layer)
        keep = random_keep(group, rng) if kind != "layer" else []
        mask_group(soft, group, keep)
        take(hard, group, keep)
        out_soft, out_hard = logits(soft), logits(hard)
        assert np.abs(out_soft - dense).max() > 1e-3  # the edit really changed the model
        np.testing.assert_allclose(out_hard, out_soft, atol=1e-5, rtol=0)
        # the hard model's config follows its shapes
        if kind == "embed":
            assert hard.config.hidden_size == len(set(keep))
        elif kind == "layer":
            assert hard.config.num_layers == 2
        else:
            assert find_group(hard, kind, layer).size == len(set(keep))


def test_hard_edits_compose_into_a_heterogeneous_model():
    model = build(False)
    ref = build(False)
    take(model, find_group(model, "q", 0), [0, 2, 3, 5])  # 2 of 3 heads in each of 2 KV groups
    take(model, find_group(model, "kv", 2), [0, 2])
    take(model, find_group(model, "mlp", 1), range(0, 24, 3))
    drop_layers(model, [1])
    mask_group(ref, find_group(ref, "q", 0), [0, 2, 3, 5])
    mask_group(ref, find_group(ref, "kv", 2), [0, 2])
    mask_group(ref, find_group(ref, "mlp", 1), range(0, 24, 3))
    mask_group(ref, find_group(ref, "layer", 1), [])
    assert model.config.layers == (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=40),
                                   LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=32))
    np.testing.assert_allclose(logits(model), logits(ref), atol=2e-5, rtol=0)


def test_q_heads_must_stay_balanced_across_kv_groups():
    model = build(False)
    with pytest.raises(UserError, match=r"same number of query heads.*\[2, 1\]"):
        take(model, find_group(model, "q", 0), [0, 1, 3])


@pytest.mark.parametrize("kind, keep, match", [
    ("mlp", [40], r"\[0, 40\)"), ("kv", [], "at least 1"), ("embed", [], "at least 1")])
def test_bad_keep_sets(kind, keep, match):
    model = build(False)
    with pytest.raises(UserError, match=match):
        take(model, find_group(model, kind, 0 if kind != "embed" else None), keep)


def test_drop_layers_out_of_range():
    with pytest.raises(UserError, match=r"\[5\] out of range: the model has 3 layers"):
        drop_layers(build(False), [0, 5])


# -- weight masks, folding -------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:4", "1:8"])
def test_nm_masks_are_exact(pattern):
    n, m = parse_nm(pattern)
    model = build(False)
    lin = model.layers[0].mlp.down_proj  # [40, 32]
    mask_weights(lin, nm_keep(jnp.abs(lin.kernel[...]), n, m))
    kept = np.asarray(lin.effective_kernel() != 0).reshape(40 // m, m, 32).sum(axis=1)
    assert (kept == m - n).all()
    # the pruned entries are the smallest of their block
    k = np.abs(np.asarray(lin.kernel[...])).reshape(40 // m, m, 32)
    keep = np.asarray(lin.mask[...]).reshape(40 // m, m, 32)
    assert (np.where(keep, k, np.inf).min(axis=1) >= np.where(keep, -np.inf, k).max(axis=1)).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_sparsity_exactly_as_asked(sparsity):
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((64, 48)))
    keep = np.asarray(unstructured_keep(scores, sparsity))
    assert (~keep).sum() == int(64 * 48 * sparsity)
    per = np.asarray(unstructured_keep(scores, sparsity, per_output=True))
    assert ((~per).sum(axis=0) == int(64 * sparsity)).all()


@pytest.mark.parametrize("bad", ["2-4", "4:4", "0:4", "5:4", "a:b"])
def test_bad_nm_patterns(bad):
    with pytest.raises(ValueError):  # pure algorithms raise ValueError; transforms turn it into UserError
        parse_nm(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unstructured_keep(jnp.ones((4, 4)), bad)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fold_masks_keeps_outputs_and_removes_masks(tie):
    model = build(tie)
    lin = model.layers[2].self_attn.q_proj
    mask_weights(lin, unstructured_keep(jnp.abs(lin.kernel[...]), 0.5))
    mask_group(model, find_group(model, "embed"), range(0, 32, 2))
    mask_group(model, find_group(model, "mlp", 1), range(10))
    before = logits(model)
    expected_zeros = int((~np.asarray(lin.mask[...]))[::2].sum())  # rows of the kept channels
    fold_masks(model)
    assert all(getattr(node, "mask", None) is None for _, node in nnx.iter_modules(model))
    assert model.config.hidden_size == 16
    assert int((model.layers[2].self_attn.q_proj.kernel[...] == 0).sum()) == expected_zeros
    np.testing.assert_allclose(logits(model), before, atol=2e-5, rtol=0)


def test_partial_channel_masks_refuse_to_fold():
    model = build(False)
    model.norm.set_mask(np.arange(32) < 16)
    with pytest.raises(UserError, match="differ"):
        fold_masks(model)


def test_checkpoint_keeps_channel_masks(tmp_path):
    from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint

    model = build(True)
    mask_group(model, find_group(model, "embed"), range(0, 32, 3))
    take(model, find_group(model, "q", 2), [0, 2, 4])
    save_checkpoint(model, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    assert back.config == model.config
    np.testing.assert_array_equal(np.asarray(back.norm.mask[...]), np.asarray(model.norm.mask[...]))
    np.testing.assert_allclose(logits(back), logits(model), atol=1e-6, rtol=0)
