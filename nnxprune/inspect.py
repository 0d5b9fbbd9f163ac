"""Inspecting a (pruned) model: how sparse each matrix is, which widths are left, and how much.

Four views of the same facts, all built from one `Summary`:

- `summarize(model)` reads every mask-aware `Linear` (and the embedding): shape, parameter count,
  the exact fraction of zeros in the *effective* kernel (mask applied) and the pattern of those
  zeros (`dense`, `N:M`, `structured` or `unstructured`); and per decoder layer its query heads, KV
  heads, MLP width, parameters and sparsity. With a source config (the unpruned model) it also
  gives the ratios to it; `count_params(config)` counts a config's parameters analytically.
- `Summary.to_text()` / `Summary.to_markdown()`: the per-layer table with totals.
- `render_html(model)`: the treescope view of the model where every `Linear` (and decoder layer,
  embedding, the model itself) carries its statistics on its first line, collapsed or expanded,
  under a copy of the summary table.
- `plot_summary(summary, path)`: a PNG of per-layer widths and sparsity.

`inspect_model(model, html=..., markdown=..., png=...)` does all of it and writes the files
atomically; it is what `nnxprune inspect` calls.

Example:
    >>> summary = inspect_model(model, source_config=source.config, html="out/model.html",
    ...                         markdown="out/model.md", png="out/model.png")
    >>> print(summary.to_text())
    >>> summary.linears[0].label          # '576x576, 331,776 params, 50.0%, 2:4'

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
import html as html_lib
import io
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from nnxprune.io import atomic
from nnxprune.io.atomic import write_text
from nnxprune.io.hf_config import config_from_hf
from nnxprune.layers import Embed, Linear
from nnxprune.models.llama import DecoderLayer, LayerShape, Llama, LlamaConfig

NM_GROUP_SIZES = (4, 8)
# Scattered exact zeros up to this fraction of an unmasked matrix are not taken for pruning
# (dequantized GGUF weights have some: see the module docstring).
INCIDENTAL_ZEROS = 0.02
DENSE, NM, STRUCTURED, UNSTRUCTURED = "dense", "N:M", "structured", "unstructured"


# -- per-matrix statistics ----------------------------------------------------------------------
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


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def zero_map(matrix, mask=None) -> np.ndarray:
    """Boolean `[rows, cols]`: True where the effective matrix (`matrix * mask`) is exactly zero.

    `mask` may be bool or float, of the matrix's shape or broadcastable to it (a channel mask
    `[D]` of an embedding); masked-out entries count as zero whatever the weight is.
    """
    z = _host(matrix) == 0
    if mask is not None:
        z = z | np.broadcast_to(_host(mask) == 0, z.shape)
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
        pruned = np.broadcast_to(_host(mask) == 0, zero.shape)
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


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(map(str, path))


def _layer_index(path: Sequence[Any]) -> int | None:
    if len(path) >= 2 and path[0] == "layers" and isinstance(path[1], int):
        return path[1]
    return None


def iter_matrices(model: nnx.Module) -> Iterator[tuple[str, int | None, Linear | Embed]]:
    """`(path, layer index or None, module)` for every `Linear` and `Embed` in the model."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Linear, Embed)):
            yield _path_str(path), _layer_index(path), node


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


# -- parameter counts ---------------------------------------------------------------------------
def layer_params(config: LlamaConfig, shape: LayerShape) -> int:
    """Parameters of one decoder layer: q/k/v/o, gate/up/down and its two RMSNorm scales."""
    d, dh = config.hidden_size, config.head_dim
    attn = d * dh * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    mlp = 3 * d * shape.intermediate_size
    return attn + mlp + 2 * d


def count_params(config: LlamaConfig) -> int:
    """Parameters of a `Llama` built from `config`, computed from the config alone.

    Embedding `V*D`, per layer `layer_params`, the final norm `D`, and `D*V` for an untied
    `lm_head`. Masks are not parameters.
    """
    v, d = config.vocab_size, config.hidden_size
    head = 0 if config.tie_word_embeddings else d * v
    return v * d + sum(layer_params(config, s) for s in config.layers) + d + head


def _param_count(node) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(node, nnx.Param))))


