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

The pass runs under the recovery trainer's mesh rules (`recovery.sharding`: FSDP over `embed`,
tensor parallelism over heads and MLP, the rows over (data, fsdp)), so a model too large for one
device has its weights, activations and gradients spread over the devices: on the mesh the
model is already placed on (`sharding.place_model`), else on every device by
`sharding.auto_sizes`. The gradients come back where the model's kernels are: sharded for a
model placed on the mesh, on its device for a model on one device; in a multi-process run
(`--distributed`, every process passing the same rows) whole in every process. On 1 device this
is the plain jitted pass; on 8 devices the scores and the groups kept are the same (tested).

The result is laid out as the sequential driver lays out collector statistics, so scores read
it the same way: `{layer: {"gradient": {"self_attn.q_proj": [in, out], ...},
"gradient_sq": {...}}}` (`gradient_sq` only when asked for).

Example:
    >>> grads = gradient_pass(model, tokens, second_order=True)     # tokens [n, T]
    >>> grads.loss, grads.stats[3]["gradient"]["mlp.up_proj"].shape
    >>> sharding.place_model(model, sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
    >>> gradient_pass(model, tokens).stats[3]["gradient"]["mlp.up_proj"].sharding   # fsdp x tensor
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from nnxprune import multihost
from nnxprune.recovery import sharding as sh

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


def _value_and_grad(graphdef, kernels, rest, tokens):
    return jax.value_and_grad(_loss, argnums=1)(graphdef, kernels, rest, tokens)


def _mean_squared_grads(graphdef, kernels, rest, tokens):
    """`mean_j g_j^2` over the rows `j` of `tokens`, one backward per row (a scan)."""
    def body(acc, row):
        g = jax.grad(_loss, argnums=1)(graphdef, kernels, rest, row[None])
        return jax.tree.map(lambda a, x: a + x * x, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, kernels)
    total, _ = jax.lax.scan(body, zeros, tokens)
    return jax.tree.map(lambda a: a / tokens.shape[0], total)


_JITTED: dict = {}  # one compiled pass per (function, graph, shardings); jit retraces on shapes


def _key(tree) -> tuple:
    return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))


def _jitted(fn, graphdef, in_shardings, out_shardings):
    """`fn` with `graphdef` bound, jitted with the given shardings (cached)."""
    key = (fn, graphdef, _key(in_shardings), _key(out_shardings))
    if key not in _JITTED:
        if len(_JITTED) > 32:
            _JITTED.clear()
        _JITTED[key] = jax.jit(functools.partial(fn, graphdef), in_shardings=in_shardings,
                               out_shardings=out_shardings)
    return _JITTED[key]


@dataclasses.dataclass
class _Placed:
    """The split model on the mesh: states, their shardings, the kernels' own placement."""

    graphdef: Any
    kernels: Any
    rest: Any
    k_sh: Any
    r_sh: Any
    home: Any  # the model's kernels' shardings before the pass (where the gradients go back)
    mesh: Any


def _model_mesh(kernels):
    """The mesh the model's kernels are placed on, if they are (`sharding.place_model`)."""
    for leaf in jax.tree.leaves(kernels):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and tuple(s.mesh.axis_names) == sh.AXES:
            return s.mesh
        return None
    return None


def _place(model, rows: int, mesh) -> _Placed:
    graphdef, kernels, rest = nnx.split(model, _is_layer_kernel, ...)
    home = jax.tree.map(lambda x: getattr(x, "sharding", None), kernels)
    if mesh is None:
        mesh = _model_mesh(kernels) or sh.make_mesh(sh.auto_sizes(rows))
    specs = sh.param_specs(model, mesh)
    k_sh, r_sh = sh.state_shardings(kernels, specs, mesh), sh.state_shardings(rest, specs, mesh)
    kernels, rest = sh.put(_float32(kernels), k_sh), sh.put(_float32(rest), r_sh)
    return _Placed(graphdef, kernels, rest, k_sh, r_sh, home, mesh)


def _rows(mesh, rows: int):
    """Rows split over (data, fsdp) when they divide evenly, else replicated."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    return sh.batch_sharding(mesh, 2) if rows % split == 0 else sh.replicated(mesh)


def _home(grads, home):
    """The gradients back where the model's kernels are (module docstring)."""
    if multihost.joined():
        return multihost.local_copy(grads)

    def one(g, s):
        if s is None or g.sharding.is_equivalent_to(s, g.ndim):
            return g
        return jax.device_put(g, s)
    return jax.tree.map(one, grads, home)


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
                  batch_size: int | None = None, mesh=None) -> Gradients:
    """Gradients of the mean next-token CE over `tokens [n, T]` w.r.t. every decoder-layer
    kernel, float32; with `second_order`, also `mean_j g_j^2` from one backward per row.
    `batch_size` (dividing n) splits the first-order pass into equal chunks whose gradients are
    averaged (the same mean, less memory); None = all rows at once. `mesh` (a
    `sharding.make_mesh`): where the pass runs; None = the model's own mesh, else every device
    (module docstring)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, T] with T >= 2, got shape {tokens.shape}")
    n = tokens.shape[0]
    batch = n if batch_size is None else batch_size
    if batch < 1 or n % batch:
        raise ValueError(f"batch_size {batch_size} must divide the {n} calibration rows")
    placed = _place(model, batch, mesh)
    rep, rows = sh.replicated(placed.mesh), _rows(placed.mesh, batch)
    first = _jitted(_value_and_grad, placed.graphdef, (placed.k_sh, placed.r_sh, rows),
                    (rep, placed.k_sh))
    start = time.perf_counter()
    loss, grads = 0.0, None
    for lo in range(0, n, batch):
        value, g = first(placed.kernels, placed.rest, sh.put(tokens[lo:lo + batch], rows))
        loss = loss + value * (batch / n)
        g = jax.tree.map(lambda x: x * (batch / n), g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    loss = float(jax.block_until_ready(loss))
    seconds = time.perf_counter() - start
    stats: dict[int, dict[str, Any]] = {}
    _by_layer(_home(grads, placed.home), GRADIENT, stats)
    seconds_sq = 0.0
    if second_order:
        second = _jitted(_mean_squared_grads, placed.graphdef, (placed.k_sh, placed.r_sh, rep),
                         placed.k_sh)
        start = time.perf_counter()
        sq = jax.block_until_ready(second(placed.kernels, placed.rest, sh.put(tokens, rep)))
        seconds_sq = time.perf_counter() - start
        _by_layer(_home(sq, placed.home), GRADIENT_SQ, stats)
    return Gradients(loss=loss, stats=stats, seconds=seconds, seconds_sq=seconds_sq)
