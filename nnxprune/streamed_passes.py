"""The passes of a streamed run (`nnxprune.streamed`): each method's streamed form, one decoder
layer in memory at a time, through the per-layer code its in-memory transform runs (DESIGN.md 12).

A streamed run is one or more passes over the layers of a lazy source (`stream_pass`, on
`calibration.streamed.run_streamed`), each starting from the embeddings of the calibration tokens:

- analysis passes (`analysis`) read the dense layers, gather statistics and compute a result, and
  write nothing: OWL's outlier ratios (`owl_streamed`), ShortGPT's block influence
  (`depth_streamed`), Minitron's width statistics (`nnxprune.streamed_width`);
- the last pass writes every layer: a sparsity step's pruning (`prune_streamed`), the kept layers
  of a depth cut copied as stored (`copy_layers`), or width surgery.

Each pass uses the same driver settings as its in-memory twin (the same collectors, `edits` mode
and batch size), so the statistics, and so the masks, kept layers and kept channels, are the
in-memory run's exactly. Each pass records its progress in the run's `io.resumable.StreamState`:
a killed run resumes in the pass and at the layer where it stopped, and a finished pass's result
(JSON) is taken as it is.

Example:
    >>> kept = depth_streamed(Depth(count=8), source, tokens, ctx, state=state)  # pass 0
    >>> prune_streamed(Wanda(pattern="2:4"), kept, tokens, writer, ctx, state=state, index=1)
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from nnxprune.calibration.streamed import run_streamed
from nnxprune.io.layers import HFLayerWriter, KeptLayers
from nnxprune.io.resumable import StreamState
from nnxprune.scoring import get_score
from nnxprune.transforms import Context
from nnxprune.transforms.depth import Depth, layer_block_influence
from nnxprune.transforms.sparsify import Sparsify, by_layer


class _OneLayer:
    """`model.layers` of a `LayerView`: `num_layers` long, only layer `i` present."""

    def __init__(self, i: int, layer, num_layers: int):
        self.i, self.layer, self.n = i, layer, num_layers

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        if j % self.n != self.i:
            raise IndexError(f"layer {j} is not in memory (a streamed run holds layer {self.i})")
        return self.layer


class LayerView:
    """Decoder layer `i` seen at its place in a model of `num_layers` layers, for the code that
    reads a model (`graph.find_group`, `graph.take`, scores): `view.layers[i]` is the layer."""

    def __init__(self, i: int, layer, num_layers: int):
        self.layers = _OneLayer(i, layer, num_layers)


def stream_pass(index: int, state: StreamState | None, source, tokens, visit, collectors=(), *,
                log: dict, writer: HFLayerWriter | None = None,
                write: Callable | None = None, begin: Callable[[], None] | None = None,
                edits: bool = True, read: Callable | None = None, param_dtype=jnp.float32,
                batch_size: int = 8, progress: bool = True, desc: str = "stream"):
    """Pass `index` of a run over every layer of `source` (`run_streamed`'s arguments). `log` is
    what `visit` fills (JSON-able): when `state` says an earlier run was in this pass, its log,
    writer shards and activations are taken and the pass continues at its first unfinished layer;
    otherwise `begin()` runs first (the writer's globals). Returns `(timings, first layer run)`."""
    resumed = state.resumed(index) if state is not None else None
    start, earlier, x = 0, [], None
    if resumed and resumed["done"]:
        start, earlier, x = resumed["done"], list(resumed["per_layer"]), state.activations()
        log.clear()
        log.update(resumed["log"])
        if writer is not None:
            writer.restore(resumed["writer"])
    elif begin is not None:
        begin()

    def after_layer(i, x, timings):
        if state is not None:
            state.save(i + 1, x, writer.state() if writer is not None else {}, log,
                       earlier + timings["per_layer"])

    timings = run_streamed(source, tokens, visit, collectors if tokens is not None else (),
                           write=write, param_dtype=param_dtype, batch_size=batch_size,
                           progress=progress, desc=desc, start=start, x=x,
                           after_layer=after_layer, edits=edits, read=read)
    timings["per_layer"] = earlier + timings["per_layer"]
    return timings, start


def analysis(index: int, state: StreamState | None, run: Callable[[], dict]) -> dict:
    """The result of analysis pass `index`: an earlier run's when it finished that pass, else
    `run()`'s (recorded as finished in `state`)."""
    if state is not None and state.pass_index > index:
        return state.results[index]
    result = run()
    if state is not None:
        state.finish_pass(result)
    return result


def _globals(source, writer: HFLayerWriter) -> Callable[[], None]:
    return lambda: writer.write_globals({k: source.tensor(k) for k in source.global_keys()})


def prune_streamed(step: Sparsify, source, tokens, writer: HFLayerWriter, ctx: Context, *,
                   param_dtype=jnp.float32, state: StreamState | None = None,
                   index: int = 0) -> dict[str, Any]:
    """Runs the sparsity `step` layer by layer over `source` into `writer` (the globals first) as
    pass `index`, through `step.prune_layer`; records what it did in `ctx` as the in-memory
    transform would (`step.finish_log` where the method has one). Returns the driver's timings."""
    names = by_layer(step.selected(source.config))
    start_log = getattr(step, "start_log", None)
    log = start_log(source.config) if start_log is not None else {"per_matrix": {}}

    def visit(i, layer, calib):
        if i in names:
            step.prune_layer(i, layer, calib, names[i], log)

    t0 = time.perf_counter()
    timings, start = stream_pass(
        index, state, source, tokens, visit, step.layer_collectors(names), log=log, writer=writer,
        write=writer.write_layer, begin=_globals(source, writer), param_dtype=param_dtype,
        batch_size=getattr(step, "batch_size", 8), progress=ctx.progress,
        desc=f"{step.kind} (streamed)")
    extra = dict(streamed=True, resumed_at=start)
    finish = getattr(step, "finish_log", None)
    if finish is not None:
        finish(ctx, log, timings=timings, tokens=tokens, total=time.perf_counter() - t0, **extra)
        return timings
    per_matrix = log.pop("per_matrix")
    values = np.asarray(list(per_matrix.values()) or [0.0])
    ctx.log(step.kind, matrices=len(per_matrix), mean_sparsity=float(values.mean()),
            per_matrix=per_matrix, pattern=step.pattern or "unstructured", timings=timings,
            calibration_tokens=int(tokens.size) if tokens is not None else 0, **extra, **log)
    return timings


def owl_streamed(step, source, tokens, writer: HFLayerWriter, ctx: Context, *,
                 param_dtype=jnp.float32, state: StreamState | None = None,
                 index: int = 0) -> dict[str, Any]:
    """OWL in two passes: the outlier ratios of the dense layers (pass `index`, the driver run as
    `OWL.outlier_ratios` runs it), then the pruning step with its per-layer sparsities (pass
    `index + 1`, `prune_streamed`)."""
    names = by_layer(step.selected(source.config))
    log: dict[str, list] = {"ratios": []}  # [[layer, ratio]]

    def visit(i, layer, calib):
        log["ratios"].append([i, step.layer_outlier_ratio(layer, calib, names[i])])

    def run():
        timings, _ = stream_pass(index, state, source, tokens, visit,
                                 step.outlier_collectors(names), log=log, param_dtype=param_dtype,
                                 batch_size=step.batch_size, progress=ctx.progress,
                                 desc="owl outliers (streamed)")
        return {"ratios": log["ratios"], "per_layer": timings["per_layer"]}

    pairs = sorted((int(i), r) for i, r in analysis(index, state, run)["ratios"])
    inner = step.pruning_step(np.asarray([r for _, r in pairs]), [i for i, _ in pairs],
                              source.config.num_layers, ctx)
    return prune_streamed(inner, source, tokens, writer, ctx, param_dtype=param_dtype,
                          state=state, index=index + 1)


def depth_streamed(step: Depth, source, tokens, ctx: Context, *, param_dtype=jnp.float32,
                   state: StreamState | None = None, index: int = 0) -> KeptLayers:
    """ShortGPT's cut: every layer's block influence on the dense model (pass `index`, the driver
    run as `depth.block_influences` runs it), the `count` lowest dropped (`Depth.drop_lowest`).
    Returns the kept layers, renumbered, as a source of their own."""
    n = source.config.num_layers
    log: dict[str, list] = {"scores": []}

    def visit(i, layer, calib):
        log["scores"].append(layer_block_influence(LayerView(i, layer, n), i, {i: calib.stats}))

    def run():
        timings, _ = stream_pass(index, state, source, tokens, visit,
                                 get_score("block_influence").collectors(), log=log, edits=False,
                                 param_dtype=param_dtype, batch_size=step.batch_size,
                                 progress=ctx.progress, desc="block influence (streamed)")
        return {"scores": log["scores"], "per_layer": timings["per_layer"]}

    drop = set(step.drop_lowest(analysis(index, state, run)["scores"], ctx))
    return KeptLayers(source, [i for i in range(n) if i not in drop])


def copy_layers(source, writer: HFLayerWriter, ctx: Context, *,
                state: StreamState | None = None, index: int = 0) -> dict[str, Any]:
    """Writes every layer of `source` (a depth cut's kept layers) as stored, onloading nothing."""
    timings, _ = stream_pass(index, state, source, None, lambda i, layer, calib: None, log={},
                             writer=writer, write=lambda i, _: writer.copy_layer(i, source),
                             begin=_globals(source, writer), read=lambda i: None,
                             progress=ctx.progress, desc="copy kept layers")
    return timings
