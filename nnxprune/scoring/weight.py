"""Calibration-free scores from the weights alone.

- `magnitude(kernel)`: |W| per weight (the Magnitude pruning baseline; one threshold per matrix
  or N:M along the inputs, in `transforms.magnitude`).
- `weight_norm` (structured): the L2 norm of every weight a channel owns across all members of
  its group (for an MLP neuron: its gate and up columns and its down row; for a query head: its
  q columns and o_proj rows). The baseline structured criterion (Li et al., "Pruning Filters for
  Efficient ConvNets", 2017, applied per coupled group as in LLM-Pruner's `l2` ablation).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from nnxprune.scoring.base import Score, member_array, other_axes_sum, register_score


def magnitude(kernel) -> jnp.ndarray:
    """|W| per weight."""
    return jnp.abs(kernel)


@register_score
@dataclasses.dataclass(frozen=True)
class WeightNorm(Score):
    """sqrt of the sum of squares of a channel's weights over every member of its group."""

    name: ClassVar[str] = "weight_norm"

    def member(self, model, member, stats):
        return other_axes_sum(jnp.square(member_array(model, member).astype(jnp.float32)),
                              member.axis)

    def finish(self, values):
        return jnp.sqrt(values)
