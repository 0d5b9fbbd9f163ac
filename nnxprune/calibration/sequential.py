"""The sequential block-by-block calibration driver (Wanda / SparseGPT style).

Calibration inputs are embedded once; then, for each decoder layer in order (the model's own
layer loop, `Llama.run_layers`, with this driver as its `layer_call`):

1. run the unpruned layer on its current inputs while the method's collectors
   (`nnxprune.calibration.collectors`) gather their statistics: all of them from one forward,
   as the reference codes do with forward hooks;
2. hand `visit(index, layer, calib)` a `LayerCalibration`: the layer's inputs, the unpruned
   layer's outputs (when asked for), and the finished statistics by collector name; `visit`
   prunes the layer (soft or hard);
3. run the pruned layer again on the same inputs and feed its outputs to the next layer.

Only one layer's activations (inputs and outputs, `[N, T, D]` each) live at a time. Each layer's
statistics forward is one `jax.jit` per layer shape and collector plan (the statistics are reduced
inside it, so the captured activations never leave the device unless a collector stacks them),
compiled once and reused by every layer of that shape.

Activations are captured with `nnx.capture`: a `Linear` with `record_inputs` sows its input, an
`RMSNorm` with `record_outputs` its output; the switches are on only inside the statistics
forward. A layer for which no collector is active is neither measured nor visited (its forward
still runs).

Example:
    >>> def visit(i, layer, calib):
    ...     calib.stats["sumsq"]["mlp.down_proj"]       # [in], from InputSumSq
    >>> run_sequential(model, tokens, visit, [InputSumSq(names=("mlp.down_proj",))])
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune import interrupt
from nnxprune.calibration.collectors import Collector
from nnxprune.models.llama import default_positions
from nnxprune.variables import NormOutput, ProjectionInput

ACTIVATIONS = (ProjectionInput, NormOutput)  # what a collector's taps can read


@dataclasses.dataclass
class LayerCalibration:
    """What `visit` gets for decoder layer `index`."""

    index: int
    inputs: jax.Array  # [N, T, D]: the layer's inputs (outputs of the already pruned layers)
    outputs: jax.Array | None  # [N, T, D]: the unpruned layer's outputs, when asked for
    stats: dict[str, Any]  # collector name -> its finished statistic
    sequences: int
    tokens: int


Visit = Callable[[int, nnx.Module, LayerCalibration], None]


def batch_size_for(n: int, wanted: int) -> int:
    """The largest divisor of `n` not above `wanted` (one compiled shape, no padding)."""
    return max(d for d in range(1, min(n, wanted) + 1) if n % d == 0)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def embed_inputs(model, tokens: np.ndarray, batch_size: int = 8) -> jax.Array:
    """The first layer's inputs `[N, T, D]` for calibration tokens `[N, T]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    bs = batch_size_for(tokens.shape[0], batch_size)
    graphdef, state = nnx.split(model.embed_tokens)
    return jnp.concatenate([_embed(graphdef, state, tokens[i:i + bs])
                            for i in range(0, tokens.shape[0], bs)])


# Both forwards run the layer one calibration sequence at a time (`lax.map` / `lax.scan` over the
# batch): on CPU the blocked causal attention is about 1.4x faster per sequence at batch 1 than
# batched (its tiles stay in cache), and the whole SmolLM2 layer over 8 x 1024 tokens 1.15x.
# Exact: each sequence is independent, and statistics are summed over sequences in the scan.


def _layer_on_row(layer, row, inv_freq):
    """`layer` on one sequence `row [T, D]`."""
    return layer(row[None], default_positions(row[None, :, 0]), inv_freq)[0][0]


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, x, inv_freq):
    return jax.lax.map(lambda row: _layer_on_row(nnx.merge(graphdef, state), row, inv_freq), x)


Plan = tuple[tuple[Collector, tuple[str, ...]], ...]  # active collectors and their taps


def _row_stats(graphdef, plan: Plan, state, row, inv_freq):
    """Every collector's statistic of one sequence `row [T, D]`, and the layer's output."""
    out, *captured = nnx.capture(_layer_on_row, *ACTIVATIONS)(nnx.merge(graphdef, state), row,
                                                              inv_freq)
    taps = {}
    for path, var in (item for c in captured for item in nnx.to_flat_state(c)):
        (value,) = var.get_value() if hasattr(var, "get_value") else var.value
        taps[".".join(map(str, path[:-1]))] = value.reshape(-1, value.shape[-1]).astype(jnp.float32)
    return tuple(c.row(names, taps, row, out) for c, names in plan), out


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _forward_with_stats(graphdef, plan: Plan, state, x, want_out: bool, inv_freq):
    """Over the sequences of `x`: the sum of the summed collectors' statistics, the stacked
    collectors' per-sequence values and (when `want_out`) the layer's outputs."""
    summed = [k for k, (c, _) in enumerate(plan) if c.combine == "sum"]

    def body(total, row):
        values, out = _row_stats(graphdef, plan, state, row, inv_freq)
        total = jax.tree.map(jnp.add, total, tuple(values[k] for k in summed))
        stacked = tuple(v for k, v in enumerate(values) if k not in summed)
        return total, (stacked, out if want_out else None)

    shapes = jax.eval_shape(lambda r: _row_stats(graphdef, plan, state, r, inv_freq)[0], x[0])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tuple(shapes[k] for k in summed))
    # only what is asked for leaves the program, so XLA drops the rest of the layer (without
    # outputs: the down projection's product and the residual sum): the pruned forward gives them
    total, (stacked, outs) = jax.lax.scan(body, zeros, x)
    return total, stacked, outs


def _set_recording(layer, names: Sequence[str], on: bool) -> None:
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


