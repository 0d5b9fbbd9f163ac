"""FLAP's fluctuation metric: how much a structure's input varies, weighted by its weights.

An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP,
AAAI 2024, arXiv 2312.11983; code CASIA-IVA-Lab/FLAP, `lib/prune.py`, `lib/layerwrapper.py`).
A structure is removed where the model's output barely fluctuates without it: a channel `j` of
the input of a residual writer (o_proj, down_proj) whose value hardly moves across calibration
tokens can be replaced by its mean, and the mean's contribution `mean_j * W[j, :]` is put back as a
bias (`nnxprune.transforms.flap`). Per input channel `j` of o_proj / down_proj (kernel `[in, out]`):

- `wifv` (the paper's, "weighted input feature variance"): `var_j * sum_o W[j, o]^2`, `var_j` the
  sample variance of the channel over all calibration tokens;
- `ifv`: `var_j` alone;
- `wifn` ("weighted input feature norm", Wanda-like): `mean_o |W[j, o]| * sqrt(mean x_j^2)`.

`InputMoments` gathers what all three need in one pass: per sequence the channel's sum and its sum
of squared deviations from the sequence's mean, combined exactly in float64 (Chan et al.'s
pairwise update) into the mean, the unbiased variance and the sum of squares over all tokens.

The registered scores `flap_wifv`, `flap_ifv` and `flap_wifn` rank heads and neurons as the
reference's uniform setting ("UL-UM") does: an MLP neuron by its down_proj channel's metric; a
query head (`q`) or a KV group (`kv`) by the sum over its o_proj channels of the metric *squared*
(the reference squares the attention metric, `metrics[...](...) ** 2`). They work in every
structured transform and in `wanda_sp` (`score = "flap_wifv"`: FLAP's UL-UM, without the bias).
FLAP's adaptive setting (standardized scores, one global threshold) is the `flap` transform.

Departures from the reference, none of which changes a ranking within a layer: its variance is a
running estimate over sequences (the first sequence counts zero, later ones deviate from the
running mean) where this is the exact sample variance; its `wifn` divides the sum of squares by the
number of sequences where this divides by the number of tokens (a constant factor per layer).

Example:
    >>> stats = collect_statistics(model, tokens, get_score("flap_wifv").collectors())
    >>> get_score("flap_wifv")(model, find_group(model, "mlp", 3), stats)    # [neurons]
    >>> channel_metric(model, 3, "mlp.down_proj", stats, "wifv")              # [neurons]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from nnxprune.calibration.collectors import Collector
from nnxprune.scoring.base import Score, Stats, layer_of, register_score

TAPS = ("self_attn.o_proj", "mlp.down_proj")  # the residual writers, read at their inputs
METRICS = ("wifv", "ifv", "wifn")


@dataclasses.dataclass(frozen=True)
class InputMoments(Collector):
    """`{name: {"mean", "var", "sumsq", "tokens"}}`: the mean, unbiased variance and sum of
    squares (`[in]` float32) of every input channel of the projections `names` over all `tokens`
    calibration tokens."""

    names: tuple[str, ...] = TAPS
    name: ClassVar[str] = "moments"
    combine: ClassVar[str] = "stack"  # per sequence, combined exactly in `finish`

    def taps(self, index: int) -> tuple[str, ...]:
        return self.names

    def row(self, names, taps, x_in, x_out):
        out = {}
        for n in names:
            x = taps[n]  # [T, C]
            total = jnp.sum(x, axis=0)
            m2 = jnp.sum(jnp.square(x - total / x.shape[0]), axis=0)
            out[n] = jnp.stack([total, m2])  # [2, C]
        return out

    def finish(self, total, sequences, tokens):
        per = tokens // sequences  # tokens of one sequence (all are equally long)
        out = {}
        for n, v in total.items():
            v = np.asarray(v, np.float64)  # [N, 2, C]
            sums, m2 = v[:, 0], v[:, 1]
            mean = sums.sum(axis=0) / tokens
            m2 = m2.sum(axis=0) + per * np.square(sums / per - mean).sum(axis=0)
            out[n] = {"mean": mean.astype(np.float32),
                      "var": (m2 / max(tokens - 1, 1)).astype(np.float32),
                      "sumsq": (m2 + tokens * mean * mean).astype(np.float32), "tokens": tokens}
        return out


def fluctuation(kernel, moments: dict, metric: str) -> np.ndarray:
    """The metric of every input channel `[in]` of a projection with kernel `[in, out]`, from its
    `InputMoments`."""
    if metric not in METRICS:
        raise ValueError(f"unknown FLAP metric {metric!r}; known: {', '.join(METRICS)}")
    w = np.asarray(kernel, np.float32)
    var = np.asarray(moments["var"], np.float32)
    if metric == "ifv":
        return var
    if metric == "wifv":
        return var * np.sum(w * w, axis=1)
    mean_sq = np.asarray(moments["sumsq"], np.float32) / float(moments["tokens"])
    return np.mean(np.abs(w), axis=1) * np.sqrt(mean_sq)


def channel_metric(model, layer: int, name: str, stats: Stats, metric: str) -> np.ndarray:
    """FLAP's metric of every input channel of `name` (a `TAPS` entry) in decoder layer `layer`,
    squared for o_proj as the reference does before ranking heads."""
    lin = model.layers[layer]
    for part in name.split("."):
        lin = getattr(lin, part)
    values = fluctuation(lin.effective_kernel(), stats[layer][InputMoments.name][name], metric)
    return values * values if name == "self_attn.o_proj" else values


@dataclasses.dataclass(frozen=True)
class FLAPScore(Score):
    """FLAP's metric of a neuron's down_proj channel, or the sum of the squared metric over a
    head's (KV group's) o_proj channels (module docstring)."""

    metric: ClassVar[str] = "wifv"
    kinds: ClassVar[tuple[str, ...]] = ("mlp", "kv", "q")

    def collectors(self) -> tuple:
        return (InputMoments(),)

    def member(self, model, member, stats):
        layer, name = layer_of(member)
        if layer is None or member.axis != 0 or name not in TAPS:
            return None
        return jnp.asarray(channel_metric(model, layer, name, stats, self.metric))


@register_score
@dataclasses.dataclass(frozen=True)
class FLAPWIFV(FLAPScore):
    name: ClassVar[str] = "flap_wifv"
    metric: ClassVar[str] = "wifv"


@register_score
@dataclasses.dataclass(frozen=True)
class FLAPIFV(FLAPScore):
    name: ClassVar[str] = "flap_ifv"
    metric: ClassVar[str] = "ifv"


@register_score
@dataclasses.dataclass(frozen=True)
class FLAPWIFN(FLAPScore):
    name: ClassVar[str] = "flap_wifn"
    metric: ClassVar[str] = "wifn"
