"""LLM-Pruner's scores: first-order Taylor importance of coupled groups, and its baselines.

Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023,
arXiv 2305.11627; code horseee/LLM-Pruner, `LLMPruner/pruner/hf_llama_pruner.py`,
`TaylorImportance` and `MagnitudeImportance`). With `W` a member's kernel, `g` the gradient of
the calibration loss and `F = mean_j g_j^2` the per-sequence squared gradients
(`nnxprune.calibration.gradients`), per weight `S = W * g` and `S2 = W * F * W`; a channel
reduces its weights along the member's other axis:

- `taylor` (element1, the reference's `param_first`): sum of |S|;
- `taylor_vector` (`vectorize`): |sum of S|;
- `taylor_element2` (`param_second`): sum of |S2|;
- `taylor_mix` (`param_mix`): sum of |S - S2 / 2|;
- `l2` (the paper's L2 baseline, `MagnitudeImportance(p=2)`): sum of W^2, members averaged;
- `random` (the random baseline): uniform draws, seeded per (seed, layer, group kind).

Channels of one head are summed (`consecutive_groups = head_dim`) and the group's members are
summed (the reference's default `grouping_strategy = sum`; `reduce_members`). For head and neuron
groups only the decoder layers' Linears carry gradients (`gradient_pass`). Hidden channels (the
`embed` group, LLM-Pruner's `--channel_wise`) take every member's term, as the reference's
`TaylorImportance` does for `prune_embedding_out_channels` (sum over the vocabulary of
|W * g|) and the RMSNorm pruner (|w * g| per channel): `hidden_gradient_pass` differentiates
every parameter, the embedding, every norm scale and the output head included. With tied
embeddings the one shared matrix is one member, its gradient that of both uses.

GQA: a KV group is its k and v head, the query heads that share them and their o_proj inputs.
We credit query head `h` to KV head `h // (n / K)`, the block layout transformers' `repeat_kv`
uses (`nnxprune.graph.groups`). The reference's GQA script (`llama3.py`, roots `k_proj` with
`consecutive_groups = head_dim`) instead folds the longer q_proj / o_proj importance onto the
KV channels with `imp.view(len(imp) // min_imp_size, min_imp_size).sum(0)` (the
`aligned_group_imp` step of `TaylorImportance.__call__`): channel `c` of KV head `j` receives
query channel `c + r * K * head_dim` for every `r`, i.e. query head `h` is credited to KV head
`h mod K`, a head that does not attend with it. We depart from the reference there, on purpose;
`tests/scoring/test_taylor.py` shows a model where the two mappings rank KV groups differently.

`taylor_importance(model, tokens)` gives every layer's MLP-neuron and KV-group scores at once
(for `nnxprune importance`).

Example:
    >>> grads = gradient_pass(model, tokens)                       # tokens [n, T]
    >>> get_score("taylor")(model, find_group(model, "mlp", 3), grads.stats)   # [neurons]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.calibration.gradients import (GRADIENT, GRADIENT_SQ, Gradients, gradient_pass,
                                            mean_next_token_ce)
from nnxprune.errors import UserError
from nnxprune.graph import KINDS, find_group
from nnxprune.scoring.base import (Score, Stats, get_score, layer_of, member_array,
                                   other_axes_sum, register_score)
from nnxprune.scoring.weight import WeightNorm

VARIANTS = ("element1", "vector", "element2", "mix")
SCORE_OF_VARIANT = {"element1": "taylor", "vector": "taylor_vector",
                    "element2": "taylor_element2", "mix": "taylor_mix"}


def taylor_values(kernel, grad, grad_sq, variant: str, axis: int) -> jnp.ndarray:
    """One value per entry of `axis` of `kernel` for a Taylor `variant` (module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Taylor variant {variant!r}; known: {', '.join(VARIANTS)}")
    w = jnp.asarray(kernel, jnp.float32)
    if variant == "vector":
        return jnp.abs(other_axes_sum(w * grad, axis))
    if variant == "element1":
        return other_axes_sum(jnp.abs(w * grad), axis)
    s2 = w * grad_sq * w
    if variant == "element2":
        return other_axes_sum(jnp.abs(s2), axis)
    return other_axes_sum(jnp.abs(w * grad - 0.5 * s2), axis)


@dataclasses.dataclass(frozen=True)
class GradientScore(Score):
    """A score read from the gradient pass, not from collectors: `gather(model, tokens)` gives
    its statistics (the transform of `nnxprune.transforms.coupled` calls it)."""

    second_order: ClassVar[bool] = False

    def needs_calibration(self) -> bool:
        return True

    def gather(self, model, tokens, *, batch_size: int | None = None) -> Stats:
        return gradient_pass(model, tokens, second_order=self.second_order,
                             batch_size=batch_size).stats

    def __call__(self, model, group, stats: Stats | None = None) -> np.ndarray:
        if stats is None:
            raise UserError(f"score {self.name!r} needs gradients of the calibration loss; rank "
                            f"with the 'llm_pruner' transform, which runs the gradient pass")
        return super().__call__(model, group, stats)


OUTSIDE = -1  # the statistics key of the parameters outside the decoder layers


def _loss(graphdef, params, rest, tokens):
    return mean_next_token_ce(nnx.merge(graphdef, params, rest)(tokens), tokens)


@jax.jit
def _all_grads(graphdef, params, rest, tokens):
    return jax.value_and_grad(_loss, argnums=1)(graphdef, params, rest, tokens)


@jax.jit
def _all_grads_sq(graphdef, params, rest, tokens):
    """`mean_j g_j^2` over the rows of `tokens`, one backward per row (a scan)."""
    def body(acc, row):
        g = jax.grad(_loss, argnums=1)(graphdef, params, rest, row[None])
        return jax.tree.map(lambda a, x: a + x * x, acc, g), None
    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), tokens)
    return jax.tree.map(lambda a: a / tokens.shape[0], total)