def _statistics(layer, plan: Plan, x, inv_freq, bs: int, want_out: bool):
    """The finished statistics of `plan` over the inputs `x [N, T, D]` (batches of `bs`), and
    the unpruned layer's outputs when `want_out`."""
    names = sorted({n for _, taps in plan for n in taps})
    _set_recording(layer, names, True)
    graphdef, state = nnx.split(layer)
    _set_recording(layer, names, False)
    sums, stacks, outs = None, [], []
    for start in range(0, x.shape[0], bs):
        total, stacked, out = _forward_with_stats(graphdef, plan, state, x[start:start + bs],
                                                  want_out, inv_freq)
        sums = total if sums is None else jax.tree.map(jnp.add, sums, total)
        stacks.append(stacked)
        outs.append(out)
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *stacks) if stacks[0] else ()
    n, t = x.shape[:2]
    stats, si, ki = {}, iter(sums), iter(stacked)
    for c, taps in plan:
        total = next(si) if c.combine == "sum" else next(ki)
        stats[c.name] = c.finish(total, n, n * t)
    jax.block_until_ready(stats)
    return stats, jnp.concatenate(outs) if want_out else None


def calibrate_layer(i: int, layer, x, inv_freq, visit: Visit, collectors: Sequence[Collector], *,
                    batch_size: int, keep_outputs: bool = False, edits: bool = True,
                    timings: dict[str, float], to_host: bool = False):
    """One layer of the driver (module docstring, steps 1-3) on its inputs `x [N, T, D]`: the
    statistics forward, `visit`, the pruned forward. Returns the next layer's inputs.

    `x` may be a host (NumPy) array: each batch of `batch_size` sequences goes to the device on
    its own. With `to_host` the outputs come back to the host batch by batch (the streamed
    driver, `nnxprune.calibration.streamed`, keeps every sample's activations there)."""
    n_seq, seqlen = x.shape[:2]
    bs = batch_size
    plan = tuple((c, c.taps(i)) for c in collectors if c.active(i))
    if plan or not collectors:
        t0 = time.perf_counter()
        want_out = keep_outputs or not edits or any(c.needs_output for c, _ in plan)
        stats, outs = _statistics(layer, plan, x, inv_freq, bs, want_out) if (
            plan or want_out) else ({}, None)
        timings["forward_stats"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        visit(i, layer, LayerCalibration(index=i, inputs=x, outputs=outs, stats=stats,
                                         sequences=n_seq, tokens=n_seq * seqlen))
        timings["visit"] += time.perf_counter() - t0
        if not edits:
            return np.asarray(outs) if to_host else outs
    t0 = time.perf_counter()
    graphdef, state = nnx.split(layer)
    starts = range(0, n_seq, bs)
    if to_host:  # each batch leaves the device before the next is computed
        x = np.concatenate([np.asarray(_forward(graphdef, state, x[s:s + bs], inv_freq))
                            for s in starts])
    else:
        x = jnp.concatenate([_forward(graphdef, state, x[s:s + bs], inv_freq) for s in starts])
        x.block_until_ready()
    timings["forward_pruned"] += time.perf_counter() - t0
    return x


def run_sequential(model, tokens: np.ndarray, visit: Visit, collectors: Sequence[Collector] = (), *,
                   keep_outputs: bool = False, batch_size: int = 8, progress: bool = True,
                   desc: str = "calibrate", edits: bool = True) -> dict[str, float]:
    """Runs the sequential driver (module docstring); returns timings in seconds.

    `visit(i, layer, calib)` is called for every layer for which some collector is active (for
    every layer when `collectors` is empty); whatever it does to the layer is what the next
    layer's inputs see. `keep_outputs` hands `visit` the unpruned layer's outputs too.
    `edits = False` promises that `visit` leaves the layers as they are: the statistics forward's
    outputs then feed the next layer directly (one forward per layer instead of two).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [nsamples, seqlen], got {tokens.shape}")
    names = [c.name for c in collectors]
    if len(set(names)) != len(names):
        raise ValueError(f"two collectors of one kind in one run: {names}")
    n_seq = tokens.shape[0]
    bs = batch_size_for(n_seq, batch_size)
    timings = {"forward_stats": 0.0, "visit": 0.0, "forward_pruned": 0.0}
    t0 = time.perf_counter()
    # held in a list so that the embedding output dies once layer 0 has run: `run_layers` keeps
    # the only reference (one activation, 75 MB at 32 x 1024 x 576, less at the peak)
    inputs = [embed_inputs(model, tokens, bs)]
    timings["embed"] = time.perf_counter() - t0
    bar = tqdm(total=len(model.layers), desc=desc, unit="layer", disable=not progress, leave=False)

    def layer_call(i, layer, x, positions, inv_freq, cache, attention_fn):
        interrupt.stop_if_requested()  # a safe point: between layers
        x = calibrate_layer(i, layer, x, inv_freq, visit, collectors, batch_size=bs,
                            keep_outputs=keep_outputs, edits=edits, timings=timings)
        bar.update(1)
        return x, None

    model.run_layers(inputs.pop(), default_positions(tokens), layer_call=layer_call)
    bar.close()
    return timings


def collect_statistics(model, tokens: np.ndarray, collectors: Sequence[Collector], *,
                       batch_size: int = 8, progress: bool = True,
                       desc: str = "statistics") -> dict[int, dict[str, Any]]:
    """The collectors' statistics of every layer of the model as it is (nothing is pruned while
    they are gathered): `{layer index: {collector name: statistic}}`. One forward per layer: the
    statistics forward's outputs feed the next layer."""
    stats: dict[int, dict[str, Any]] = {}

    def visit(i, layer, calib):
        stats[i] = calib.stats

    run_sequential(model, tokens, visit, collectors, batch_size=batch_size, progress=progress,
                   desc=desc, edits=False)
    return stats
