"""The summary of a (pruned) model: per decoder layer its widths, parameters and sparsity, with
totals and the ratios to the unpruned source, as terminal text or Markdown tables.

`summarize(model)` reads every matrix (`stats.matrix_stats`) and every decoder layer into a
`Summary` of `LayerSummary` rows and `MatrixStats`; with a source config (the unpruned model) it
also gives the ratios to it. `count_params(config)` counts a config's parameters analytically
(`nnxprune.measure.count_params` counts a built model's).

Example:
    >>> summary = summarize(model, source_config=source.config)
    >>> print(summary.to_text())                  # headline and the per-layer table
    >>> summary.to_markdown(title="Wanda 50%")    # the same, plus every matrix
    >>> summary.linear_sparsity, summary.pattern  # (0.5, '2:4')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nnxprune import measure
from nnxprune.inspect.stats import MatrixStats, common_pattern, matrix_stats, pattern_name, to_host
from nnxprune.io.hf_config import config_from_hf
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig


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
        return common_pattern(self.linears)

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
                 common_pattern([m for m in self.linears if m.layer is not None])]
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
                 pattern_name(m), str(m.zero_rows),
                 str(m.zero_cols)] for m in self.matrices]
        return header, rows


# Columns of numbers: right-aligned in text and Markdown tables (and the HTML page's table).
NUMERIC_COLUMNS = {"q heads", "kv heads", "mlp", "params", "non-zero", "sparsity",
                   "non-zero vs source", "zero rows", "zero cols"}


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(cell.rjust(w) if h in NUMERIC_COLUMNS else cell.ljust(w)
                         for cell, w, h in zip(row, widths, header)).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---:" if h in NUMERIC_COLUMNS else ":---" for h in header]
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
    """Reads the statistics of `model` (how a pattern is read: `nnxprune.inspect.stats`);
    `source_config` is the unpruned model's config (or the model itself), for the ratios."""
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
            intermediate_size=shape.intermediate_size, params=measure.count_params(layer),
            linear_params=sum(m.params for m in stats), zeros=sum(m.zeros for m in stats),
            pattern=common_pattern(stats), source=src,
            source_params=None if src is None else layer_params(source, src)))
    embed_mask = getattr(model.embed_tokens, "mask", None)
    hidden_kept = None if embed_mask is None else int(np.count_nonzero(to_host(embed_mask[...])))
    return Summary(config=config, layers=tuple(layers), matrices=matrices,
                   params=measure.count_params(model), source_config=source,
                   hidden_kept=hidden_kept)
