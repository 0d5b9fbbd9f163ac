"""Wanda-sp: Wanda's metric summed over a structure, read where the structure enters the residual.

The structured Wanda baseline of An et al., "Fluctuation-based Adaptive Structured Pruning for
Large Language Models" (FLAP, AAAI 2024, arXiv 2312.11983; code CASIA-IVA-Lab/FLAP,
`lib/prune.py`, `prune_wanda_sp`), built on Wanda (Sun et al., arXiv 2306.11695). Per weight of
the two projections that write the residual stream, `|W_ij| * ||X_j||_2` with `X_j` input column
`j` over all calibration tokens (`collectors.InputSumSq`); a structure's importance is the sum of
the scores of its input weights there:

- an MLP neuron (`mlp[i]`): its row of `down_proj` (kernel `[in, out]`, one input channel);
- a query head (`q[i]`): its `head_dim` rows of `o_proj`;
- a KV group (`kv[i]`): the `o_proj` rows of all the query heads that share the KV head.

Nothing else takes part: not q / k / v / gate / up (their outputs), not the norms. That is what
separates it from the `wanda` score (`scoring.activation`), which sums Wanda scores over every
member of the group.

The reference (multi-head LLaMA) takes a head to be a q, k and v head with its o_proj columns, so
the KV group is its grouped-query counterpart (the same thing when every KV head has one query
head). Two constant factors of the reference are left out, since neither changes which structure
of a layer ranks lower: it averages the weight scores over the `D` output rows where we sum, and
its `scaler_row` is the sum of squares divided by the number of calibration sequences.

A score like any other (`nnxprune.scoring.base`): the structured transforms take it by name
(`shrink_mlp`, `remove_query_heads`, `remove_kv_groups` with `score = "wanda_sp"`, ranking on the
dense model), and the `wanda_sp` transform (`nnxprune.transforms.wanda_sp`) runs it as the
reference does, layer by layer on the outputs of the already pruned layers. A FLAP-style metric
registers beside it the same way.

Example:
    >>> stats = collect_statistics(model, tokens, get_score("wanda_sp").collectors())
    >>> get_score("wanda_sp")(model, find_group(model, "mlp", 3), stats)     # [neurons]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from nnxprune.calibration.collectors import InputSumSq
from nnxprune.scoring.activation import wanda
from nnxprune.scoring.base import Score, layer_of, member_array, other_axes_sum, register_score

TAPS = ("self_attn.o_proj", "mlp.down_proj")  # the residual writers, read at their inputs


@register_score
@dataclasses.dataclass(frozen=True)
class WandaSP(Score):
    """Wanda-sp: the Wanda scores of a head's o_proj rows or a neuron's down_proj row, summed."""

    name: ClassVar[str] = "wanda_sp"
    kinds: ClassVar[tuple[str, ...]] = ("mlp", "kv", "q")

    def collectors(self) -> tuple:
        return (InputSumSq(names=TAPS),)

    def member(self, model, member, stats):
        layer, name = layer_of(member)
        if layer is None or member.axis != 0 or name not in TAPS:
            return None
        sumsq = stats[layer][InputSumSq.name][name]
        return other_axes_sum(wanda(member_array(model, member).astype(jnp.float32), sumsq), 0)
