"""Importance reports: the scores a structured method ranks by, for people and for other tools.

`importance(model, tokens, scores)` gathers the statistics of every named score in one pass of
the sequential driver over the dense model (collectors are shared) and returns plain lists:

- `block_influence`: ShortGPT's BI of every layer (`num_layers` floats);
- `activation` (Minitron): `mlp` (per layer, one float per MLP neuron), `heads` (per layer, one
  float per query head) and `hidden` (one float per hidden channel);
- `taylor` (LLM-Pruner): `taylor_mlp` and `taylor_kv` (element1, per layer one float per MLP
  neuron / KV group), every other variant under `taylor_{mlp,kv}_<variant>`, and `loss` (the
  calibration loss of the gradient pass), from one forward and backward
  (`scoring.taylor.taylor_importance`).

`plot_importance(report)` draws them (the BI profile across layers; per-layer head and neuron
importance; the sorted hidden-channel importance) as PNG bytes. `nnxprune importance` writes both.

Example:
    >>> report = importance(model, tokens, ["block_influence", "activation"])
    >>> report["block_influence"][:3], len(report["heads"][0])
"""

from __future__ import annotations

import io
import time
from typing import Any, Sequence

import numpy as np

from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.graph import find_group
from nnxprune.scoring import get_score

REPORTED = ("block_influence", "activation", "taylor")  # scores this report lays out


def _floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]


def importance(model, tokens: np.ndarray, scores: Sequence[str], *, batch_size: int = 8,
               progress: bool = True) -> dict[str, Any]:
    """The named scores of every group they rank (module docstring), from one calibration pass;
    `seconds` is the pass's wall time."""
    for name in scores:
        get_score(name)  # unknown names: UserError naming the nearest
    unknown = [s for s in scores if s not in REPORTED]
    if unknown:
        raise ValueError(f"no importance layout for {unknown}; known: {', '.join(REPORTED)}")
    collectors = tuple(c for name in dict.fromkeys(scores) for c in get_score(name).collectors())
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if "taylor" in scores:
        from nnxprune.scoring.taylor import taylor_importance

        out.update(taylor_importance(model, tokens))
        out.pop("seconds")
    stats = collect_statistics(model, tokens, collectors, batch_size=batch_size,
                               progress=progress, desc="importance") if collectors else {}
    n = len(model.layers)
    if "block_influence" in scores:
        bi = get_score("block_influence")
        out["block_influence"] = [_floats(bi(model, find_group(model, "layer", i), stats))[0]
                                  for i in range(n)]
    if "activation" in scores:
        act = get_score("activation")
        out["mlp"] = [_floats(act(model, find_group(model, "mlp", i), stats)) for i in range(n)]
        out["heads"] = [_floats(act(model, find_group(model, "q", i), stats)) for i in range(n)]
        out["hidden"] = _floats(act(model, find_group(model, "embed"), stats))
    out["seconds"] = time.perf_counter() - t0
    return out


def _ragged(rows: list[list[float]]) -> np.ndarray:
    """Rows of different lengths (per-layer widths after surgery) padded with NaN."""
    rows = [list(r or []) for r in rows]  # None: a layer without that group
    width = max(1, max(len(r) for r in rows))
    return np.asarray([r + [np.nan] * (width - len(r)) for r in rows], dtype=float)


