"""bf16 weights done right, and masked kernels made one layer at a time.

- A bf16 `Linear` multiplies with float32 accumulation and gives float32; a float32 one is the
  plain float32 dot, bit for bit as before.
- The residual stream of a bf16 model is float32 (the embedding rows are widened exactly).
- XLA's own accounting (`memory_analysis`) of the compiled programs: the whole-model scorer of a
  bf16 model makes no float32 copy of its weights; a pruned model's whole-model program holds a
  masked copy of every kernel at once, while the per-layer program the evaluators run holds none.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.evaluate.layerwise import _layer_forward, folded
from nnxprune.evaluate.perplexity import compile_scorer
from nnxprune.layers import Embed, Linear, matmul
from nnxprune.models.llama import Llama, LlamaConfig

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _cfg():
    return LlamaConfig.uniform(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                               num_kv_heads=2, intermediate_size=512, head_dim=32)


def _projections(layer):
    for name in PROJECTIONS:
        node = layer
        for part in name.split("."):
            node = getattr(node, part)
        yield node


def _kernel_bytes(model, itemsize: int) -> int:
    return sum(lin.kernel.size * itemsize for layer in model.layers for lin in _projections(layer))


def test_float32_linear_is_the_plain_dot_bit_for_bit():
    lin = Linear(64, 96, in_space="embed", out_space="mlp", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 64))
    out = jax.jit(lambda x: lin(x))(x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(jnp.dot)(x, lin.kernel[...])))


def test_bfloat16_linear_accumulates_in_float32():
    lin = Linear(256, 64, in_space="embed", out_space="mlp", param_dtype=jnp.bfloat16,
                 rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 256))
    out = lin(x)
    assert out.dtype == jnp.float32
    # the exact product of the bf16-rounded operands, summed in float64
    want = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(lin.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    # a bf16 result (bf16 accumulation or rounding) is 100x further off than float32 accumulation
    bf16 = np.asarray(jnp.dot(x.astype(jnp.bfloat16), lin.kernel[...]), np.float64)
    assert np.abs(bf16 - want).max() > 30 * np.abs(np.asarray(out) - want).max()
    lin.set_mask(np.arange(256 * 64).reshape(256, 64) % 3 > 0)
    masked = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(
        lin.effective_kernel(), np.float64)
    np.testing.assert_allclose(np.asarray(lin(x)), masked, rtol=1e-5, atol=1e-5)
    assert matmul(x, lin.kernel[...]).dtype == jnp.float32


def test_bfloat16_embedding_rows_are_widened_exactly():
    embed = Embed(32, 8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rows = embed(jnp.array([[3, 5]]))
    assert rows.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(rows[0]),
                                  np.asarray(embed.embedding[...][jnp.array([3, 5])], np.float32))


def test_bfloat16_model_keeps_a_float32_residual_stream():
    cfg = _cfg()
    fp32 = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.05)
    bf16 = Llama(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(fp32, nnx.Param)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)))
    h, _ = bf16.hidden_states(tokens)
    assert h.dtype == jnp.float32
    a, b = np.asarray(fp32(tokens)), np.asarray(bf16(tokens))
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_bfloat16_scorer_makes_no_float32_copy_of_the_weights():
    model = Llama(_cfg(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    compiled, _ = compile_scorer(model, 1, 64)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < _kernel_bytes(model, 2) / 2, (temp, _kernel_bytes(model, 2))


def test_masked_kernels_exist_one_layer_at_a_time():
    model = Llama(_cfg(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        for lin in _projections(layer):
            lin.set_mask(rng.random(lin.kernel.shape) < 0.5)
    whole = compile_scorer(model, 1, 64)[0].memory_analysis().temp_size_in_bytes
    assert whole >= _kernel_bytes(model, 4)  # why the evaluators run layer by layer
    graphdef, state = nnx.split(folded(model.layers[0]))
    rope = (32, 10000.0, None)
    x = jax.ShapeDtypeStruct((1, 64, 128), jnp.float32)
    per_layer = _layer_forward.trace(graphdef, rope, state, x).lower().compile()
    one_layer = _kernel_bytes(model, 4) // len(model.layers)
    assert per_layer.memory_analysis().temp_size_in_bytes < one_layer  # not even one layer's


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_folded_layer_is_a_view(dtype):
    model = Llama(_cfg(), param_dtype=dtype, rngs=nnx.Rngs(0))
    lin = model.layers[0].mlp.up_proj
    lin.set_mask(np.arange(lin.kernel.size).reshape(lin.kernel.shape) % 2 == 0)
    view = folded(model.layers[0])
    assert view.mlp.up_proj.mask is None and lin.mask is not None
    np.testing.assert_array_equal(np.asarray(view.mlp.up_proj.kernel[...]),
                                  np.asarray(lin.effective_kernel()))
    assert view.mlp.up_proj.kernel.dtype == dtype
    assert view.mlp.down_proj.kernel[...] is model.layers[0].mlp.down_proj.kernel[...]
