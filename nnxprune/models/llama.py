"""Llama-family decoder as plain Flax NNX modules, with per-layer shapes.

RMSNorm, rotary embeddings (plain and Llama-3 scaled), grouped-query attention, SwiGLU MLP, tied
or untied embeddings, causal masking and a functional KV cache for generation. Nothing assumes
uniform layers: each decoder layer reads its number of query heads, KV heads and MLP width from its
own kernels, and layers can be deleted from `model.layers`. `model.config` is read back from the
shapes (DESIGN.md, principle 5).

Module names mirror Hugging Face's `LlamaForCausalLM` (`embed_tokens`, `layers[i].self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...) so checkpoint keys map one to one.

Example:
    >>> cfg = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
    ...                           num_kv_heads=2, intermediate_size=128)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> logits = model(jnp.zeros((1, 8), jnp.int32))          # [B, T, V]
    >>> del model.layers[1]; model.config.num_layers
    1
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune import layers as L
from nnxprune.layers import Embed, Linear, RMSNorm
from nnxprune.models.attention import (ATTN_BLOCK, AttentionFn, causal_attention,
                                      masked_attention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShape:
    """The prunable widths of one decoder layer."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (`rope_type = "llama3"` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Everything needed to build a `Llama`; `layers` holds one `LayerShape` per decoder layer."""

    vocab_size: int
    hidden_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    @classmethod
    def uniform(cls, *, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                hidden_size: int, head_dim: int | None = None, **kwargs) -> "LlamaConfig":
        """A config whose layers all have the same shape."""
        shape = LayerShape(num_heads=num_heads, num_kv_heads=num_kv_heads,
                           intermediate_size=intermediate_size)
        return cls(hidden_size=hidden_size, head_dim=head_dim or hidden_size // num_heads,
                   layers=(shape,) * num_layers, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form with one entry per layer (what nnxprune checkpoints store)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        d["layers"] = tuple(LayerShape(**s) for s in d["layers"])
        if d.get("rope_scaling"):
            d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


# -- rotary embeddings -----------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]`, Llama-3 scaled when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates `x [B, T, H, Dh]` by `positions [B, T]` (HF's rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    # The barrier makes XLA compute the tables once, not inside the rotation's fusion once per
    # head and half (on CPU that recomputation made RoPE 3.5x slower than the rotation itself).
    # (A barrier on the (cos, sin) pair is simplified away; one on their concatenation holds.)
    half = freqs.shape[-1]
    table = jax.lax.optimization_barrier(jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], -1))
    cos, sin = table[:, :, None, :half], table[:, :, None, half:]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# -- blocks ----------------------------------------------------------------------------------
KVCache = tuple[jax.Array, jax.Array]  # keys and values of one layer, each [B, S, K, Dh]


