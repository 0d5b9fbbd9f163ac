"""OWL's non-uniform layer sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A
Missing Secret Sauce for Pruning LLMs to High Sparsity", arXiv 2310.05175; code luuyin/OWL).

A layer's outlier ratio is the share of its Wanda scores above `M` times their mean (over all its
projections together, `outlier_ratio`). Ratios are min-max scaled to `[0, 2 * lambda]`, centred,
and each layer gets sparsity `target - (scaled_ratio - mean)` (`owl_allocation`): layers with
more outliers are pruned less, the mean stays at the target and the range is `target +- lambda`.

Example:
    >>> owl_allocation([0.01, 0.03, 0.02], target=0.7, lam=0.08)
    array([0.78, 0.62, 0.7 ])
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def outlier_ratio(scores, m: float) -> float:
    """The share of `scores` (every weight score of one layer, any shape) above `m` x their mean."""
    flat = jnp.concatenate([jnp.ravel(s) for s in scores]) if isinstance(scores, (list, tuple)) \
        else jnp.ravel(scores)
    return float(jnp.mean(flat > m * jnp.mean(flat)))


def owl_allocation(outlier_ratios, target: float, lam: float) -> np.ndarray:
    """Per-layer sparsities from outlier ratios (OWL): min-max scale to [0, 2*lam], centre, and
    subtract from the target, so the mean is the target and the range is target +- lam."""
    r = np.asarray(outlier_ratios, dtype=np.float64)
    spread = r.max() - r.min()
    scaled = np.zeros_like(r) if spread == 0 else (r - r.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1 - target)
    return 1 - density