def _by_module(state, key: str, out: dict) -> None:
    """`{layer or OUTSIDE: {key: {module path in the layer: array}}}` (one Param per module)."""
    for path, var in nnx.to_flat_state(state):
        layer = int(path[1]) if len(path) > 2 and path[0] == "layers" else OUTSIDE
        name = ".".join(map(str, path[2:-1] if layer != OUTSIDE else path[:-1]))
        out.setdefault(layer, {}).setdefault(key, {})[name] = var[...]


def hidden_gradient_pass(model, tokens, *, second_order: bool = False) -> Gradients:
    """Gradients of the mean next-token CE over `tokens [n, T]` w.r.t. every parameter (float32):
    the decoder kernels as `gradient_pass` gives them, plus every norm scale (under its layer)
    and the embedding, final norm and output head (under `OUTSIDE`); with `second_order`, also
    `mean_j g_j^2` from one backward per row. It runs where the model is (one device), not
    under the mesh rules `gradient_pass` spreads a large model with."""
    tokens = jnp.asarray(np.asarray(tokens))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f32 = lambda t: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    params, rest = f32(params), f32(rest)
    start = time.perf_counter()
    loss, grads = _all_grads(graphdef, params, rest, tokens)
    loss = float(loss)
    seconds = time.perf_counter() - start
    stats: dict[int, dict[str, Any]] = {}
    _by_module(grads, GRADIENT, stats)
    seconds_sq = 0.0
    if second_order:
        start = time.perf_counter()
        _by_module(jax.block_until_ready(_all_grads_sq(graphdef, params, rest, tokens)),
                   GRADIENT_SQ, stats)
        seconds_sq = time.perf_counter() - start
    return Gradients(loss=loss, stats=stats, seconds=seconds, seconds_sq=seconds_sq)


class _Taylor(GradientScore):
    variant: ClassVar[str] = "element1"

    def member(self, model, member, stats):
        """Per-entry Taylor values of a member whose gradient the statistics hold (None for one
        they do not: the norms, embedding and head after `gradient_pass`)."""
        layer, name = layer_of(member)
        grads = stats.get(OUTSIDE if layer is None else layer, {})
        grad = grads.get(GRADIENT, {}).get(name)
        if grad is None:
            return None
        return taylor_values(member_array(model, member), grad,
                             grads.get(GRADIENT_SQ, {}).get(name), self.variant, member.axis)


