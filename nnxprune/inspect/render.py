"""The views of a (pruned) model for people: an annotated treescope HTML page and a per-layer plot.

- `render_html(model)`: a standalone page, the summary table above the treescope view of the
  model where every `Linear` (and decoder layer, attention, MLP, embedding, the model itself)
  carries its statistics on its first line, collapsed or expanded (`render_tree` alone gives the
  tree as HTML or text; `annotation_notes` the notes by path).
- `plot_png(summary)` / `plot_summary(summary, path)`: a PNG of per-layer widths and sparsity.
- `inspect_model(model, html=..., markdown=..., png=...)` summarizes the model and writes the
  requested views atomically; it is what `nnxprune inspect` calls.

Example:
    >>> summary = inspect_model(model, source_config=source.config, html="out/model.html",
    ...                         markdown="out/model.md", png="out/model.png")
    >>> print(render_tree(model, summary, fmt="text"))
"""

from __future__ import annotations

import html as html_lib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from nnxprune.inspect.stats import MatrixStats, common_pattern, path_str
from nnxprune.inspect.summary import NUMERIC_COLUMNS, LayerSummary, Summary, summarize
from nnxprune.io import atomic
from nnxprune.models.llama import MLP, Attention, DecoderLayer, Llama, LlamaConfig


# -- treescope HTML -----------------------------------------------------------------------------
def _zero_note(stats: Sequence[MatrixStats]) -> str:
    params = sum(m.params for m in stats)
    zeros = sum(m.zeros for m in stats)
    return f"{100 * zeros / params if params else 0.0:.1f}% zero ({common_pattern(stats)})"


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

    summary = summary if summary is not None else summarize(model)
    by_path = annotation_notes(summary)
    open_kinds = (Llama, nnx.List, DecoderLayer, Attention, MLP)
    notes = {}
    for path, node in nnx.iter_graph(model):
        note = by_path.get(path_str(path))
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
        kind = ' class="num"' if column in NUMERIC_COLUMNS else ""
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
    _plot_widths(ax_w, layers, x)
    _plot_sparsity(ax_s, layers, x)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plot_widths(ax, layers: Sequence[LayerSummary], x: np.ndarray) -> None:
    """Top panel: query heads, KV heads and MLP width per layer, as bars of width / source when
    every layer has a source, else heads as bars and the MLP width on a second axis."""
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
            ax.bar(x + (k - 1) * bar, [v / r if r else 0.0 for v, r in zip(values, refs)], bar,
                   label=name)
        ax.set_ylabel("width / source")
        ax.set_ylim(0, 1.05)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.legend(**_LEGEND)
    else:
        for k, (name, values, _) in enumerate(series[:2]):
            ax.bar(x + (k - 0.5) * bar, values, bar, label=name, color=f"C{k}")
        ax.set_ylabel("heads")
        ax_m = ax.twinx()
        ax_m.plot(x, series[2][1], "o-", color="C2", label="MLP width")
        ax_m.set_ylabel("MLP width")
        ax_m.set_ylim(0, max(series[2][1] or [1]) * 1.1)
        handles = ax.get_legend_handles_labels()
        more = ax_m.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], **_LEGEND)
    ax.set_title("Per-layer widths" + (" relative to the source" if relative else ""))


def _plot_sparsity(ax, layers: Sequence[LayerSummary], x: np.ndarray) -> None:
    """Bottom panel: the fraction of zeros in each layer's Linear kernels, and over all layers."""
    ax.bar(x, [100 * layer.sparsity for layer in layers], color="C3")
    linear = sum(layer.linear_params for layer in layers)
    overall = 100 * sum(layer.zeros for layer in layers) / linear if linear else 0.0
    ax.axhline(overall, color="gray", lw=0.8, ls="--", label=f"all layers: {overall:.1f}%")
    ax.set_ylabel("zeros in Linear kernels (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("decoder layer")
    ax.set_title("Per-layer sparsity")
    ax.legend(**_LEGEND)
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=7)


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
        atomic.write_text(html, render_html(model, summary, title=title))
    if markdown is not None:
        atomic.write_text(markdown, summary.to_markdown(title=title))
    if png is not None:
        plot_summary(summary, png)
    return summary
