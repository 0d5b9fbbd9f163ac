"""Scores from weights and calibration activations.

- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695; code locuslab/wanda): `|W_ij| * ||X_i||_2` per weight, `X_i` the i-th input
  column of the projection over all calibration tokens (`wanda(kernel, sumsq)`; kernels are
  `[in, out]`). Its statistic is `collectors.InputSumSq` of each projection's input.
- `wanda` as a structured score: for every projection of a group, the Wanda scores of the
  weights a channel owns (its output column, or its input row), summed; the channel's importance
  is the sum over the group's projections. Members without an input activation (the embedding,
  norm scales, the output head) take no part. This is the structured use of Wanda's metric that
  FLAP / Wanda-sp compare against; it serves any group kind (neurons, heads, KV groups, hidden
  channels).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from nnxprune.calibration.collectors import InputSumSq
from nnxprune.graph.targets import PROJECTIONS
from nnxprune.scoring.base import Score, layer_of, member_array, other_axes_sum, register_score


def wanda(kernel, sumsq) -> jnp.ndarray:
    """`|W| * ||X_j||` per weight of `kernel [in, out]`; `sumsq [in]` = sum over tokens of x_j^2."""
    return jnp.abs(kernel) * jnp.sqrt(sumsq)[:, None]


@register_score
@dataclasses.dataclass(frozen=True)
class WandaScore(Score):
    """Structured Wanda: sum of `|W| * ||X||` over the weights each channel owns."""

    name: ClassVar[str] = "wanda"

    def collectors(self) -> tuple:
        return (InputSumSq(names=PROJECTIONS),)

    def member(self, model, member, stats):
        layer, name = layer_of(member)
        if layer is None or name not in PROJECTIONS:
            return None
        sumsq = stats[layer][InputSumSq.name][name]
        return other_axes_sum(wanda(member_array(model, member).astype(jnp.float32), sumsq),
                              member.axis)
