"""The programs the calibration driver runs on one decoder layer (`sequential`, `parallel`).

One calibration sequence at a time (`lax.map` / `lax.scan` over a batch): on CPU the blocked
causal attention is about 1.4x faster per sequence at batch 1 than batched (its tiles stay in
cache), and the whole SmolLM2 layer over 8 x 1024 tokens 1.15x. Exact: each sequence is
independent, and statistics are summed over the sequences of a batch in the scan, in order.

`batch_stats` is the statistics forward of one batch. The 1-device driver jits it as it is
(`forward_with_stats`); the data-parallel driver (`nnxprune.calibration.parallel`) runs the same
function on every device's batches, so both sum a batch's sequences in the same order.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.calibration.collectors import Collector
from nnxprune.models.llama import default_positions
from nnxprune.variables import NormOutput, ProjectionInput

ACTIVATIONS = (ProjectionInput, NormOutput)  # what a collector's taps can read
Plan = tuple[tuple[Collector, tuple[str, ...]], ...]  # active collectors and their taps


@functools.partial(jax.jit, static_argnums=(0,))
def embed(graphdef, state, tokens):
    """The embedding module (`graphdef`, `state`) on `tokens [B, T]`."""
    return nnx.merge(graphdef, state)(tokens)


def layer_on_row(layer, row, inv_freq):
    """`layer` on one sequence `row [T, D]`."""
    return layer(row[None], default_positions(row[None, :, 0]), inv_freq)[0][0]


def map_rows(graphdef, state, x, inv_freq):
    """The layer on every sequence of `x [B, T, D]`, one at a time."""
    return jax.lax.map(lambda row: layer_on_row(nnx.merge(graphdef, state), row, inv_freq), x)


forward = jax.jit(map_rows, static_argnums=(0,))


def row_stats(graphdef, plan: Plan, state, row, inv_freq):
    """Every collector's statistic of one sequence `row [T, D]`, and the layer's output."""
    out, *captured = nnx.capture(layer_on_row, *ACTIVATIONS)(nnx.merge(graphdef, state), row,
                                                             inv_freq)
    taps = {}
    for path, var in (item for c in captured for item in nnx.to_flat_state(c)):
        (value,) = var.get_value() if hasattr(var, "get_value") else var.value
        taps[".".join(map(str, path[:-1]))] = value.reshape(-1, value.shape[-1]).astype(jnp.float32)
    return tuple(c.row(names, taps, row, out) for c, names in plan), out


def batch_stats(graphdef, plan: Plan, state, x, want_out: bool, inv_freq):
    """Over the sequences of `x`: the sum of the summed collectors' statistics, the stacked
    collectors' per-sequence values and (when `want_out`) the layer's outputs."""
    summed = [k for k, (c, _) in enumerate(plan) if c.combine == "sum"]

    def body(total, row):
        values, out = row_stats(graphdef, plan, state, row, inv_freq)
        total = jax.tree.map(jnp.add, total, tuple(values[k] for k in summed))
        stacked = tuple(v for k, v in enumerate(values) if k not in summed)
        return total, (stacked, out if want_out else None)

    shapes = jax.eval_shape(lambda r: row_stats(graphdef, plan, state, r, inv_freq)[0], x[0])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tuple(shapes[k] for k in summed))
    # only what is asked for leaves the program, so XLA drops the rest of the layer (without
    # outputs: the down projection's product and the residual sum): the pruned forward gives them
    total, (stacked, outs) = jax.lax.scan(body, zeros, x)
    return total, stacked, outs


forward_with_stats = jax.jit(batch_stats, static_argnums=(0, 1, 4))


def set_recording(layer, names: Sequence[str], on: bool) -> None:
    """Switches the activation taps `names` of `layer` on or off."""
    for name in names:
        node = layer
        for part in name.split("."):
            node = getattr(node, part)
        if hasattr(node, "record_inputs"):
            node.record_inputs = on
        elif hasattr(node, "record_outputs"):
            node.record_outputs = on
        else:
            raise ValueError(f"cannot record the activations of {name!r} ({type(node).__name__})")


def split_recording(layer, plan: Plan):
    """`nnx.split(layer)` with the taps of `plan` switched on (and off again in `layer`)."""
    names = sorted({n for _, taps in plan for n in taps})
    set_recording(layer, names, True)
    graphdef, state = nnx.split(layer)
    set_recording(layer, names, False)
    return graphdef, state


def finish(plan: Plan, sums, stacked, sequences: int, tokens: int) -> dict[str, Any]:
    """`{collector name: finished statistic}` from the sums and stacks over all sequences."""
    stats, si, ki = {}, iter(sums), iter(stacked)
    for c, _ in plan:
        total = next(si) if c.combine == "sum" else next(ki)
        stats[c.name] = c.finish(total, sequences, tokens)
    return stats
