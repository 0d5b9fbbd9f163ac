"""Keep-mask selection from importance scores: unstructured and N:M.

Conventions (those of the Wanda and SparseGPT reference code): a kernel is `[in, out]`; an N:M
pattern prunes (zeroes) the N lowest-scoring weights of every M consecutive weights along the
INPUT dimension, for each output channel, so its sparsity is N/M ("2:4" = 50%, "3:4" = 75%).
Ties are broken by position (stable sort), so results are deterministic.

Example:
    >>> keep = nm_keep(np.abs(kernel), n=2, m=4)           # 2:4
    >>> keep = unstructured_keep(np.abs(kernel), 0.5)       # 50% of the whole matrix
"""

from __future__ import annotations

import re

import numpy as np



def parse_nm(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> `(2, 4)`; requires 0 < N < M."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _num_pruned(count: int, sparsity: float) -> int:
    return int(count * sparsity)  # the reference code's rounding (floor)


def unstructured_keep(scores, sparsity: float, *, per_output: bool = False) -> np.ndarray:
    """Keeps all but the `int(sparsity * count)` lowest scores: over the whole matrix, or per
    output channel (column of `[in, out]`; Wanda's per-row comparison group) when `per_output`.

    Runs on the host with NumPy's stable sort (ties prune the lower index first, as the reference
    code's stable sort does); XLA's CPU sort is an order of magnitude slower for this.
    """
    sparsity = check_sparsity(sparsity)
    scores = np.asarray(scores)
    keep = np.ones(scores.shape, dtype=bool)
    if per_output:
        k = _num_pruned(scores.shape[0], sparsity)
        order = np.argsort(scores, axis=0, kind="stable")[:k]
        np.put_along_axis(keep, order, False, axis=0)
        return keep
    k = _num_pruned(scores.size, sparsity)
    order = np.argsort(scores.reshape(-1), kind="stable")[:k]
    keep.reshape(-1)[order] = False
    return keep


def nm_keep(scores, n: int, m: int) -> np.ndarray:
    """Prunes the `n` lowest of every `m` consecutive scores along axis 0 (the input dim)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    scores = np.asarray(scores)
    rows, cols = scores.shape
    if rows % m:
        raise ValueError(f"input dimension {rows} is not a multiple of M={m}")
    blocks = scores.reshape(rows // m, m, cols)
    keep = np.ones(blocks.shape, dtype=bool)
    order = np.argsort(blocks, axis=1, kind="stable")[:, :n]
    np.put_along_axis(keep, order, False, axis=1)
    return keep.reshape(rows, cols)


def sparsity_of(keep) -> float:
    keep = np.asarray(keep)
    return float(1.0 - keep.mean()) if keep.size else 0.0
