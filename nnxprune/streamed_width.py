"""Minitron's width pruning streamed (`transforms.width.Width`, `nnxprune.streamed`): heads, KV
groups and MLP neurons of each layer, and hidden channels, from one calibration pass over the
dense model, one decoder layer in memory at a time.

As in memory, every ranking comes from the dense model's statistics (`Scored.statistics` runs
the driver with `edits = False`, so the dense outputs feed the next layer; so does the streamed
pass) and the edits are the transform's own: `Width.layer_plan` ranks a layer's KV groups, query
heads and MLP neurons on the dense layer (`streamed_passes.LayerView`), `graph.take` slices it.

- Without a hidden-size change, one pass: each layer is ranked, sliced and written as soon as its
  statistics are in (its dense outputs already computed for the next layer).
- With one, two passes: the first gathers every layer's statistics and plans and writes nothing
  (the hidden channels are ranked over all layers' norms: Minitron's `activation` score reads
  only the statistics, so `Width.hidden_keep` runs on the abstract model, no weight in memory);
  the second reads each layer again, applies its plan and the hidden slice of its members and
  writes it; the embedding, final norm and head are sliced the same way.

The output has the widths' shapes: uniform layers give a plain `LlamaForCausalLM` folder,
different ones nnxprune's `nnxprune_llama` (`io.hf`), as `export_hf` writes them.

Example:
    >>> width_streamed(Width(hidden=448, intermediate=1024, heads=6), source, tokens, writer, ctx)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nnxprune import graph
from nnxprune.errors import UserError
from nnxprune.graph import Group
from nnxprune.io.hf import abstract_model
from nnxprune.io.layers import HFLayerWriter
from nnxprune.io.resumable import StreamState
from nnxprune.scoring import get_score
from nnxprune.scoring.activation import NORMS
from nnxprune.streamed_passes import LayerView, analysis, stream_pass
from nnxprune.transforms import Context
from nnxprune.transforms.surgery import edit
from nnxprune.transforms.width import Width

# where each global tensor (HF name and layout) holds the hidden channels
_GLOBAL_AXIS = {"model.embed_tokens.weight": 1, "model.norm.weight": 0, "lm_head.weight": 1}


def why_not_streamed(step: Width) -> str | None:
    """Why `step` cannot stream (None when it can)."""
    if step.soft:
        return "width with soft = true masks channels in a whole model; use a hard edit"
    if getattr(get_score(step.score), "gather", None) is not None:
        return f"width's score {step.score!r} needs gradients through the whole model"
    if step.hidden is not None and step.score != "activation":
        return (f"width's hidden channels are ranked over every layer at once; streamed, that "
                f"needs score = \"activation\" (got {step.score!r})")
    return None


def _plan_json(plan) -> list:
    return [[kind, [int(k) for k in keep]] for kind, _, keep in plan]


def _apply(view, i: int, plan) -> None:
    for kind, keep in plan:
        edit(view, graph.find_group(view, kind, i), np.asarray(keep, np.int64), False)


def width_streamed(step: Width, source, tokens, writer: HFLayerWriter, ctx: Context, *,
                   param_dtype=jnp.float32, state: StreamState | None = None,
                   index: int = 0) -> dict:
    """Runs `step` over `source` into `writer` (whose config is `step.check(source.config)`);
    logs in `ctx` as the in-memory transform does. Returns the last pass's timings."""
    cfg = source.config
    hidden, shapes = step.targets(cfg)
    n = cfg.num_layers
    collectors = get_score(step.score).collectors()
    settings = dict(param_dtype=param_dtype, batch_size=step.batch_size, progress=ctx.progress)

    def layer_plan(i, layer, calib):
        stats = None if calib is None else {i: calib.stats}
        return step.layer_plan(LayerView(i, layer, n), stats, i, cfg.layers[i], shapes[i])

    if hidden == cfg.hidden_size:  # one pass: rank, slice and write each layer
        log: dict = {"plans": {}}

        def visit(i, layer, calib):
            plan = _plan_json(layer_plan(i, layer, calib))
            _apply(LayerView(i, layer, n), i, plan)
            log["plans"][str(i)] = plan

        timings, _ = stream_pass(index, state, source, tokens, visit, collectors, log=log,
                                 writer=writer, write=writer.write_layer, edits=False,
                                 begin=lambda: writer.write_globals(
                                     {k: source.tensor(k) for k in source.global_keys()}),
                                 desc="width (streamed)", **settings)
        step.record(ctx, cfg, hidden, shapes)
        return timings

    first: dict = {"plans": {}, "norms": {}}

    def gather(i, layer, calib):
        first["plans"][str(i)] = _plan_json(layer_plan(i, layer, calib))
        # what the activation score reads to rank hidden channels: the norms' statistics
        first["norms"][str(i)] = {c: {k: np.asarray(v[k]).tolist() for k in NORMS if k in v}
                                  for c, v in calib.stats.items()}

    def run():
        t, _ = stream_pass(index, state, source, tokens, gather, collectors, log=first,
                           edits=False, desc="width statistics (streamed)", **settings)
        return {**first, "per_layer": t["per_layer"]}

    result = analysis(index, state, run)
    stats = {int(i): {c: {k: np.asarray(v, np.float32) for k, v in per.items()}
                      for c, per in s.items()} for i, s in result["norms"].items()}
    model = abstract_model(cfg)
    keep = step.hidden_keep(model, stats, hidden)
    embed = graph.find_group(model, "embed")

    def slice_layer(i, layer, calib):
        view = LayerView(i, layer, n)
        _apply(view, i, result["plans"][str(i)])
        members = tuple(m for m in embed.members if m.path[:2] == ("layers", i))
        graph.take(view, Group("embed", None, embed.size, members), keep)

    def begin():
        tensors = {k: source.tensor(k) for k in source.global_keys()}
        missing = sorted(set(tensors) - set(_GLOBAL_AXIS))
        if missing:
            raise UserError(f"{source.path}: no hidden-channel slice known for {missing[0]!r}")
        writer.write_globals({k: np.take(v, keep, axis=_GLOBAL_AXIS[k]) for k, v in tensors.items()})

    timings, _ = stream_pass(index + 1, state, source, None, slice_layer, log={}, writer=writer,
                             write=writer.write_layer, begin=begin, desc="width (streamed)",
                             **settings)
    step.record(ctx, cfg, hidden, shapes)
    return timings
