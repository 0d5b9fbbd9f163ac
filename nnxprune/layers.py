"""Mask-aware layers that carry channel-space metadata.

Every prunable projection of a model is the same `Linear`: a kernel `[in, out]` that may hold a
`Mask` of the kernel's shape. The forward computes `x @ (kernel * mask)`; with no mask (the
default) it is a plain matmul, so masks cost nothing when absent.

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
    """`y = x @ (kernel * mask)` with kernel `[in, out]`; the mask is optional."""

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

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.record_inputs:
            self.sow(ProjectionInput, "inputs", x)
        kernel = self.effective_kernel()
        return jnp.dot(x.astype(kernel.dtype), kernel)


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
        return jnp.take(self.effective_embedding(), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding matrix (tied `lm_head`): `[..., D] -> [..., V]`."""
        embedding = self.effective_embedding()
        return jnp.dot(x.astype(embedding.dtype), embedding.T)


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