# -- the summary --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSummary:
    """One decoder layer: its widths, parameters and the sparsity of its seven Linears."""

    index: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    params: int            # all parameters of the layer (norms included)
    linear_params: int     # entries of its Linear kernels
    zeros: int             # exact zeros among them
    pattern: str           # the common sparsity pattern of its Linears ('2:4', 'dense', 'mixed', ...)
    source: LayerShape | None = None   # the matching source layer, when known
    source_params: int | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.linear_params if self.linear_params else 0.0

    @property
    def nonzero_params(self) -> int:
        return self.params - self.zeros

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(sparsity=self.sparsity, nonzero_params=self.nonzero_params)
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Everything `inspect` reports about a model; render with `to_text` / `to_markdown`."""

    config: LlamaConfig
    layers: tuple[LayerSummary, ...]
    matrices: tuple[MatrixStats, ...]
    params: int                 # all parameters (nnx.Param elements)
    source_config: LlamaConfig | None = None
    hidden_kept: int | None = None   # hidden channels kept by an embedding channel mask

    # -- derived totals --
    @property
    def linears(self) -> tuple[MatrixStats, ...]:
        return tuple(m for m in self.matrices if m.kind == "linear")

    @property
    def source_params(self) -> int | None:
        return None if self.source_config is None else count_params(self.source_config)

    @property
    def params_ratio(self) -> float | None:
        src = self.source_params
        return self.params / src if src else None

    @property
    def zeros(self) -> int:
        """Exact zeros over all weight matrices (Linears and the embedding)."""
        return sum(m.zeros for m in self.matrices)

    @property
    def nonzero_params(self) -> int:
        return self.params - self.zeros

    @property
    def nonzero_ratio(self) -> float | None:
        src = self.source_params
        return self.nonzero_params / src if src else None

    @property
    def linear_params(self) -> int:
        return sum(m.params for m in self.linears)

    @property
    def linear_zeros(self) -> int:
        return sum(m.zeros for m in self.linears)

    @property
    def linear_sparsity(self) -> float:
        n = self.linear_params
        return self.linear_zeros / n if n else 0.0

    @property
    def pattern(self) -> str:
        return _common_pattern(self.linears)

    def matrix(self, path: str) -> MatrixStats:
        for m in self.matrices:
            if m.path == path:
                return m
        raise KeyError(f"no matrix at {path!r}; known: {[m.path for m in self.matrices]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for report files)."""
        return {
            "config": self.config.to_dict(),
            "source_config": None if self.source_config is None else self.source_config.to_dict(),
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "source_params": self.source_params,
            "params_ratio": self.params_ratio,
            "nonzero_ratio": self.nonzero_ratio,
            "linear_params": self.linear_params,
            "linear_zeros": self.linear_zeros,
            "linear_sparsity": self.linear_sparsity,
            "pattern": self.pattern,
            "hidden_kept": self.hidden_kept,
            "layers": [layer.to_dict() for layer in self.layers],
            "matrices": [m.to_dict() for m in self.matrices],
        }

    # -- rendering --
    def headline(self) -> list[str]:
        """A few lines above the table: architecture, parameters, sparsity, ratio to the source."""
        c, s = self.config, self.source_config
        hidden = f"hidden {c.hidden_size}"
        if self.hidden_kept is not None and self.hidden_kept != c.hidden_size:
            hidden += f" ({self.hidden_kept} kept by the channel mask)"
        layers = f"{c.num_layers} layers"
        if s is not None and s.num_layers != c.num_layers:
            layers = f"{c.num_layers} of {s.num_layers} layers ({s.num_layers - c.num_layers} removed)"
        lines = [f"model: {layers}, {hidden}, head_dim {c.head_dim}, vocab {c.vocab_size}, "
                 f"{'tied' if c.tie_word_embeddings else 'untied'} embeddings"]
        params = f"parameters: {self.params:,}"
        if s is not None:
            params += f" = {100 * self.params_ratio:.1f}% of the source's {self.source_params:,}"
        lines.append(params)
        nonzero = f"non-zero: {self.nonzero_params:,}"
        if s is not None:
            nonzero += f" = {100 * self.nonzero_ratio:.1f}% of the source"
        lines.append(nonzero + f"; sparsity of the Linear layers {100 * self.linear_sparsity:.1f}%"
                     f" ({self.pattern})")
        return lines

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows (strings) of the per-layer table, totals last."""
        src = self.source_config is not None
        header = ["layer", "q heads", "kv heads", "mlp", "params", "non-zero", "sparsity", "pattern"]
        if src:
            header.append("non-zero vs source")
        rows = []
        for layer in self.layers:
            s = layer.source

            def width(value, ref):
                return f"{value}/{ref}" if src and ref is not None else str(value)

            row = [str(layer.index),
                   width(layer.num_heads, s and s.num_heads),
                   width(layer.num_kv_heads, s and s.num_kv_heads),
                   width(layer.intermediate_size, s and s.intermediate_size),
                   f"{layer.params:,}", f"{layer.nonzero_params:,}", f"{100 * layer.sparsity:.1f}%",
                   layer.pattern]
            if src:
                row.append("" if not layer.source_params
                           else f"{100 * layer.nonzero_params / layer.source_params:.1f}%")
            rows.append(row)
        total_params = sum(layer.params for layer in self.layers)
        total_zeros = sum(layer.zeros for layer in self.layers)
        total_linear = sum(layer.linear_params for layer in self.layers)
        total = ["all layers", str(sum(layer.num_heads for layer in self.layers)),
                 str(sum(layer.num_kv_heads for layer in self.layers)),
                 str(sum(layer.intermediate_size for layer in self.layers)),
                 f"{total_params:,}", f"{total_params - total_zeros:,}",
                 f"{100 * total_zeros / total_linear:.1f}%" if total_linear else "-",
                 _common_pattern([m for m in self.linears if m.layer is not None])]
        if src:
            src_layers = sum(layer_params(self.source_config, s) for s in self.source_config.layers)
            kept = total_params - total_zeros
            total.append(f"{100 * kept / src_layers:.1f}%" if src_layers else "")
        rows.append(total)
        return header, rows

    def to_text(self, *, matrices: bool = False) -> str:
        """The headline and the per-layer table as aligned terminal text (and every matrix)."""
        header, rows = self.table_rows()
        out = self.headline() + [""] + _aligned(header, rows)
        if matrices:
            h, r = self._matrix_rows()
            out += [""] + _aligned(h, r)
        return "\n".join(out) + "\n"

    def to_markdown(self, *, matrices: bool = True, title: str | None = "Model summary") -> str:
        """Markdown: the headline as a list, the per-layer table, and (by default) every matrix."""
        out = [f"## {title}", ""] if title else []
        out += [f"- {line}" for line in self.headline()] + [""]
        header, rows = self.table_rows()
        out += _markdown_table(header, rows)
        if matrices:
            h, r = self._matrix_rows()
            out += ["", "### Matrices", ""] + _markdown_table(h, r)
        return "\n".join(out) + "\n"

    def _matrix_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["matrix", "shape", "params", "sparsity", "pattern", "zero rows", "zero cols"]
        rows = [[m.path, f"{m.shape[0]}x{m.shape[1]}", f"{m.params:,}", f"{100 * m.sparsity:.1f}%",
                 _pattern_name(m), str(m.zero_rows),
                 str(m.zero_cols)] for m in self.matrices]
        return header, rows


def _pattern_name(m: MatrixStats) -> str:
    return f"{m.nm[0]}:{m.nm[1]}" if m.pattern == NM else m.pattern


def _common_pattern(stats: Sequence[MatrixStats]) -> str:
    """'dense'; the one pattern of the sparse matrices ('2:4', or '2:4 in 3/7' when only some of
    them are sparse); or 'mixed'."""
    if not stats:
        return "-"
    sparse = [m for m in stats if m.pattern != DENSE]
    names = {_pattern_name(m) for m in sparse}
    if not names:
        return DENSE
    if len(names) > 1:
        return "mixed"
    name = names.pop()
    return name if len(sparse) == len(stats) else f"{name} in {len(sparse)}/{len(stats)}"


_NUMERIC_COLUMNS = {"q heads", "kv heads", "mlp", "params", "non-zero", "sparsity",
                    "non-zero vs source", "zero rows", "zero cols"}


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(cell.rjust(w) if h in _NUMERIC_COLUMNS else cell.ljust(w)
                         for cell, w, h in zip(row, widths, header)).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---:" if h in _NUMERIC_COLUMNS else ":---" for h in header]
    return (["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(align) + " |"]
            + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _as_config(source) -> LlamaConfig | None:
    """A source given as a `LlamaConfig`, a `Llama`, an nnxprune config dict or an HF config dict."""
    if source is None or isinstance(source, LlamaConfig):
        return source
    if isinstance(source, Llama):
        return source.config
    if isinstance(source, dict):
        return LlamaConfig.from_dict(source) if "layers" in source else config_from_hf(source)
    raise TypeError(f"source config: expected LlamaConfig, Llama or dict, got {type(source).__name__}")


def _source_layer(source: LlamaConfig | None, index: int, num_layers: int) -> LayerShape | None:
    """The source layer a pruned layer is compared with: the same index when no layer was
    removed, else any layer of a uniform source (which layers were removed is not recorded)."""
    if source is None or not source.layers:
        return None
    if source.num_layers == num_layers:
        return source.layers[index]
    return source.layers[0] if source.is_uniform else None


def summarize(model: Llama, *, source_config: LlamaConfig | Llama | dict | None = None) -> Summary:
    """Reads the statistics of `model` (see the module docstring); `source_config` is the unpruned
    model's config (or the model itself), for the ratios."""
    source = _as_config(source_config)
    config = model.config
    matrices = tuple(matrix_stats(model))
    by_layer: dict[int, list[MatrixStats]] = {}
    for m in matrices:
        if m.layer is not None:
            by_layer.setdefault(m.layer, []).append(m)
    layers = []
    for i, (layer, shape) in enumerate(zip(model.layers, config.layers)):
        stats = by_layer.get(i, [])
        src = _source_layer(source, i, config.num_layers)
        layers.append(LayerSummary(
            index=i, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size, params=_param_count(layer),
            linear_params=sum(m.params for m in stats), zeros=sum(m.zeros for m in stats),
            pattern=_common_pattern(stats), source=src,
            source_params=None if src is None else layer_params(source, src)))
    embed_mask = getattr(model.embed_tokens, "mask", None)
    hidden_kept = None if embed_mask is None else int(np.count_nonzero(_host(embed_mask[...])))
    return Summary(config=config, layers=tuple(layers), matrices=matrices,
                   params=_param_count(model), source_config=source, hidden_kept=hidden_kept)


