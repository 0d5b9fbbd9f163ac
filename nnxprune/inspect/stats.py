"""Per-matrix statistics of a (pruned) model: shape, exact zeros, and the pattern of the zeros.

`kernel_stats(matrix, mask)` reads one weight matrix; `linear_stats` / `embed_stats` read a
`Linear` (kernel `[in, out]`) or the embedding `[V, D]`; `matrix_stats(model)` reads all of them,
in model order. Each gives a `MatrixStats`: shape, parameter count, the exact fraction of zeros in
the *effective* matrix (mask applied) and the pattern of those zeros (`dense`, `N:M`, `structured`
or `unstructured`).

Example:
    >>> stats = linear_stats(model.layers[0].mlp.up_proj, path="layers.0.mlp.up_proj", layer=0)
    >>> stats.label                       # '576x1536, 884,736 params, 50.0%, 2:4'
    >>> detect_nm(zero_map(kernel, mask)) # (2, 4), or None

How the pattern is read (`kernel_stats`). The sparsity counts the entries of the effective kernel
that are exactly 0 (pruned by a mask, or a weight that is 0 itself). The pattern of the zeros
(those of the mask, when there is one; see below) is, in this order:
1. no zeros: `dense`;
2. every zero lies in a whole zero row (input channel) or whole zero column (output channel):
   `structured` (channel / head pruning that has not been sliced away yet);
3. `N:M` along the input dimension (axis 0 of the `[in, out]` kernel, the axis that N:M sparse
   tensor cores reduce over): for M in (4, 8), every group of M consecutive input entries of an
   output column has at most N non-zeros, where N is the largest count seen. The pattern is
   reported only when it is what the mask *is*, i.e. at least half the groups have exactly N
   non-zeros: a 90% unstructured mask trivially satisfies 5:8 somewhere in every group, yet is not
   an N:M mask. Among the M that qualify the tightest (smallest N/M) wins, ties going to the
   smaller M (a 2:4 mask also satisfies 4:8; it is reported as 2:4);
4. otherwise `unstructured`.
The pattern describes what was pruned: when a `Linear` holds a mask it is read from the mask's
zeros alone, exactly. Without a mask (an unpruned model, or masks folded into the kernels) it is
read from the weights' exact zeros, and scattered zeros up to 2% (`INCIDENTAL_ZEROS`) are not
taken for pruning: dequantized GGUF weights hold exact zeros of their own (SmolLM2's Q4_1 about
0.03% per matrix, its embedding 1.0%; a symmetric Q4_0 would hold several percent and read as
`unstructured`). Zero counts and sparsities are always exact, whatever the pattern says.
Everything is vectorized numpy on the host: about 0.5 s for the 135M parameters of SmolLM2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from nnxprune.layers import Embed, Linear

NM_GROUP_SIZES = (4, 8)
# Scattered exact zeros up to this fraction of an unmasked matrix are not taken for pruning
# (dequantized GGUF weights have some: see the module docstring).
INCIDENTAL_ZEROS = 0.02
DENSE, NM, STRUCTURED, UNSTRUCTURED = "dense", "N:M", "structured", "unstructured"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixStats:
    """Statistics of one weight matrix (a `Linear` kernel `[in, out]`, or the embedding `[V, D]`)."""

    path: str                     # "layers.3.self_attn.q_proj"
    kind: str                     # "linear" | "embed"
    layer: int | None             # decoder layer index, None outside the decoder layers
    shape: tuple[int, int]
    zeros: int                    # exact zeros of the effective matrix (mask applied)
    pattern: str                  # DENSE | NM | STRUCTURED | UNSTRUCTURED
    nm: tuple[int, int] | None    # (N, M) when pattern == NM
    # Whole zero rows (input channels of a kernel) and columns (output channels) of the pruned
    # pattern: the mask's when there is one, else the weights'.
    zero_rows: int
    zero_cols: int
    masked: bool                  # holds a Mask variable
    in_space: str = ""
    out_space: str = ""
    in_unit: int = 1
    out_unit: int = 1

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def sparsity_label(self) -> str:
        """'dense', '50.0%, 2:4', '30.0%, unstructured', '25.0%, structured (1/4 heads out)'."""
        pct = f"{100 * self.sparsity:.1f}%"
        if self.pattern == DENSE:
            return DENSE if self.zeros == 0 else f"dense ({100 * self.sparsity:.2g}% zero)"
        if self.pattern == NM:
            return f"{pct}, {self.nm[0]}:{self.nm[1]}"
        if self.pattern == STRUCTURED:
            if self.zeros == self.params:
                return f"{pct}, all zero"
            parts = []
            if self.zero_cols:
                parts.append(_channels(self.zero_cols, self.shape[1], self.out_unit, "out"))
            if self.zero_rows:
                parts.append(_channels(self.zero_rows, self.shape[0], self.in_unit, "in"))
            return f"{pct}, structured ({', '.join(parts)})"
        return f"{pct}, {self.pattern}"

    @property
    def label(self) -> str:
        """One line for a tree view or a table: '576x1536, 884,736 params, 50.0%, 2:4'."""
        return f"{self.shape[0]}x{self.shape[1]}, {self.params:,} params, {self.sparsity_label}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(shape=list(self.shape), nm=None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}",
                 params=self.params, sparsity=self.sparsity, label=self.sparsity_label)
        return d


def _channels(n_zero: int, n: int, unit: int, side: str) -> str:
    if unit > 1 and n_zero % unit == 0:
        return f"{n_zero // unit}/{n // unit} heads {side}"
    return f"{n_zero}/{n} {side}"


def to_host(x) -> np.ndarray:
    """A host numpy copy of an array (a jax array is fetched from its device)."""
    return np.asarray(jax.device_get(x))


def zero_map(matrix, mask=None) -> np.ndarray:
    """Boolean `[rows, cols]`: True where the effective matrix (`matrix * mask`) is exactly zero.

    `mask` may be bool or float, of the matrix's shape or broadcastable to it (a channel mask
    `[D]` of an embedding); masked-out entries count as zero whatever the weight is.
    """
    z = to_host(matrix) == 0
    if mask is not None:
        z = z | np.broadcast_to(to_host(mask) == 0, z.shape)
    return z


def detect_nm(zero: np.ndarray, group_sizes: Sequence[int] = NM_GROUP_SIZES,
              min_exact_fraction: float = 0.5) -> tuple[int, int] | None:
    """The tightest N:M pattern of a zero map `[in, out]` along axis 0, or None.

    N:M follows the library's convention (`nnxprune.algorithms.masks`): N of every M consecutive
    inputs are pruned, so "3:4" is 75% sparse. For each M dividing `in`, K is the largest number of
    non-zeros in any group of M consecutive rows (per column); the pattern is (M - K):M. It counts
    when 0 < K < M and at least `min_exact_fraction` of the groups have exactly K non-zeros (so it
    describes the mask, not a coincidence of a very sparse one).
    """
    rows, cols = zero.shape
    best = None
    for m in group_sizes:
        if rows % m or rows == 0 or cols == 0:
            continue
        nonzero = m - zero.reshape(rows // m, m, cols).sum(axis=1, dtype=np.int32)
        n = int(nonzero.max())
        if n >= m or n == 0:
            continue
        if np.count_nonzero(nonzero == n) < min_exact_fraction * nonzero.size:
            continue
        if best is None or n / m < best[0] / best[1]:  # strict: ties keep the smaller M
            best = (n, m)
    return None if best is None else (best[1] - best[0], best[1])


def kernel_stats(matrix, mask=None, *, path: str = "", kind: str = "linear", layer: int | None = None,
                 in_space: str = "", out_space: str = "", in_unit: int = 1, out_unit: int = 1,
                 group_sizes: Sequence[int] = NM_GROUP_SIZES,
                 incidental: float = INCIDENTAL_ZEROS) -> MatrixStats:
    """`MatrixStats` of a 2-D weight matrix and its optional mask (see the module docstring).

    `zeros` always counts the exact zeros of the effective matrix. The pattern is read from the
    mask when there is one (what was pruned, exactly), else from the weights' zeros, where
    scattered zeros up to `incidental` (of the matrix, or of the entries outside whole zero rows /
    columns) neither make it `unstructured` nor spoil `structured`.
    """
    zero = zero_map(matrix, mask)
    if zero.ndim != 2:
        raise ValueError(f"{path or 'matrix'}: expected a 2-D matrix, got shape {zero.shape}")
    rows, cols = zero.shape
    zeros = int(np.count_nonzero(zero))
    if mask is None:   # pattern of the weights' zeros, stray ones tolerated
        pattern, nm, zero_rows, zero_cols = _classify(zero, incidental, kind, group_sizes)
    else:              # pattern of what was pruned: the mask, exactly
        pruned = np.broadcast_to(to_host(mask) == 0, zero.shape)
        pattern, nm, zero_rows, zero_cols = _classify(pruned, 0.0, kind, group_sizes)
    return MatrixStats(path=path, kind=kind, layer=layer, shape=(rows, cols), zeros=zeros,
                       pattern=pattern, nm=nm, zero_rows=zero_rows, zero_cols=zero_cols,
                       masked=mask is not None, in_space=in_space, out_space=out_space,
                       in_unit=in_unit, out_unit=out_unit)


def _classify(zero: np.ndarray, incidental: float, kind: str, group_sizes: Sequence[int]
              ) -> tuple[str, tuple[int, int] | None, int, int]:
    """(pattern, (N, M) or None, whole zero rows, whole zero columns) of a zero map."""
    rows, cols = zero.shape
    zeros = int(np.count_nonzero(zero))
    if zeros == 0:
        return DENSE, None, 0, 0
    zero_rows = int(np.count_nonzero(zero.all(axis=1)))
    zero_cols = int(np.count_nonzero(zero.all(axis=0)))
    in_structure = zero_rows * cols + zero_cols * rows - zero_rows * zero_cols
    rest = (rows - zero_rows) * (cols - zero_cols)  # entries outside the zero rows / columns
    if (zero_rows or zero_cols) and zeros - in_structure <= incidental * rest:
        return STRUCTURED, None, zero_rows, zero_cols
    nm = detect_nm(zero, group_sizes) if kind == "linear" else None
    if nm:
        return NM, nm, zero_rows, zero_cols
    return (DENSE if zeros <= incidental * zero.size else UNSTRUCTURED), None, zero_rows, zero_cols


def linear_stats(linear: Linear, *, path: str = "", layer: int | None = None) -> MatrixStats:
    """`MatrixStats` of a `Linear`'s effective kernel."""
    mask = None if linear.mask is None else linear.mask[...]
    return kernel_stats(linear.kernel[...], mask, path=path, kind="linear", layer=layer,
                        in_space=linear.in_space, out_space=linear.out_space,
                        in_unit=linear.in_unit, out_unit=linear.out_unit)


