"""The gradient pass: gradients of the calibration loss for first- and second-order Taylor scores.

LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models", arXiv
2305.11627; code horseee/LLM-Pruner, `hf_prune.py`) ranks coupled structures by a Taylor
estimate of the loss change. Its calibration is one forward and backward of the mean
next-token cross-entropy over all calibration sequences at once (`model(x, labels=x).loss`,
labels = inputs), and, for the second-order variants, one backward per sequence whose squared
gradients are averaged (`acc_grad = sum_j g_j^2 / n`, the diagonal Fisher estimate of the
Hessian).

Here the first is one jitted `jax.value_and_grad` over all sequences (or over equal chunks of
`batch_size` rows, averaged: the same mean), the second a `lax.scan` over the sequences, one
backward each, inside one jit. Everything runs in float32 (parameters are cast first), and only
the kernels of the decoder layers' Linears are differentiated (the embedding, norms and output
head are inputs to the loss, not variables).

The result is laid out as the sequential driver lays out collector statistics, so scores read
it the same way: `{layer: {"gradient": {"self_attn.q_proj": [in, out], ...},
"gradient_sq": {...}}}` (`gradient_sq` only when asked for).

Example:
    >>> grads = gradient_pass(model, tokens, second_order=True)     # tokens [n, T]
    >>> grads.loss, grads.stats[3]["gradient"]["mlp.up_proj"].shape
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GRADIENT, GRADIENT_SQ = "gradient", "gradient_sq"


def mean_next_token_ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of `tokens[:, 1:]` given `logits[:, :-1]` (transformers' `labels=x`)."""
    logits = logits[:, :-1].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


def _is_layer_kernel(path, value) -> bool:
    return (isinstance(value, nnx.Param) and len(path) >= 3 and path[0] == "layers"
            and path[-1] == "kernel")


def _loss(graphdef, kernels, rest, tokens):
    model = nnx.merge(graphdef, kernels, rest)
    return mean_next_token_ce(model(tokens), tokens)


@jax.jit
def _value_and_grad(graphdef, kernels, rest, tokens):
    return jax.value_and_grad(_loss, argnums=1)(graphdef, kernels, rest, tokens)


@jax.jit
def _mean_squared_grads(graphdef, kernels, rest, tokens):
    """`mean_j g_j^2` over the rows `j` of `tokens`, one backward per row (a scan)."""
    def body(acc, row):
        g = jax.grad(_loss, argnums=1)(graphdef, kernels, rest, row[None])
        return jax.tree.map(lambda a, x: a + x * x, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, kernels)
    total, _ = jax.lax.scan(body, zeros, tokens)
    return jax.tree.map(lambda a: a / tokens.shape[0], total)


@dataclasses.dataclass
class Gradients:
    """The pass's result: `loss` (the mean CE over all rows, float), `stats` (module docstring),
    `seconds` (wall time of the first-order pass; of the second-order scan in `seconds_sq`)."""

    loss: float
    stats: dict[int, dict[str, Any]]
    seconds: float
    seconds_sq: float = 0.0


def _by_layer(state, key: str, out: dict) -> None:
    for path, var in nnx.to_flat_state(state):
        layer, name = int(path[1]), ".".join(map(str, path[2:-1]))
        out.setdefault(layer, {}).setdefault(key, {})[name] = var[...]


def _float32(state):
    """Floating leaves as float32 (masks and integer leaves as they are)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, state)


def gradient_pass(model, tokens, *, second_order: bool = False,
                  batch_size: int | None = None) -> Gradients:
    """Gradients of the mean next-token CE over `tokens [n, T]` w.r.t. every decoder-layer
    kernel, float32; with `second_order`, also `mean_j g_j^2` from one backward per row.
    `batch_size` (dividing n) splits the first-order pass into equal chunks whose gradients are
    averaged (the same mean, less memory); None = all rows at once."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, T] with T >= 2, got shape {tokens.shape}")
    n = tokens.shape[0]
    batch = n if batch_size is None else batch_size
    if batch < 1 or n % batch:
        raise ValueError(f"batch_size {batch_size} must divide the {n} calibration rows")
    graphdef, kernels, rest = nnx.split(model, _is_layer_kernel, ...)
    kernels, rest = _float32(kernels), _float32(rest)
    start = time.perf_counter()
    loss, grads = 0.0, None
    for lo in range(0, n, batch):
        value, g = _value_and_grad(graphdef, kernels, rest, jnp.asarray(tokens[lo:lo + batch]))
        loss = loss + value * (batch / n)
        g = jax.tree.map(lambda x: x * (batch / n), g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    loss = float(jax.block_until_ready(loss))
    seconds = time.perf_counter() - start
    stats: dict[int, dict[str, Any]] = {}
    _by_layer(grads, GRADIENT, stats)
    seconds_sq = 0.0
    if second_order:
        start = time.perf_counter()
        sq = jax.block_until_ready(_mean_squared_grads(graphdef, kernels, rest, jnp.asarray(tokens)))
        seconds_sq = time.perf_counter() - start
        _by_layer(sq, GRADIENT_SQ, stats)
    return Gradients(loss=loss, stats=stats, seconds=seconds, seconds_sq=seconds_sq)