@register_score
@dataclasses.dataclass(frozen=True)
class Taylor(_Taylor):
    """Element-wise first-order Taylor (element1): sum of |W * dL/dW| per channel."""

    name: ClassVar[str] = "taylor"


@register_score
@dataclasses.dataclass(frozen=True)
class TaylorVector(_Taylor):
    """Vector-wise first-order Taylor: |sum of W * dL/dW| per channel."""

    name: ClassVar[str] = "taylor_vector"
    variant: ClassVar[str] = "vector"


@register_score
@dataclasses.dataclass(frozen=True)
class TaylorElement2(_Taylor):
    """Second-order term alone: sum of |W * F * W| per channel (F = mean per-sample g^2)."""

    name: ClassVar[str] = "taylor_element2"
    variant: ClassVar[str] = "element2"
    second_order: ClassVar[bool] = True


@register_score
@dataclasses.dataclass(frozen=True)
class TaylorMix(_Taylor):
    """First and second order together: sum of |W * g - W * F * W / 2| per channel."""

    name: ClassVar[str] = "taylor_mix"
    variant: ClassVar[str] = "mix"
    second_order: ClassVar[bool] = True


@register_score
@dataclasses.dataclass(frozen=True)
class L2(WeightNorm):
    """LLM-Pruner's L2 baseline: per member the sum of a channel's squared weights (as
    `weight_norm`, without its square root), members averaged (`MagnitudeImportance(p=2)`,
    `group_reduction = "mean"`). Norm scales take part as in the reference (they do only in
    hidden-channel groups)."""

    name: ClassVar[str] = "l2"
    reduction: ClassVar[str] = "mean"

    def finish(self, values):
        return values


@register_score
@dataclasses.dataclass(frozen=True)
class RandomScore(Score):
    """Uniform random importance (the random baseline), reproducible per (seed, layer, kind)."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def __call__(self, model, group, stats: Stats | None = None) -> np.ndarray:
        layer = -1 if group.layer is None else group.layer
        rng = np.random.default_rng([self.seed, layer + 1, KINDS.index(group.kind)])
        return rng.random(group.size).astype(np.float32)


def _per_layer(model, kind: str, score: Score, stats: Stats) -> list[list[float] | None]:
    out = []
    for i in range(len(model.layers)):
        try:
            group = find_group(model, kind, i)
        except UserError:  # a layer with no heads (or no MLP) left
            out.append(None)
            continue
        out.append([float(v) for v in score(model, group, stats)])
    return out


def taylor_importance(model, tokens, variants: Sequence[str] = VARIANTS, *,
                      batch_size: int | None = None) -> dict[str, Any]:
    """Every layer's Taylor scores from one gradient pass over `tokens [n, T]`: `taylor_mlp` and
    `taylor_kv` (element1; per layer a list, one float per MLP neuron / KV group; None for a
    layer without that group), then `taylor_mlp_<variant>` / `taylor_kv_<variant>` for each other
    variant asked for, `loss` (the mean CE of the pass) and `seconds` (the pass's wall time)."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown Taylor variant(s) {', '.join(map(repr, bad))}; known: "
                        f"{', '.join(VARIANTS)}")
    wanted = ("element1", *(v for v in variants if v != "element1"))
    grads = gradient_pass(model, tokens, batch_size=batch_size,
                          second_order=any(v in ("element2", "mix") for v in wanted))
    out: dict[str, Any] = {}
    for variant in wanted:
        suffix = "" if variant == "element1" else f"_{variant}"
        score = get_score(SCORE_OF_VARIANT[variant])
        for kind in ("mlp", "kv"):
            out[f"taylor_{kind}{suffix}"] = _per_layer(model, kind, score, grads.stats)
    out["loss"] = grads.loss
    out["seconds"] = grads.seconds + grads.seconds_sq
    return out
