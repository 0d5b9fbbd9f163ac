"""Inspecting a (pruned) model: how sparse each matrix is, which widths are left, and how much.

Four views of the same facts, all built from one `Summary`:

- `stats`: per matrix (every mask-aware `Linear` and the embedding) its shape, parameters, the
  exact fraction of zeros in the effective kernel and their pattern (`dense`, `N:M`, `structured`,
  `unstructured`; how it is read: the `stats` docstring).
- `summary`: `summarize(model)` per decoder layer (query heads, KV heads, MLP width, parameters,
  sparsity) and the ratios to a source config; `Summary.to_text()` / `to_markdown()` tables;
  `count_params(config)` counts a config's parameters analytically.
- `render`: `render_html(model)`, the treescope view annotated with those statistics under the
  summary table; `plot_summary(summary, path)`, a PNG of per-layer widths and sparsity; and
  `inspect_model`, which does all of it and writes the files atomically (`nnxprune inspect`).

Example:
    >>> summary = inspect_model(model, source_config=source.config, html="out/model.html",
    ...                         markdown="out/model.md", png="out/model.png")
    >>> print(summary.to_text())
    >>> summary.linears[0].label          # '576x576, 331,776 params, 50.0%, 2:4'
"""

from nnxprune.inspect.render import (annotation_notes, inspect_model, plot_png, plot_summary,
                                     render_html, render_tree)
from nnxprune.inspect.stats import (DENSE, INCIDENTAL_ZEROS, NM, NM_GROUP_SIZES, STRUCTURED,
                                    UNSTRUCTURED, MatrixStats, detect_nm, embed_stats, iter_matrices,
                                    kernel_stats, linear_stats, matrix_stats, zero_map)
from nnxprune.inspect.summary import LayerSummary, Summary, count_params, layer_params, summarize

__all__ = ["DENSE", "INCIDENTAL_ZEROS", "NM", "NM_GROUP_SIZES", "STRUCTURED", "UNSTRUCTURED",
           "LayerSummary", "MatrixStats", "Summary", "annotation_notes", "count_params", "detect_nm",
           "embed_stats", "inspect_model", "iter_matrices", "kernel_stats", "layer_params",
           "linear_stats", "matrix_stats", "plot_png", "plot_summary", "render_html", "render_tree",
           "summarize", "zero_map"]
