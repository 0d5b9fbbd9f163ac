"""Sheared LLaMA's gates on a Llama: the soft forward with `z`, and the fold to the target shapes.

The soft forward follows the reference's `composer_llama.py` (princeton-nlp/LLM-Shearing):
- the embedding output is multiplied by `hidden_z`;
- each query head's attention output by `head_z` before `o_proj` (the reference passes `head_z`
  into its attention function), the `o_proj` output by `layer_z` and `hidden_z`;
- each MLP neuron (`up_proj` output) by `intermediate_z`, the `down_proj` output by `layer_z`
  and `hidden_z`;
- every RMSNorm takes its mean square over the channels with `hidden_z != 0` only, and its output
  is multiplied by `hidden_z` (`LlamaRMSNorm.forward`); the boolean-masked `layers.RMSNorm` does
  the same with a 0/1 mask.
The decoder stack runs through `Llama.run_layers` with a `layer_call` that applies the gates, so
the model object is untouched and its parameters are the ones trained.

The fold (`fold`) takes deterministic gates (`L0Module.deterministic`: the target number of
nonzero gates per row, kept at their soft values) and bakes them into the weights, then removes
the zero-gated structures with the graph's hard edits (`take`, `drop_layers`), giving exactly the
target shapes. Soft with those gates and folded give the same logits (tested):
- `head_z` scales the head's `o_proj` input rows (the reference scales `v_proj`, which a GQA
  model shares between query heads), `layer_z * hidden_z` the `o_proj` and `down_proj` output
  columns, `intermediate_z` the `up_proj` output columns, `hidden_z` the embedding columns and
  every norm scale;
- the final norm: the reference folds `hidden_z` into both the final norm and the output head,
  so its pruned model sees `hidden_z^2` there (its comment: "def a bug in llama"). We fold it
  once: into the final norm when the head is untied, into the shared embedding when it is tied
  (which then carries it for both the input and the output).

Example:
    >>> logits = masked_logits(model, l0.sample(key), tokens)     # training forward
    >>> fold(model, l0.deterministic(), l0.plan)                  # model now has target shapes
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nnxprune import graph
from nnxprune.models.attention import ATTN_BLOCK, causal_attention, masked_attention
from nnxprune.models.llama import default_positions


def _norm(norm, x: jax.Array, hidden_z: jax.Array | None) -> jax.Array:
    """`norm(x)` with the mean square over the channels whose gate is nonzero, times the gate."""
    if hidden_z is None:
        return norm(x)
    keep = hidden_z != 0
    x32 = jnp.where(keep, x.astype(jnp.float32), 0.0)
    mean_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True) / jnp.maximum(keep.sum(), 1)
    out = norm.scale[...] * (x32 * jax.lax.rsqrt(mean_sq + norm.eps)).astype(x.dtype)
    return out * hidden_z.astype(out.dtype)


def _layer_call(zs: dict[str, jax.Array]):
    """A `Llama.run_layers` layer call applying the gates of layer `index`."""
    hidden_z = zs.get("hidden")

    def call(index, layer, x, positions, inv_freq, cache, attention_fn):
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        scale = jnp.ones((), x.dtype)
        if "layer" in zs:
            scale = scale * zs["layer"][index].astype(x.dtype)
        if hidden_z is not None:
            scale = scale * hidden_z.astype(x.dtype)
        attn = layer.self_attn
        q, keys, values = attn.project(_norm(layer.input_layernorm, x, hidden_z), positions, inv_freq)
        fn = attention_fn or (causal_attention if t > ATTN_BLOCK else masked_attention)
        out = fn(q, keys, values, positions, positions)  # [B, T, K, G, Dh]
        if "head" in zs:
            k, g = out.shape[2], out.shape[3]
            out = out * zs["head"][index].reshape(k, g, 1).astype(out.dtype)
        x = x + attn.o_proj(out.reshape(b * t, -1)) * scale
        mlp = layer.mlp
        m = _norm(layer.post_attention_layernorm, x, hidden_z)
        up = mlp.up_proj(m)
        if "intermediate" in zs:
            up = up * zs["intermediate"][index].astype(up.dtype)
        x = x + mlp.down_proj(jax.nn.silu(mlp.gate_proj(m)) * up) * scale
        return x.reshape(b, t, d), cache

    return call


def masked_hidden(model, zs: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """Final-normed hidden states `[B, T, D]` of `tokens [B, T]` under the gates `zs`."""
    hidden_z = zs.get("hidden")
    x = model.embed_tokens(tokens)
    if hidden_z is not None:
        x = x * hidden_z.astype(x.dtype)
    out = model.run_layers(x, default_positions(tokens), layer_call=_layer_call(zs))
    return _norm(model.norm, out.x, hidden_z)


def masked_logits(model, zs: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """Logits `[B, T, V]` of `tokens` under the gates `zs` (module docstring)."""
    return model.logits(masked_hidden(model, zs, tokens))


# -- the fold --------------------------------------------------------------------------------------
def _scale(var, factor, axis: int) -> None:
    shape = [1] * var[...].ndim
    shape[axis] = -1
    var[...] = var[...] * jnp.asarray(factor, var[...].dtype).reshape(shape)


def _fold_values(model, zs: dict[str, np.ndarray]) -> None:
    """Bakes the gate values into the weights (shapes unchanged)."""
    n, d = len(model.layers), model.embed_tokens.embedding.shape[1]
    hidden = zs.get("hidden", np.ones(d, np.float32))
    layer_z = zs.get("layer", np.ones(n, np.float32))
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if "head" in zs:
            _scale(attn.o_proj.kernel, np.repeat(zs["head"][i], attn.head_dim), 0)
        if "intermediate" in zs:
            _scale(mlp.up_proj.kernel, zs["intermediate"][i], 1)
        for lin in (attn.o_proj, mlp.down_proj):
            _scale(lin.kernel, layer_z[i] * hidden, 1)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _scale(norm.scale, hidden, 0)
    if "hidden" in zs:
        _scale(model.embed_tokens.embedding, hidden, 1)
        if model.lm_head is not None:  # tied: the embedding already carries it to the output
            _scale(model.norm.scale, hidden, 0)


def fold(model, zs: dict[str, jax.Array], plan):
    """Folds deterministic gates `zs` into `model` and cuts it to `plan`'s target shapes."""
    zs = {k: np.asarray(v, np.float32) for k, v in zs.items()}
    _fold_values(model, zs)
    src = plan.source
    for i in range(len(model.layers)):
        if "head" in zs:
            heads = np.flatnonzero(zs["head"][i])
            if plan.head_mode == "group":
                g = src.heads // src.kv_heads
                graph.take(model, graph.find_group(model, "kv", i), np.unique(heads // g))
            else:
                graph.take(model, graph.find_group(model, "q", i), heads)
        if "intermediate" in zs:
            graph.take(model, graph.find_group(model, "mlp", i), np.flatnonzero(zs["intermediate"][i]))
    if "hidden" in zs:
        graph.take(model, graph.find_group(model, "embed"), np.flatnonzero(zs["hidden"]))
    if "layer" in zs:
        graph.drop_layers(model, np.flatnonzero(zs["layer"] == 0))
    got = model.config
    want = plan.target_config(got)
    if got.layers != want.layers or got.hidden_size != want.hidden_size:
        raise AssertionError(f"the fold gave {got.layers[:1]} x {got.num_layers}, hidden "
                             f"{got.hidden_size}; the target is {want.layers[:1]} x "
                             f"{want.num_layers}, hidden {want.hidden_size}")
    return model
