"""Calibration-free channel scores from the weights alone.

`weight_norm`: the L2 norm of every weight a channel owns across all members of its group (for
an MLP neuron: its gate and up columns and its down row; for a query head: its q columns and
o_proj rows). The baseline structured criterion (Li et al., "Pruning Filters for Efficient
ConvNets", 2017, applied per coupled group as in LLM-Pruner's `l2` ablation).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nnxprune.graph import Group, node_at

SCORES = ("weight_norm",)


def weight_norm(model, group: Group) -> np.ndarray:
    """`[group.size]` L2 norms of each channel's weights over every member of the group."""
    total = jnp.zeros((group.size,), jnp.float32)
    for member in group.members:
        node = node_at(model, member.path)
        value = getattr(node, "effective_kernel", None)
        array = value() if value is not None else getattr(node, member.variable)[...]
        array = jnp.moveaxis(array.astype(jnp.float32), member.axis, 0)
        per_entry = jnp.sum(array.reshape(array.shape[0], -1) ** 2, axis=1)
        total = total + per_entry.reshape(group.size, member.unit).sum(axis=1)
    return np.asarray(jnp.sqrt(total))


def channel_scores(model, group: Group, score: str) -> np.ndarray:
    if score == "weight_norm":
        return weight_norm(model, group)
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


def lowest(scores: np.ndarray, count: int, blocks: int = 1) -> np.ndarray:
    """Indices to KEEP after removing the `count` lowest scores (per block when `blocks` > 1:
    `count` from each of `blocks` equal consecutive blocks). Stable: ties drop the earlier index."""
    scores = np.asarray(scores)
    size = scores.size // blocks
    keep = []
    for b in range(blocks):
        block = scores[b * size:(b + 1) * size]
        order = np.argsort(block, kind="stable")
        keep.extend(sorted(b * size + order[count:]))
    return np.asarray(keep, dtype=np.int64)