# -- treescope HTML -----------------------------------------------------------------------------
def _zero_note(stats: Sequence[MatrixStats]) -> str:
    params = sum(m.params for m in stats)
    zeros = sum(m.zeros for m in stats)
    return f"{100 * zeros / params if params else 0.0:.1f}% zero ({_common_pattern(stats)})"


def _model_note(summary: Summary) -> str:
    note = (f"{summary.config.num_layers} layers, {summary.params:,} params, "
            f"{summary.nonzero_params:,} non-zero")
    if summary.source_config is not None:
        note += (f" ({100 * summary.params_ratio:.1f}% / {100 * summary.nonzero_ratio:.1f}% of "
                 "the source)")
    return note


def annotation_notes(summary: Summary) -> dict[str, str]:
    """The note shown in the HTML tree for each annotated module, by path ('' is the model)."""
    notes = {"": _model_note(summary), "layers": f"{len(summary.layers)} decoder layers"}
    for m in summary.matrices:
        notes[m.path] = m.label
    for layer in summary.layers:
        i = layer.index
        stats = [m for m in summary.linears if m.layer == i]
        attn = [m for m in stats if ".self_attn." in m.path]
        mlp = [m for m in stats if ".mlp." in m.path]
        notes[f"layers.{i}"] = (f"layer {i}: {layer.num_heads} q heads, {layer.num_kv_heads} kv "
                                f"heads, mlp {layer.intermediate_size}, {layer.params:,} params, "
                                f"{_zero_note(stats)}")
        notes[f"layers.{i}.self_attn"] = (
            f"{layer.num_heads} q heads, {layer.num_kv_heads} kv heads, "
            f"{sum(m.params for m in attn):,} params, {_zero_note(attn)}")
        notes[f"layers.{i}.mlp"] = (f"width {layer.intermediate_size}, "
                                    f"{sum(m.params for m in mlp):,} params, {_zero_note(mlp)}")
    return notes


