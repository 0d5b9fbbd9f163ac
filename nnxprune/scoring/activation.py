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
- `activation` (Minitron: Muralidharan et al., "Compact Language Models via Pruning and Knowledge
  Distillation", arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796): activation-based
  importance with NVIDIA ModelOpt's aggregation. For a channel c of an activation x
  `[samples, tokens, channels]`, `imp_c = sqrt(sum over samples of (mean over tokens of
  |x[s, t, c]|)^2)`, one calibration sequence per sample (`collectors.ChannelMeanAbs`).
  - MLP neuron c of layer i: `imp_c` at the input of `down_proj`.
  - Query head h: the L2 norm of the `imp_c` of its `head_dim` channels at the input of
    `o_proj`; a KV group: the L2 norm over all its query heads' channels there (our extension
    for removing KV heads, which Minitron does not do by default).
  - Hidden channel c: the sum over every RMSNorm inside the decoder layers (input and
    post-attention norms, 2 per layer; not the final norm) of that norm output's `imp_c`.
  ModelOpt's hooks (`modelopt/torch/nas/plugins/megatron.py`, `_linear_fc2_forward_hook` and
  `_emb_layernorm_forward_hook`) read Megatron's `[seq, batch, channels]` layout:
  `x.abs().mean(dim=0)` is the mean over tokens, `.pow(2).sum(dim=0)` the sum over the batch's
  sequences, accumulated over batches; the square root is taken at the end, per norm for hidden
  channels, which then sums the norms' roots. The collection's `prune_width.py`
  (zlab-princeton/llm-pruning-collection, `pruning/minitron/`) applies the same two reductions
  to transformers' `[batch, seq, channels]`, so their roles swap: `mean(dim=0)` averages over
  the batch and `sum(dim=0)` sums over tokens, giving `sum_t (mean_b |x[b, t, c]|)^2`, summed over
  its scorer's batches (and, for hidden channels, over every input and post-attention norm) with
  no square root. Its perplexity scorer runs one sequence per batch (`get_ppl`, `batch_size=1`),
  so a channel's score is `sum over sequences and tokens of x^2`, the squared L2 norm over all
  calibration tokens: an energy, not ModelOpt's norm of per-sequence mean magnitudes, and it
  ranks MLP neurons and hidden channels differently from ModelOpt in general. We follow
  ModelOpt's (and the paper's) definition above.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from nnxprune.calibration.collectors import ChannelMeanAbs, InputSumSq
from nnxprune.graph.targets import PROJECTIONS
from nnxprune.scoring.base import Score, layer_of, member_array, other_axes_sum, register_score

NORMS = ("input_layernorm", "post_attention_layernorm")
MINITRON_TAPS = ("self_attn.o_proj", "mlp.down_proj", *NORMS)  # where `activation` reads


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


@register_score
@dataclasses.dataclass(frozen=True)
class ActivationScore(Score):
    """Minitron's activation importance (module docstring): MLP neurons, query heads, KV groups
    and hidden channels, all from one calibration pass."""

    name: ClassVar[str] = "activation"

    def collectors(self) -> tuple:
        return (ChannelMeanAbs(names=MINITRON_TAPS),)

    def member(self, model, member, stats):
        layer, name = layer_of(member)
        if layer is None or member.axis != 0:
            return None  # outside the decoder layers, or an output side
        imp = stats[layer][ChannelMeanAbs.name]
        if name == "self_attn.o_proj":
            return jnp.square(imp[name])  # a head: the L2 norm of its channels (`__call__`)
        return imp[name] if name == "mlp.down_proj" or name in NORMS else None

    def __call__(self, model, group, stats=None):
        values = super().__call__(model, group, stats)
        return np.sqrt(values) if group.kind in ("q", "kv") else values