def plot_importance(report: dict[str, Any], title: str = "") -> bytes:
    """PNG bytes of whatever scores `report` holds (module docstring)."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    panels = [k for k in ("block_influence", "heads", "mlp", "hidden", "taylor_kv", "taylor_mlp")
              if k in report]
    if not panels:
        raise ValueError("nothing to plot: the report holds no scores")
    fig = Figure(figsize=(9, 2.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, panels):
        if key == "block_influence":
            bi = report[key]
            ax.bar(np.arange(len(bi)), bi, color="tab:blue")
            ax.set(xlabel="layer", ylabel="block influence", title="ShortGPT block influence")
        elif key == "hidden":
            ax.plot(np.sort(report[key])[::-1], color="tab:green")
            ax.set(xlabel="hidden channel (sorted)", ylabel="importance", yscale="log",
                   title="hidden channels (sum over the decoder norms)")
        else:
            values = _ragged(report[key])
            positive = values[np.isfinite(values) & (values > 0)]
            norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
            image = ax.imshow(values.T, aspect="auto", origin="lower", interpolation="nearest",
                              cmap="viridis", norm=norm)
            fig.colorbar(image, ax=ax)
            what = {"heads": "query head", "taylor_kv": "KV group"}.get(key, "MLP neuron")
            signal = "Taylor element1" if key.startswith("taylor") else "activation"
            ax.set(xlabel="layer", ylabel=what, title=f"{what} importance ({signal}, log color)")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# -- the `nnxprune importance` command ------------------------------------------------------------
def check_scores(names: Sequence[str]) -> list[str]:
    """The distinct score names, each registered and laid out here (UserError otherwise)."""
    names = list(dict.fromkeys(names))
    for name in names:
        get_score(name)
        if name not in REPORTED:
            raise UserError(f"importance reports {', '.join(REPORTED)}; not {name!r}")
    return names


def calibration_for(overrides: Sequence[str], scores: Sequence[str] = ()):
    """The command's calibration: c4 32 x 1024 seed 0 (10 x 64, LLM-Pruner's, when `taylor` is
    the only score) unless `calibration.KEY=VALUE` overrides say otherwise (no other section)."""
    import dataclasses

    from nnxprune.recipes import Calibration, apply_overrides

    for item in overrides:
        if not item.startswith("calibration."):
            raise UserError(f"--set {item}: importance takes only calibration.KEY=VALUE overrides")
    n, t = (10, 64) if list(scores) == ["taylor"] else (32, 1024)
    section = apply_overrides({"calibration": {"dataset": "c4", "nsamples": n, "seqlen": t,
                                               "seed": 0}}, overrides)["calibration"]
    known = {f.name for f in dataclasses.fields(Calibration)}
    bad = sorted(set(section) - known)
    if bad:
        raise UserError(f"unknown calibration key(s) {', '.join(bad)}; known: "
                        f"{', '.join(sorted(known))}")
    return Calibration(**section)


def write_importance(loaded, scores, calibration, *, data_dir=None, json_path=None,
                     png_path=None, batch_size: int = 8, progress: bool = True,
                     name: str = "") -> dict[str, Any]:
    """Draws the calibration tokens, computes the report, prints a line, writes JSON / PNG."""
    from nnxprune.data import calibration_samples
    from nnxprune.io import atomic

    context = loaded.model.config.max_position_embeddings
    if calibration.seqlen > context:
        raise UserError(f"calibration.seqlen {calibration.seqlen} is beyond the model's context "
                        f"of {context} tokens")
    drawn = calibration_samples(loaded.tokenizer, dataset=calibration.dataset,
                                nsamples=calibration.nsamples, seqlen=calibration.seqlen,
                                seed=calibration.seed, data_dir=data_dir)
    report = importance(loaded.model, drawn.tokens, scores, batch_size=batch_size,
                        progress=progress)
    seconds = report.pop("seconds")
    report["protocol"] = {"model": name, "source": str(loaded.source),
                          "calibration": calibration.dataset, "nsamples": calibration.nsamples,
                          "seqlen": calibration.seqlen, "seed": calibration.seed,
                          "calibration_source": str(drawn.source), "seconds": seconds}
    if "loss" in report:
        report["protocol"]["loss"] = report.pop("loss")
    print(f"importance {', '.join(scores)}: one calibration pass over {calibration.nsamples} x "
          f"{calibration.seqlen} tokens in {seconds:.1f} s")
    if "block_influence" in report:
        bi = report["block_influence"]
        print(f"block influence, lowest first: layers {sorted(range(len(bi)), key=bi.__getitem__)}")
    if json_path:
        atomic.write_json(json_path, report)
        print(f"wrote     {json_path}")
    if png_path:
        atomic.write_bytes(png_path, plot_importance(report, title=f"nnxprune importance {name}"))
        print(f"wrote     {png_path}")
    return report