def _annotation_handler(notes: dict[int, tuple[str, bool]]):
    """A treescope handler that renders the annotated modules like Flax does, with the note of
    `notes[id(node)] = (note, expanded)` on their first line: after `Type(` when collapsed, as a
    `# comment` when expanded. Containers (`expanded`) start open, matrices start folded, so
    the page opens on one line per matrix."""
    import treescope
    from treescope import rendering_parts as rp

    def handler(node, path, subtree_renderer):
        entry = notes.get(id(node))
        if entry is None or not isinstance(node, nnx.Module):
            return NotImplemented
        note, expanded = entry
        # The children Flax shows: public attributes (a List's items are '0', '1', ...).
        attrs = {k: v for k, v in vars(node).items() if not str(k).startswith("_")}
        children = []
        for i, (name, value) in enumerate(attrs.items()):
            child_path = None if path is None else f"{path}.{name}"
            if i < len(attrs) - 1:
                comma = rp.siblings(",", rp.fold_condition(collapsed=rp.text(" ")))
            else:
                comma = rp.fold_condition(expanded=rp.text(","))
            children.append(rp.build_full_line_with_annotations(
                rp.siblings_with_annotations(f"{name}=", subtree_renderer(value, path=child_path)),
                comma))
        prefix = rp.siblings(rp.maybe_qualified_type_name(type(node)), "(",
                             rp.fold_condition(collapsed=rp.comment_color(rp.text(f"[{note}] "))))
        return rp.build_foldable_tree_node_from_children(
            prefix=prefix, children=children, suffix=")", path=path,
            background_color=treescope.formatting_util.color_from_string(type(node).__qualname__),
            first_line_annotation=rp.comment_color(rp.text(f"  # {note}")),
            expand_state=rp.ExpandState.EXPANDED if expanded else rp.ExpandState.COLLAPSED)

    return handler


