"""The sequential driver's collectors against hand computations on a tiny model: what `visit`
receives (inputs, unpruned outputs, statistics), which layers are visited, and every collector's
formula (Wanda's sums of squares, Minitron's activation aggregate, ShortGPT's block influence,
stacked activations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.collectors import (Activations, BlockInfluence, ChannelMeanAbs,
                                             InputSumSq, InputXtX)
from nnxprune.calibration.sequential import collect_statistics, run_sequential
from nnxprune.models.llama import Llama, LlamaConfig, default_positions

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, head_dim=8, max_position_embeddings=128)
TOKENS = np.random.default_rng(1).integers(0, 96, (6, 80)).astype(np.int32)  # 80 > ATTN_BLOCK


def build() -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=0, scale=0.3)


def hand_io(model, i):
    """Layer i's input and output `[N, T, D]`, and the inputs of its o_proj and down_proj and the
    outputs of its two norms, all `[N, T, C]`, computed without the driver."""
    tokens = jnp.asarray(TOKENS)
    positions = default_positions(tokens)
    x = model.embed_tokens(tokens)
    for layer in model.layers[:i]:
        x = layer(x, positions, model.inv_freq)[0]
    layer = model.layers[i]
    n1 = layer.input_layernorm(x)
    q, k, v = layer.self_attn.project(n1, positions, model.inv_freq)
    from nnxprune.models.attention import masked_attention

    o_in = masked_attention(q, k, v, positions, positions).reshape(*x.shape[:2], -1)
    h = x + layer.self_attn.o_proj(o_in)
    n2 = layer.post_attention_layernorm(h)
    down_in = jax.nn.silu(layer.mlp.gate_proj(n2)) * layer.mlp.up_proj(n2)
    out = h + layer.mlp.down_proj(down_in)
    taps = {"self_attn.o_proj": o_in, "mlp.down_proj": down_in, "input_layernorm": n1,
            "post_attention_layernorm": n2, "mlp.gate_proj": n2}
    return np.asarray(x), np.asarray(out), {k: np.asarray(v, np.float64) for k, v in taps.items()}


def test_visit_gets_inputs_outputs_and_statistics():
    model = build()
    names = ("self_attn.o_proj", "mlp.down_proj")
    collectors = [InputSumSq(names=names), ChannelMeanAbs(names=names + ("input_layernorm",
                                                                          "post_attention_layernorm")),
                  BlockInfluence(), Activations(names=("mlp.gate_proj",))]
    seen = {}
    run_sequential(model, TOKENS, lambda i, layer, c: seen.setdefault(i, c), collectors,
                   batch_size=4, progress=False)  # 4 does not divide 6: batches of 3
    assert sorted(seen) == [0, 1, 2]
    for i, calib in seen.items():
        x, out, taps = hand_io(model, i)
        assert calib.sequences == 6 and calib.tokens == 6 * 80
        np.testing.assert_allclose(np.asarray(calib.inputs), x, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(calib.outputs), out, rtol=1e-4, atol=1e-4)
        for n in names:
            np.testing.assert_allclose(np.asarray(calib.stats["sumsq"][n]),
                                       (taps[n] ** 2).sum(axis=(0, 1)), rtol=1e-4)
        for n, value in calib.stats["mean_abs"].items():  # ModelOpt's aggregation
            want = np.sqrt((np.abs(taps[n]).mean(axis=1) ** 2).sum(axis=0))
            np.testing.assert_allclose(np.asarray(value), want, rtol=1e-4)
        a, b = x.reshape(-1, 32).astype(np.float64), out.reshape(-1, 32).astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert calib.stats["block_influence"] == pytest.approx(1 - cos.mean(), abs=1e-5)
        np.testing.assert_allclose(np.asarray(calib.stats["activations"]["mlp.gate_proj"]),
                                   taps["mlp.gate_proj"].reshape(-1, 32), rtol=1e-4, atol=1e-5)


def test_only_layers_with_an_active_collector_are_visited_and_outputs_only_when_asked():
    model = build()
    seen = {}
    run_sequential(model, TOKENS, lambda i, layer, c: seen.setdefault(i, c),
                   [InputXtX.for_layers({1: ["mlp.up_proj"]})], progress=False)
    assert list(seen) == [1] and seen[1].outputs is None
    assert list(seen[1].stats["xtx"]) == ["mlp.up_proj"]
    stats = collect_statistics(model, TOKENS, [BlockInfluence(layers=(0, 2))], progress=False)
    assert sorted(stats) == [0, 2]


def test_two_collectors_of_one_kind_are_refused():
    with pytest.raises(ValueError, match="two collectors"):
        run_sequential(build(), TOKENS, lambda *a: None,
                       [InputSumSq(names=("mlp.up_proj",)), InputSumSq(names=("mlp.down_proj",))],
                       progress=False)


def test_a_module_that_cannot_be_tapped_is_refused():
    with pytest.raises(ValueError, match="cannot record"):
        run_sequential(build(), TOKENS, lambda *a: None, [InputSumSq(names=("self_attn",))],
                       progress=False)


def test_statistics_without_edits_run_one_forward_and_match_the_two_forward_driver():
    """`collect_statistics` feeds the statistics forward's outputs to the next layer (one forward
    per layer); the statistics equal those of the driver that reruns every layer, and the second
    forward does not run at all."""
    model = build()
    collectors = [ChannelMeanAbs(names=("mlp.down_proj", "input_layernorm")),
                  BlockInfluence(layers=(0, 1)), InputSumSq.for_layers({2: ["self_attn.o_proj"]})]
    fast = collect_statistics(model, TOKENS, collectors, progress=False, batch_size=3)
    slow = {}
    timings = run_sequential(model, TOKENS, lambda i, layer, c: slow.setdefault(i, c.stats),
                             collectors, progress=False, batch_size=3)
    assert timings["forward_pruned"] > 0
    assert sorted(fast) == sorted(slow) == [0, 1, 2]
    for i in fast:
        for name in fast[i]:
            for a, b in zip(jax.tree.leaves(fast[i][name]), jax.tree.leaves(slow[i][name]),
                            strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    once = run_sequential(model, TOKENS, lambda *a: None, collectors, progress=False,
                          batch_size=3, edits=False)
    assert once["forward_pruned"] == 0
