"""ShortGPT's Block Influence: how much a decoder layer changes the residual stream.

Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
arXiv 2403.03853. For decoder layer i, `BI_i = 1 - mean over all calibration tokens of
cos(h_in, h_out)`, `h_in` the residual stream entering the layer and `h_out` the one leaving it
(before the final norm for the last layer), float32, every token of every calibration sequence
(no BOS handling, no padding). A layer whose output points where its input did does little;
ShortGPT removes the layers of lowest BI in one shot.

The statistic is `calibration.collectors.BlockInfluence`, gathered on the dense model in one
pass of the sequential driver. The collection's `prune_depth.py` (zlab-princeton/llm-pruning-
collection) averages the per-forward means over the batches its scorer runs instead: perplexity
windows (`get_ppl`, one sequence of `seq_len` tokens per batch) or an lm-eval task's requests; with
one sequence length per pass the two agree, and the definition above is the paper's.

Example:
    >>> stats = collect_statistics(model, tokens, get_score("block_influence").collectors())
    >>> get_score("block_influence")(model, find_group(model, "layer", 3), stats)   # [1]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from nnxprune.calibration.collectors import BlockInfluence
from nnxprune.scoring.base import Score, register_score


@register_score
@dataclasses.dataclass(frozen=True)
class BlockInfluenceScore(Score):
    """`1 - mean cos(h_in, h_out)` of a whole decoder layer (`layer` groups)."""

    name: ClassVar[str] = "block_influence"
    kinds: ClassVar[tuple[str, ...]] = ("layer",)

    def collectors(self) -> tuple:
        return (BlockInfluence(),)

    def member(self, model, member, stats):
        return jnp.asarray([stats[int(member.path[1])][BlockInfluence.name]], jnp.float32)