def render_tree(model: Llama, summary: Summary | None = None, *, fmt: str = "html") -> str:
    """The annotated treescope view of `model`: an HTML fragment (`fmt="html"`, uncompressed, so
    the notes can be searched in the file) or plain text (`fmt="text"`)."""
    import treescope

    from nnxprune.models.llama import MLP, Attention

    summary = summary if summary is not None else summarize(model)
    by_path = annotation_notes(summary)
    open_kinds = (Llama, nnx.List, DecoderLayer, Attention, MLP)
    notes = {}
    for path, node in nnx.iter_graph(model):
        note = by_path.get(_path_str(path))
        if note is not None and isinstance(node, nnx.Module):
            notes[id(node)] = (note, isinstance(node, open_kinds))
    renderer = treescope.active_renderer.get().extended_with(handlers=[_annotation_handler(notes)])
    with treescope.active_renderer.set_scoped(renderer):
        if fmt == "text":
            return treescope.render_to_text(model)
        if fmt == "html":
            return treescope.render_to_html(model, compressed=False)
    raise ValueError(f"fmt must be 'html' or 'text', got {fmt!r}")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr:last-child td {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>{title}</h1>
<ul>
{headline}
</ul>
{table}
<h2>Model tree</h2>
<p>Every <code>Linear</code> shows its shape, parameters and sparsity (fraction of exact zeros
of the masked kernel, and their pattern); every decoder layer its widths. Click to fold.</p>
{tree}
</body>
</html>
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html_lib.escape

    def cell(text: str, column: str) -> str:
        kind = ' class="num"' if column in _NUMERIC_COLUMNS else ""
        return f"<td{kind}>{esc(text)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(cell(c, h) for c, h in zip(r, header)) + "</tr>" for r in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def render_html(model: Llama, summary: Summary | None = None, *,
                title: str = "nnxprune inspect") -> str:
    """A standalone HTML page: the summary table, then the annotated treescope view of `model`."""
    summary = summary if summary is not None else summarize(model)
    header, rows = summary.table_rows()
    return _PAGE.format(
        title=html_lib.escape(title),
        headline="\n".join(f"<li>{html_lib.escape(line)}</li>" for line in summary.headline()),
        table=_html_table(header, rows),
        tree=render_tree(model, summary, fmt="html"))


