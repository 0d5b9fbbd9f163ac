"""Llama decoder: parity with Hugging Face, shape-derived config, surgery, KV cache, masks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.models.llama import (
    LayerShape,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    init_cache,
    rope_inv_freq,
)

B, T = 2, 48
LLAMA3 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=32)
HETERO_LAYERS = (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=128),
                 LayerShape(num_heads=2, num_kv_heads=1, intermediate_size=96))


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16, max_position_embeddings=128)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


def hetero(**kwargs) -> LlamaConfig:
    return dataclasses.replace(tiny(**kwargs), layers=HETERO_LAYERS)


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed)


def tokens(seed: int = 0, shape=(B, T)) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


def positions_for(toks) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)


# -- parity with Hugging Face --------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["rope-default", "rope-llama3"])
@pytest.mark.parametrize("length", [T, 300], ids=["short", "blocked-attention"])
def test_parity_with_transformers(tmp_path, tie, scaling, length):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nnxprune.io.hf import export_hf

    cfg = tiny(tie_word_embeddings=tie, rope_scaling=scaling,
               rope_theta=10000.0 if scaling else 50000.0, max_position_embeddings=512)
    model = build(cfg)
    export_hf(model, tmp_path / "hf")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ref_model.eval()
    assert ref_model.config.tie_word_embeddings == tie

    toks = tokens(1, (B, length))
    with torch.no_grad():
        ref = ref_model(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.numpy()
    out = np.asarray(model(toks))
    assert out.shape == (B, length, 256)
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_llama3_scaling_changes_logits():
    """Guards the parity test: scaled and plain RoPE must differ at these lengths."""
    plain, scaled = tiny(), tiny(rope_scaling=LLAMA3)
    inv_plain = np.asarray(rope_inv_freq(16, 10000.0, None))
    inv_scaled = np.asarray(rope_inv_freq(16, 10000.0, LLAMA3))
    # All three regimes occur: high frequencies kept, low ones divided by the factor, some smoothed.
    ratio = inv_scaled / inv_plain
    assert np.isclose(ratio[0], 1.0)
    assert np.isclose(ratio[-1], 1 / 8)
    assert np.any((ratio < 0.99) & (ratio > 1 / 8 + 1e-3))
    m1, m2 = build(plain), build(scaled)
    toks = tokens(2)
    assert np.abs(np.asarray(m1(toks)) - np.asarray(m2(toks))).max() > 1e-2


# -- config is read back from shapes -------------------------------------------------------------
def test_config_tracks_layer_deletion():
    model = Llama(tiny(), rngs=nnx.Rngs(0))
    assert model.config.num_layers == 2
    assert model.config == tiny()
    del model.layers[0]
    assert model.config.num_layers == 1
    assert model.config.layers == (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=128),)
    logits = model(tokens(0, (1, 8)))
    assert logits.shape == (1, 8, 256)


def test_heterogeneous_config_builds_and_runs():
    cfg = hetero()
    assert not cfg.is_uniform
    model = build(cfg)
    assert model.config.layers == HETERO_LAYERS
    assert model.config == cfg
    attn1 = model.layers[1].self_attn
    assert (attn1.num_heads, attn1.num_kv_heads) == (2, 1)
    assert model.layers[1].mlp.down_proj.kernel.shape == (96, 64)
    logits = np.asarray(model(tokens(3)))
    assert logits.shape == (B, T, 256)
    assert np.all(np.isfinite(logits))
    assert logits.std() > 0.1


def test_uneven_gqa_groups_rejected():
    cfg = dataclasses.replace(tiny(), layers=(LayerShape(num_heads=3, num_kv_heads=2, intermediate_size=8),))
    with pytest.raises(ValueError):
        Llama(cfg, rngs=nnx.Rngs(0))


# -- layer removal ---------------------------------------------------------------------------------
def test_removing_a_layer_equals_running_the_remaining_layers():
    model = build(tiny(num_layers=3))
    toks = tokens(4)
    pos = positions_for(toks)
    x = model.embed_tokens(toks)
    for layer in (model.layers[0], model.layers[2]):
        x, cache = layer(x, pos, model.inv_freq)
        assert cache is None
    expected = np.asarray(model.logits(model.norm(x)))
    full = np.asarray(model(toks))

    del model.layers[1]
    assert model.config.num_layers == 2
    out = np.asarray(model(toks))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert np.abs(out - full).max() > 1e-2  # the deleted layer did matter


# -- KV cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_cfg", [tiny, hetero, lambda: tiny(rope_scaling=LLAMA3)],
                         ids=["uniform", "heterogeneous", "llama3-rope"])
def test_kv_cache_prefill_then_decode_matches_full_forward(make_cfg):
    model = build(make_cfg())
    n = 24
    toks = tokens(5, (B, n))
    full_h, none_cache = model.hidden_states(toks)
    assert none_cache is None
    full_logits = np.asarray(model.logits(full_h))

    cache = init_cache(model, B, n)
    assert [c[0].shape for c in cache] == [(B, n, l.num_kv_heads, 16) for l in model.config.layers]
    prefill = 10
    h, cache = model.hidden_states(toks[:, :prefill], positions_for(toks[:, :prefill]), cache)
    steps = [h]
    for t in range(prefill, n):
        h, cache = model.hidden_states(toks[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache)
        steps.append(h)
    cached_h = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached_h), np.asarray(full_h), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.logits(cached_h)), full_logits, atol=1e-4, rtol=0)
    # The cache really holds keys for every position now.
    assert np.all(np.abs(np.asarray(cache[0][0])).sum(axis=(2, 3)) > 0)


@pytest.mark.parametrize("length,leaf", [(300, 128), (129, 128), (1024, 128), (300, 32), (700, 64)])
def test_blocked_attention_equals_full_attention(monkeypatch, length, leaf):
    """The cache-free path cuts the causal triangle into unmasked rectangles and masked diagonal
    tiles; ragged lengths (300 = 2 x 128 + 44; 129; 700 with 64-position tiles) and deep splits
    (32-position tiles) must give what one full masked score matrix gives."""
    from nnxprune.models import attention

    monkeypatch.setattr(attention, "ATTN_LEAF", leaf)
    assert length > attention.ATTN_BLOCK
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, length, 2, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, length, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, length, 2, 16)), jnp.float32)
    pos = positions_for(jnp.zeros((2, length)))
    full = attention.masked_attention(q, k, v, pos, pos)
    blocked = attention.causal_attention(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5, rtol=0)


# -- causality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 20, 47])
def test_causal_mask(t):
    model = build(tiny())
    toks = tokens(6)
    changed = toks.at[:, t].set((toks[:, t] + 17) % 256)
    a, b = np.asarray(model(toks)), np.asarray(model(changed))
    np.testing.assert_allclose(b[:, :t], a[:, :t], atol=1e-5, rtol=0)
    assert np.abs(b[:, t] - a[:, t]).max() > 1e-2


# -- masks -----------------------------------------------------------------------------------------
def test_mask_equals_zeroed_kernel():
    model = build(tiny())
    twin = nnx.clone(model)
    q = model.layers[0].self_attn.q_proj
    mask = np.random.default_rng(7).random(q.kernel.shape) > 0.3
    assert 0 < (~mask).sum()
    q.set_mask(mask)
    twin_q = twin.layers[0].self_attn.q_proj
    twin_q.kernel[...] = jnp.where(mask, twin_q.kernel[...], 0.0)
    assert twin_q.mask is None

    toks = tokens(8)
    masked, zeroed = np.asarray(model(toks)), np.asarray(twin(toks))
    np.testing.assert_allclose(masked, zeroed, atol=1e-5, rtol=0)
    # The mask changed the model (compared with the unmasked original weights).
    q.set_mask(np.ones(q.kernel.shape, bool))
    assert np.abs(np.asarray(model(toks)) - masked).max() > 1e-2


def test_run_layers_keeps_layer_outputs_and_takes_an_attention_kernel(tiny_config, randomize):
    """The one layer loop: `keep` hands back the outputs of the layers asked for (each equal to
    running that many layers by hand), and an injected attention kernel replaces the default
    one in every layer (the masked kernel gives the blocked kernel's result; a kernel that
    attends nowhere changes the output)."""
    from nnxprune.models import attention
    from nnxprune.models.llama import default_positions

    model = randomize(Llama(tiny_config, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 100)))
    positions = default_positions(tokens)
    x = model.embed_tokens(tokens)
    out = model.run_layers(x, positions, keep=(0,))
    assert set(out.hidden) == {0} and out.cache is None
    by_hand = model.layers[0](x, positions, model.inv_freq)[0]
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(by_hand))
    masked = model.run_layers(x, positions, attention_fn=attention.masked_attention)
    np.testing.assert_allclose(np.asarray(masked.x), np.asarray(out.x), rtol=1e-4, atol=1e-4)
    calls = []

    def zero(q, keys, values, q_pos, k_pos):
        calls.append(q.shape)
        return jnp.zeros_like(q)

    zeroed = model.run_layers(x, positions, attention_fn=zero)
    assert len(calls) == tiny_config.num_layers
    assert not np.allclose(np.asarray(zeroed.x), np.asarray(out.x))