def embed_stats(embed: Embed, *, path: str = "embed_tokens") -> MatrixStats:
    """`MatrixStats` of the embedding `[V, D]` (an optional channel mask `[D]` applied)."""
    mask = getattr(embed, "mask", None)
    return kernel_stats(embed.embedding[...], None if mask is None else mask[...], path=path,
                        kind="embed", in_space=embed.in_space, out_space=embed.out_space)


def path_str(path: Sequence[Any]) -> str:
    """A graph path as a dotted string: ('layers', 3, 'mlp') -> 'layers.3.mlp'."""
    return ".".join(map(str, path))


def _layer_index(path: Sequence[Any]) -> int | None:
    if len(path) >= 2 and path[0] == "layers" and isinstance(path[1], int):
        return path[1]
    return None


def iter_matrices(model: nnx.Module) -> Iterator[tuple[str, int | None, Linear | Embed]]:
    """`(path, layer index or None, module)` for every `Linear` and `Embed` in the model."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Linear, Embed)):
            yield path_str(path), _layer_index(path), node


_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
          "down_proj", "lm_head")


def _model_order(path: str) -> tuple:
    """Sort key: embedding, then layer by layer q, k, v, o, gate, up, down, then the head (the
    graph itself iterates attributes alphabetically)."""
    parts = path.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None
    rank = _ORDER.index(parts[-1]) if parts[-1] in _ORDER else len(_ORDER)
    group = 0 if parts[0] == "embed_tokens" else 1 if layer is not None else 2
    return (group, -1 if layer is None else layer, rank, path)


def matrix_stats(model: nnx.Module) -> list[MatrixStats]:
    """`MatrixStats` of every `Linear` and `Embed` of the model, in model order."""
    out = []
    for path, layer, node in iter_matrices(model):
        if isinstance(node, Linear):
            out.append(linear_stats(node, path=path, layer=layer))
        else:
            out.append(embed_stats(node, path=path))
    return sorted(out, key=lambda m: _model_order(m.path))


def pattern_name(m: MatrixStats) -> str:
    """The pattern of one matrix as a table shows it: '2:4', 'dense', 'structured', ..."""
    return f"{m.nm[0]}:{m.nm[1]}" if m.pattern == NM else m.pattern


def common_pattern(stats: Sequence[MatrixStats]) -> str:
    """'dense'; the one pattern of the sparse matrices ('2:4', or '2:4 in 3/7' when only some of
    them are sparse); or 'mixed'."""
    if not stats:
        return "-"
    sparse = [m for m in stats if m.pattern != DENSE]
    names = {pattern_name(m) for m in sparse}
    if not names:
        return DENSE
    if len(names) > 1:
        return "mixed"
    name = names.pop()
    return name if len(sparse) == len(stats) else f"{name} in {len(sparse)}/{len(stats)}"