# -- the plot -----------------------------------------------------------------------------------
_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plot_png(summary: Summary) -> bytes:
    """PNG bytes: per-layer widths (as fractions of the source when it is known) and sparsity."""
    # A bare Figure renders through Agg without pyplot: no global backend switch, no GUI.
    from matplotlib.figure import Figure

    layers = summary.layers
    x = np.arange(len(layers))
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 3), 6.5), layout="constrained")
    ax_w, ax_s = fig.subplots(2, 1, sharex=True)
    series = [("query heads", [layer.num_heads for layer in layers],
               [layer.source.num_heads if layer.source else None for layer in layers]),
              ("KV heads", [layer.num_kv_heads for layer in layers],
               [layer.source.num_kv_heads if layer.source else None for layer in layers]),
              ("MLP width", [layer.intermediate_size for layer in layers],
               [layer.source.intermediate_size if layer.source else None for layer in layers])]
    relative = bool(layers) and all(layer.source is not None for layer in layers)
    bar = 0.27
    if relative:
        for k, (name, values, refs) in enumerate(series):
            ax_w.bar(x + (k - 1) * bar, [v / r if r else 0.0 for v, r in zip(values, refs)], bar,
                     label=name)
        ax_w.set_ylabel("width / source")
        ax_w.set_ylim(0, 1.05)
        ax_w.axhline(1.0, color="gray", lw=0.8, ls=":")
    else:
        for k, (name, values, _) in enumerate(series[:2]):
            ax_w.bar(x + (k - 0.5) * bar, values, bar, label=name, color=f"C{k}")
        ax_w.set_ylabel("heads")
        ax_m = ax_w.twinx()
        ax_m.plot(x, series[2][1], "o-", color="C2", label="MLP width")
        ax_m.set_ylabel("MLP width")
        ax_m.set_ylim(0, max(series[2][1] or [1]) * 1.1)
        handles = ax_w.get_legend_handles_labels()
        more = ax_m.get_legend_handles_labels()
        ax_w.legend(handles[0] + more[0], handles[1] + more[1], **_LEGEND)
    if relative:
        ax_w.legend(**_LEGEND)
    ax_w.set_title("Per-layer widths" + (" relative to the source" if relative else ""))
    ax_s.bar(x, [100 * layer.sparsity for layer in layers], color="C3")
    linear = sum(layer.linear_params for layer in layers)
    overall = 100 * sum(layer.zeros for layer in layers) / linear if linear else 0.0
    ax_s.axhline(overall, color="gray", lw=0.8, ls="--", label=f"all layers: {overall:.1f}%")
    ax_s.set_ylabel("zeros in Linear kernels (%)")
    ax_s.set_ylim(0, 100)
    ax_s.set_xlabel("decoder layer")
    ax_s.set_title("Per-layer sparsity")
    ax_s.legend(**_LEGEND)
    ax_s.set_xticks(x)
    ax_s.tick_params(axis="x", labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_summary(summary: Summary, path: str | os.PathLike) -> Path:
    """Writes `plot_png(summary)` to `path` atomically."""
    return atomic.write_bytes(path, plot_png(summary))


# -- all of it ----------------------------------------------------------------------------------
def inspect_model(model: Llama, *, source_config: LlamaConfig | Llama | dict | None = None,
                  html: str | os.PathLike | None = None, markdown: str | os.PathLike | None = None,
                  png: str | os.PathLike | None = None, title: str = "nnxprune inspect") -> Summary:
    """Summarizes `model` and writes the requested views (each atomically); returns the summary.

    `source_config`: the unpruned model's config (or model, or config dict) for the ratios.
    """
    summary = summarize(model, source_config=source_config)
    if html is not None:
        write_text(html, render_html(model, summary, title=title))
    if markdown is not None:
        write_text(markdown, summary.to_markdown(title=title))
    if png is not None:
        plot_summary(summary, png)
    return summary