class Attention(nnx.Module):
    """Grouped-query attention; head counts are read from the kernels, not stored."""

    def __init__(self, cfg: LlamaConfig, shape: LayerShape, *, param_dtype, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        if shape.num_kv_heads and shape.num_heads % shape.num_kv_heads:
            raise ValueError(f"{shape.num_heads} query heads do not split into "
                             f"{shape.num_kv_heads} KV groups")
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, shape.num_heads * dh, in_space=L.EMBED, out_space=L.Q_HEADS, out_unit=dh, **kw)
        self.k_proj = Linear(d, shape.num_kv_heads * dh, in_space=L.EMBED, out_space=L.KV_HEADS, out_unit=dh, **kw)
        self.v_proj = Linear(d, shape.num_kv_heads * dh, in_space=L.EMBED, out_space=L.KV_HEADS, out_unit=dh, **kw)
        self.o_proj = Linear(shape.num_heads * dh, d, in_space=L.Q_HEADS, out_space=L.EMBED, in_unit=dh, **kw)
        self.head_dim = dh

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    def project(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
        """Queries `[B, T, K, G, Dh]` (the G query heads of each KV head together) and keys,
        values `[B, T, K, Dh]` of `x [B, T, D]` (or flattened, `[B*T, D]`), RoPE applied at
        `positions [B, T]`."""
        b, t = positions.shape
        n, k, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, n, dh), positions, inv_freq)
        keys = apply_rope(self.k_proj(x).reshape(b, t, k, dh), positions, inv_freq)
        return q.reshape(b, t, k, n // k, dh), keys, self.v_proj(x).reshape(b, t, k, dh)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 cache: KVCache | None = None, attention_fn: AttentionFn | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """`x [B, T, D]` (or flattened, `[B*T, D]`; the output has the same layout), `positions
        [B, T]`; with a cache, writes each row's keys and values at that row's first position
        `positions[b, 0]` (rows may start at different offsets). `attention_fn` replaces the
        attention kernel (`nnxprune.models.attention`); by default the blocked causal kernel
        serves long rows without a cache and `masked_attention` the rest."""
        b, t = positions.shape
        q, keys, values = self.project(x, positions, inv_freq)
        key_pos = positions
        if cache is not None:
            write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (s, 0, 0)))
            keys = write(cache[0], keys, positions[:, 0])
            values = write(cache[1], values, positions[:, 0])
            cache = (keys, values)
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
        if attention_fn is None:
            attention_fn = causal_attention if cache is None and t > ATTN_BLOCK else masked_attention
        out = attention_fn(q, keys, values, positions, key_pos)
        return self.o_proj(out.reshape(*x.shape[:-1], -1)), cache


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`; the width is read from the kernels."""

    def __init__(self, cfg: LlamaConfig, shape: LayerShape, *, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, shape.intermediate_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, in_space=L.EMBED, out_space=L.MLP, **kw)
        self.up_proj = Linear(d, f, in_space=L.EMBED, out_space=L.MLP, **kw)
        self.down_proj = Linear(f, d, in_space=L.MLP, out_space=L.EMBED, **kw)

    @property
    def intermediate_size(self) -> int:
        return self.up_proj.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, cfg: LlamaConfig, shape: LayerShape, *, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, shape, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, shape, param_dtype=param_dtype, rngs=rngs)

    @property
    def shape(self) -> LayerShape:
        return LayerShape(num_heads=self.self_attn.num_heads, num_kv_heads=self.self_attn.num_kv_heads,
                          intermediate_size=self.mlp.intermediate_size)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 cache: KVCache | None = None, attention_fn: AttentionFn | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """`x [B, T, D]` -> `[B, T, D]`. Tokens are flattened to `[B*T, D]` around the norms,
        projections and MLP (XLA on CPU runs the SwiGLU MLP about 25% faster on 2-D inputs)."""
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        h, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, cache, attention_fn)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x.reshape(b, t, d), cache


@dataclasses.dataclass(frozen=True)
class StackOutput:
    """What `Llama.run_layers` gives back: the last layer's output `x [B, T, D]` (before the
    final norm), the updated cache (or None) and the outputs of the layers asked for."""

    x: jax.Array
    cache: list[KVCache] | None
    hidden: dict[int, jax.Array]


# `layer_call(index, layer, x, positions, inv_freq, cache, attention_fn) -> (x, cache)`: how
# `run_layers` runs one decoder layer (default: calls it). Callers that compile each layer as a
# program of its own (lm-eval's scorer, the calibration driver) pass their jitted call here.
LayerCall = Callable[..., tuple[jax.Array, KVCache | None]]


def call_layer(index: int, layer: "DecoderLayer", x, positions, inv_freq, cache, attention_fn):
    """The default `LayerCall`: the layer's own `__call__`."""
    return layer(x, positions, inv_freq, cache, attention_fn)


