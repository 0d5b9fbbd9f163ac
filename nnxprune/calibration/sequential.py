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
still runs). The layer programs themselves are in `nnxprune.calibration.programs`.

With more than one device visible (several local devices, or several processes after
`jax.distributed`), the calibration sequences are split over the devices and the statistics
summed across them (`nnxprune.calibration.parallel`), with the same statistics, bit for bit, and
so the same masks as on one device; `NNXPRUNE_DATA_PARALLEL=0` keeps it on one device.

Example:
    >>> def visit(i, layer, calib):
    ...     calib.stats["sumsq"]["mlp.down_proj"]       # [in], from InputSumSq
    >>> run_sequential(model, tokens, visit, [InputSumSq(names=("mlp.down_proj",))])
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune import interrupt, multihost
from nnxprune.calibration import parallel, programs
from nnxprune.calibration.collectors import Collector
from nnxprune.calibration.programs import Plan
from nnxprune.models.llama import default_positions


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


def embed_inputs(model, tokens: np.ndarray, batch_size: int = 8) -> jax.Array:
    """The first layer's inputs `[N, T, D]` for calibration tokens `[N, T]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    bs = batch_size_for(tokens.shape[0], batch_size)
    graphdef, state = nnx.split(model.embed_tokens)
    return jnp.concatenate([programs.embed(graphdef, state, tokens[i:i + bs])
                            for i in range(0, tokens.shape[0], bs)])


# the layer programs, under the names benchmarks/calibration_parts.py times
_forward, _forward_with_stats = programs.forward, programs.forward_with_stats
_set_recording = programs.set_recording


def _statistics(layer, plan: Plan, x, inv_freq, bs: int, want_out: bool):
    """The finished statistics of `plan` over the inputs `x [N, T, D]` (batches of `bs`), and
    the unpruned layer's outputs when `want_out`."""
    graphdef, state = programs.split_recording(layer, plan)
    sums, stacks, outs = None, [], []
    for start in range(0, x.shape[0], bs):
        total, stacked, out = _forward_with_stats(graphdef, plan, state, x[start:start + bs],
                                                  want_out, inv_freq)
        sums = total if sums is None else jax.tree.map(jnp.add, sums, total)
        stacks.append(stacked)
        outs.append(out)
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *stacks) if stacks[0] else ()
    n, t = x.shape[:2]
    stats = programs.finish(plan, sums, stacked, n, n * t)
    jax.block_until_ready(stats)
    return stats, jnp.concatenate(outs) if want_out else None


def calibrate_layer(i: int, layer, x, inv_freq, visit: Visit, collectors: Sequence[Collector], *,
                    batch_size: int, keep_outputs: bool = False, edits: bool = True,
                    timings: dict[str, float], to_host: bool = False,
                    split: parallel.DataParallel | None = None):
    """One layer of the driver (module docstring, steps 1-3) on its inputs `x [N, T, D]`: the
    statistics forward, `visit`, the pruned forward. Returns the next layer's inputs.

    `x` may be a host (NumPy) array: each batch of `batch_size` sequences goes to the device on
    its own. With `to_host` the outputs come back to the host batch by batch (the streamed
    driver, `nnxprune.calibration.streamed`, keeps every sample's activations there). With
    `split` both forwards run data-parallel (`nnxprune.calibration.parallel`) on `x`, a global
    array sharded over the mesh's data axis (`split.embed`), and so are the returned inputs."""
    n_seq, seqlen = (split.sequences if split else x.shape[0]), x.shape[1]
    bs = batch_size
    plan = tuple((c, c.taps(i)) for c in collectors if c.active(i))
    if plan or not collectors:
        t0 = time.perf_counter()
        want_out = keep_outputs or not edits or any(c.needs_output for c, _ in plan)
        statistics = split.statistics if split else _statistics
        stats, outs = statistics(layer, plan, x, inv_freq, bs, want_out) if (
            plan or want_out) else ({}, None)
        timings["forward_stats"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        visit(i, layer, LayerCalibration(
            index=i, inputs=split.unpadded(x) if split else x,
            outputs=split.unpadded(outs) if split and want_out else outs, stats=stats,
            sequences=n_seq, tokens=n_seq * seqlen))
        timings["visit"] += time.perf_counter() - t0
        if not edits:
            return np.asarray(outs) if to_host else outs
    t0 = time.perf_counter()
    if split:
        x = split.forward(layer, x, inv_freq)
        timings["forward_pruned"] += time.perf_counter() - t0
        return x
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
    split = parallel.data_parallel(n_seq, bs)  # None: one device, the path as it always was
    timings = {"forward_stats": 0.0, "visit": 0.0, "forward_pruned": 0.0}
    t0 = time.perf_counter()
    # held in a list so that the embedding output dies once layer 0 has run: `run_layers` keeps
    # the only reference (one activation, 75 MB at 32 x 1024 x 576, less at the peak)
    inputs = [split.embed(model, tokens) if split else embed_inputs(model, tokens, bs)]
    timings["embed"] = time.perf_counter() - t0
    bar = tqdm(total=len(model.layers), desc=desc, unit="layer", leave=False,
               disable=not progress or not multihost.is_primary())

    def layer_call(i, layer, x, positions, inv_freq, cache, attention_fn):
        interrupt.stop_if_requested()  # a safe point: between layers
        x = calibrate_layer(i, layer, x, inv_freq, visit, collectors, batch_size=bs,
                            keep_outputs=keep_outputs, edits=edits, timings=timings, split=split)
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
