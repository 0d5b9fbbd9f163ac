"""Mask-aware layers that carry channel-space metadata.

Every prunable projection of a model is the same `Linear`: a kernel `[in, out]` that may hold a
`Mask` of the kernel's shape. The forward computes `x @ (kernel * mask)`; with no mask (the
default) it is a plain matmul, so masks cost nothing when absent. Kernels may be bfloat16: the
product accumulates in float32 and the activations stay float32 (`matmul`), so bf16 weights halve
the weight memory without a float32 copy of them and without bf16 rounding of the residual stream.

Each layer names the channel space of its input and output (`embed`, `q_heads`, `kv_heads`,
`mlp`, `vocab`) and the unit of that space (`head_dim` columns make one head). The dependency
graph of the pruning code is derived from these names (see DESIGN.md, principle 3).

Example:
    >>> lin = Linear(64, 128, in_space="embed", out_space="mlp", rngs=nnx.Rngs(0))
    >>> lin.set_mask(jnp.abs(lin.kernel[...]) > 0.01)
    >>> y = lin(jnp.ones((2, 64)))   # = x @ (kernel * mask)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.variables import Mask, NormOutput, ProjectionInput

# Channel spaces of the Llama family. Coupled groups follow from these names.
EMBED, Q_HEADS, KV_HEADS, MLP, VOCAB = "embed", "q_heads", "kv_heads", "mlp", "vocab"
SPACES = (EMBED, Q_HEADS, KV_HEADS, MLP, VOCAB)

_default_init = nnx.initializers.normal(stddev=0.02)


class Linear(nnx.Module):
    """`y = x @ (kernel * mask) + bias` with kernel `[in, out]`; mask and bias are optional."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_space: str,
        out_space: str,
        in_unit: int = 1,
        out_unit: int = 1,
        param_dtype=jnp.float32,
        kernel_init=_default_init,
        rngs: nnx.Rngs,
    ):
        if in_space not in SPACES or out_space not in SPACES:
            raise ValueError(f"unknown channel space {in_space!r} -> {out_space!r}; known: {SPACES}")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.mask: Mask | None = nnx.data(None)  # data, so a Mask can be attached later
        self.bias: nnx.Param | None = nnx.data(None)  # optional `[out]` (FLAP's compensation)
        self.in_space, self.out_space = in_space, out_space
        self.in_unit, self.out_unit = in_unit, out_unit
        # Static switch: when True, the forward sows its input as a `ProjectionInput` (collected
        # with `nnx.capture`) so calibration can compute statistics. Off, it costs nothing.
        self.record_inputs = False

    @property
    def in_features(self) -> int:
        return self.kernel.shape[0]

    @property
    def out_features(self) -> int:
        return self.kernel.shape[1]

    def set_mask(self, mask) -> None:
        """Attach (or replace) a boolean keep-mask of the kernel's shape."""
        mask = jnp.asarray(mask, dtype=jnp.bool_)
        if mask.shape != self.kernel.shape:
            raise ValueError(f"mask shape {mask.shape} != kernel shape {self.kernel.shape}")
        self.mask = Mask(mask)

    def effective_kernel(self) -> jax.Array:
        """The kernel the forward uses: masked entries are exactly zero."""
        kernel = self.kernel[...]
        if self.mask is not None:
            kernel = jnp.where(self.mask[...], kernel, jnp.zeros((), kernel.dtype))
        return kernel

    def set_bias(self, bias) -> None:
        """Attach (or replace) a bias `[out]`, stored in the kernel's dtype."""
        bias = jnp.asarray(bias, self.kernel.dtype)
        if bias.shape != (self.out_features,):
            raise ValueError(f"bias shape {bias.shape} != ({self.out_features},)")
        self.bias = nnx.Param(bias)

    def effective_bias(self) -> jax.Array:
        """The bias the forward adds: zero on an output channel whose kernel column is wholly
        masked, so a soft-removed channel emits nothing, as its hard slice does."""
        bias = self.bias[...]
        if self.mask is not None:
            bias = jnp.where(self.mask[...].any(axis=0), bias, jnp.zeros((), bias.dtype))
        return bias

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.product(x)
        return y if self.bias is None else y + self.effective_bias().astype(y.dtype)

    def product(self, x: jax.Array) -> jax.Array:
        """`x @ (kernel * mask)`, without the bias."""
        if self.record_inputs:
            self.sow(ProjectionInput, "inputs", x)
        # A program over many masked layers makes every layer's masked kernel up front and holds
        # them all (XLA schedules them first; an optimization barrier tying them to `x` is
        # dropped): the evaluators therefore run layer by layer on folded kernels
        # (`nnxprune.evaluate.layerwise`).
        return matmul(x, self.effective_kernel())


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` with `x` in the kernel's dtype. A kernel narrower than float32 (bf16)
    accumulates in float32 and gives float32 (`preferred_element_type`), so activations stay
    float32 while the weights take half the memory; a float32 kernel is a plain float32 dot."""
    x = x.astype(kernel.dtype)
    if jnp.finfo(kernel.dtype).bits >= 32:
        return jnp.dot(x, kernel)
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _channel_mask(features: int, mask) -> Mask:
    mask = jnp.asarray(mask, dtype=jnp.bool_)
    if mask.shape != (features,):
        raise ValueError(f"channel mask shape {mask.shape} != ({features},)")
    return Mask(mask)


class Embed(nnx.Module):
    """Token embedding `[V, D]` (space `vocab` -> `embed`); `attend` is the tied output head.

    An optional channel `mask [D]` zeroes hidden channels (a soft edit of the `embed` group).
    """

    def __init__(self, num_embeddings: int, features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_default_init(rngs.params(), (num_embeddings, features), param_dtype))
        self.mask: Mask | None = nnx.data(None)
        self.in_space, self.out_space = VOCAB, EMBED

    def set_mask(self, mask) -> None:
        """Attach (or replace) a boolean keep-mask over the hidden channels `[D]`."""
        self.mask = _channel_mask(self.embedding.shape[1], mask)

    def effective_embedding(self) -> jax.Array:
        embedding = self.embedding[...]
        if self.mask is not None:
            embedding = jnp.where(self.mask[...], embedding, jnp.zeros((), embedding.dtype))
        return embedding

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Rows `[..., D]`, float32 (exactly) when the embedding is narrower (bf16): the residual
        stream stays float32, as `matmul`'s outputs."""
        rows = jnp.take(self.effective_embedding(), tokens, axis=0)
        return rows.astype(jnp.promote_types(rows.dtype, jnp.float32))

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding matrix (tied `lm_head`): `[..., D] -> [..., V]`."""
        return matmul(x, self.effective_embedding().T)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the `embed` space, computed in float32 as in Llama.

    With a channel `mask [D]` (a soft edit of the `embed` group) the mean runs over the kept
    channels only and masked channels output zero, so masking channels equals slicing them away.
    """

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.mask: Mask | None = nnx.data(None)
        self.eps = eps
        self.space = EMBED
        # Static switch, as `Linear.record_inputs`: sow the output as a `NormOutput`.
        self.record_outputs = False

    def set_mask(self, mask) -> None:
        """Attach (or replace) a boolean keep-mask over the channels `[D]`."""
        self.mask = _channel_mask(self.scale.shape[0], mask)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        if self.mask is None:
            mean_sq = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        else:
            keep = self.mask[...]
            x32 = jnp.where(keep, x32, 0.0)
            mean_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True) / jnp.maximum(keep.sum(), 1)
        x32 = x32 * jax.lax.rsqrt(mean_sq + self.eps)
        out = self.scale[...] * x32.astype(dtype)
        if self.record_outputs:
            self.sow(NormOutput, "outputs", out)
        return out