class Llama(nnx.Module):
    """Llama causal LM. `model(tokens)` gives logits `[B, T, V]`.

    `config` is derived from the current shapes, so it stays true after any surgery.
    """

    def __init__(self, cfg: LlamaConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, s, param_dtype=param_dtype, rngs=rngs) for s in cfg.layers])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head: Linear | None = nnx.data(None)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, in_space=L.EMBED, out_space=L.VOCAB,
                                  param_dtype=param_dtype, rngs=rngs)
        # Facts not carried by any shape; shapes stay the single source of truth for the rest.
        self.base_config = dataclasses.replace(cfg, layers=())

    @property
    def config(self) -> LlamaConfig:
        vocab, hidden = self.embed_tokens.embedding.shape
        return dataclasses.replace(self.base_config, vocab_size=vocab, hidden_size=hidden,
                                   layers=tuple(layer.shape for layer in self.layers))

    @property
    def inv_freq(self) -> jax.Array:
        c = self.base_config
        return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)

    def run_layers(self, x: jax.Array, positions: jax.Array, *, cache: list[KVCache] | None = None,
                   attention_fn: AttentionFn | None = None, keep: Iterable[int] = (),
                   layer_call: LayerCall = call_layer) -> StackOutput:
        """THE decoder stack: every layer in order on embedded inputs `x [B, T, D]`.

        Every path that runs the layers runs them here (the forward, generation, distillation's
        hidden states, lm-eval's packed rows, the calibration driver). `keep` names the layers
        whose outputs come back in `StackOutput.hidden`; `attention_fn` replaces the attention
        kernel of every layer; `layer_call` runs one layer (see `LayerCall`).
        """
        inv_freq = self.inv_freq
        keep = set(keep)
        new_cache = [] if cache is not None else None
        hidden = {}
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer_call(i, layer, x, positions, inv_freq,
                                        None if cache is None else cache[i], attention_fn)
            if cache is not None:
                new_cache.append(layer_cache)
            if i in keep:
                hidden[i] = x
        return StackOutput(x=x, cache=new_cache, hidden=hidden)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      cache: list[KVCache] | None = None) -> tuple[jax.Array, list[KVCache] | None]:
        """Final-normed hidden states `[B, T, D]` (and the updated cache, if one was given)."""
        if positions is None:
            positions = default_positions(tokens)
        out = self.run_layers(self.embed_tokens(tokens), positions, cache=cache)
        return self.norm(out.x), out.cache

    def logits(self, h: jax.Array) -> jax.Array:
        """Output head (tied to the embedding when there is no `lm_head`)."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        h, _ = self.hidden_states(tokens, positions)
        return self.logits(h)


def default_positions(tokens: jax.Array) -> jax.Array:
    """Positions `0 .. T-1` of every row of `tokens [B, T]`."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])


def init_cache(model: Llama, batch: int, length: int, dtype=jnp.float32) -> list[KVCache]:
    """Zeroed KV cache: per layer keys and values `[B, S, K_layer, Dh]` (layers may differ)."""
    dh = model.base_config.head_dim
    return [(jnp.zeros((batch, length, layer.self_attn.num_kv_heads, dh), dtype),) * 2
            for layer in model.layers]


ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")  # HF's `attention_bias` covers these
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")  # and `mlp_bias` these


def projections(layer: DecoderLayer, *, attention: bool = True, mlp: bool = True) -> list[Linear]:
    """A decoder layer's attention and / or MLP projections, in HF's order."""
    return ([getattr(layer.self_attn, n) for n in ATTENTION_PROJ] if attention else []) + (
        [getattr(layer.mlp, n) for n in MLP_PROJ] if mlp else [])


def bias_flags(model: Llama) -> tuple[bool, bool]:
    """`(attention, mlp)`: whether any layer's attention / MLP projection has a bias (biases are
    optional, e.g. FLAP's compensation on o_proj and down_proj; HF's `attention_bias` / `mlp_bias`)."""
    return tuple(any(lin.bias is not None for layer in model.layers
                     for lin in projections(layer, attention=a, mlp=not a)) for a in (True, False))


def add_biases(model: Llama, *, attention: bool, mlp: bool) -> Llama:
    """Zero biases on every layer's attention (q, k, v, o) and / or MLP (gate, up, down)
    projections that have none (the layout of HF's `attention_bias` / `mlp_bias`); in place."""
    for layer in model.layers:
        for lin in projections(layer, attention=attention, mlp=mlp):
            if lin.bias is None:
                lin.set_bias(jnp.zeros((lin.out_features,), lin.kernel.dtype))
    return model
