"""The sequential block-by-block calibration driver (Wanda / SparseGPT style).

Calibration inputs are embedded once; then, for each decoder layer in order:

1. run the layer on its current inputs while collecting, for every targeted projection, the
   statistics of that projection's input (per input column sum of squares, for Wanda; X^T X, for
   SparseGPT) — all projections of the layer from one forward of the unpruned layer, as the
   reference code does with forward hooks;
2. hand the statistics to `visit(index, layer, stats)`, which prunes the layer's projections;
3. run the pruned layer again on the same inputs and feed its outputs to the next layer.

Only one layer's activations (inputs and outputs, `[N, T, D]` each) live at a time. Each layer's
forward is one `jax.jit` per layer shape (the statistics are reduced inside it, so the captured
projection inputs never leave the device), compiled once and reused by every layer of that shape.

Projection inputs are captured with `nnx.capture`: `Linear.record_inputs` makes a projection sow
its input as a `ProjectionInput`; it is switched on only inside the statistics forward.

Example:
    >>> def visit(i, layer, stats):
    ...     for name, s in stats.items(): ...   # s.sumsq [in], s.xtx [in, in], s.tokens
    >>> run_sequential(model, tokens, visit, want_xtx=True)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune.graph.targets import projection_names
from nnxprune.variables import ProjectionInput

@dataclasses.dataclass(frozen=True)
class ProjectionStats:
    """Statistics of one projection's input over all calibration tokens."""

    tokens: int  # rows seen (sequences x tokens)
    sequences: int  # calibration sequences seen (the reference codes' `nsamples`)
    sumsq: jax.Array  # [in]: sum over tokens of x_j^2 (Wanda's squared column norms)
    xtx: jax.Array | None  # [in, in]: sum over tokens of x x^T (SparseGPT's H = 2 / sequences * xtx)

    def hessian(self) -> jax.Array:
        """SparseGPT's `H = 2 / nsamples * X^T X`, float32."""
        if self.xtx is None:
            raise ValueError("X^T X was not collected (want_xtx=False)")
        return self.xtx * (2.0 / self.sequences)


def _batch_size(n: int, wanted: int) -> int:
    """The largest divisor of `n` not above `wanted` (one compiled shape, no padding)."""
    return max(d for d in range(1, min(n, wanted) + 1) if n % d == 0)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


# Both forwards run the layer one calibration sequence at a time (`lax.map` / `lax.scan` over the
# batch): on CPU the blocked causal attention is about 1.4x faster per sequence at batch 1 than
# batched (its tiles stay in cache), and the whole SmolLM2 layer over 8 x 1024 tokens 1.15x.
# Exact: each sequence is independent, and statistics are summed over sequences in the scan.


def _layer_on_row(layer, row, inv_freq):
    """`layer` on one sequence `row [T, D]`."""
    positions = jnp.arange(row.shape[0])[None]
    return layer(row[None], positions, inv_freq)[0][0]


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, x, inv_freq):
    return jax.lax.map(lambda row: _layer_on_row(nnx.merge(graphdef, state), row, inv_freq), x)


def _row_stats(graphdef, state, row, inv_freq, want_xtx: bool):
    """`{projection: (sum of x^2 [in], X^T X [in, in] or None)}` over one sequence `row [T, D]`."""
    _, captured = nnx.capture(_layer_on_row, ProjectionInput)(nnx.merge(graphdef, state), row,
                                                              inv_freq)
    stats = {}
    for path, var in nnx.to_flat_state(captured):
        (inp,) = var.get_value() if hasattr(var, "get_value") else var.value
        rows = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        name = ".".join(map(str, path[:-1]))
        stats[name] = (jnp.sum(rows * rows, axis=0),
                       jnp.dot(rows.T, rows, precision=jax.lax.Precision.HIGHEST) if want_xtx else None)
    return stats


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_with_stats(graphdef, state, x, inv_freq, want_xtx: bool):
    """The statistics of every recorded projection input, summed over the sequences of `x`."""
    def body(total, row):
        stats = _row_stats(graphdef, state, row, inv_freq, want_xtx)
        return jax.tree.map(jnp.add, total, stats), None

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(lambda r: _row_stats(graphdef, state, r, inv_freq, want_xtx), x[0]))
    # only the statistics leave the program, so XLA drops what no projection input needs (the
    # down projection's product and the residual sum): the pruned forward gives the outputs
    return jax.lax.scan(body, zeros, x)[0]


def embed_inputs(model, tokens: np.ndarray, batch_size: int = 8) -> jax.Array:
    """The first layer's inputs `[N, T, D]` for calibration tokens `[N, T]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    bs = _batch_size(tokens.shape[0], batch_size)
    graphdef, state = nnx.split(model.embed_tokens)
    return jnp.concatenate([_embed(graphdef, state, tokens[i:i + bs])
                            for i in range(0, tokens.shape[0], bs)])


def _set_recording(layer, names: list[str], on: bool) -> None:
    for name in names:
        node = layer
        for part in name.split("."):
            node = getattr(node, part)
        node.record_inputs = on


Visit = Callable[[int, nnx.Module, dict[str, ProjectionStats]], None]


def run_sequential(model, tokens: np.ndarray, visit: Visit, *, targets: str | None = None,
                   ignore: str | None = None, want_xtx: bool = False, batch_size: int = 8,
                   progress: bool = True, desc: str = "calibrate") -> dict[str, float]:
    """Runs the sequential driver (module docstring); returns timings in seconds.

    `visit(i, layer, stats)` gets the layer and `{name within the layer: ProjectionStats}` for
    its targeted projections (names like `self_attn.q_proj`); whatever it does to the layer is
    what the next layer's inputs see.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [nsamples, seqlen], got {tokens.shape}")
    full_names = projection_names(model, targets, ignore)
    per_layer: dict[int, list[str]] = {}
    for name in full_names:
        _, index, rest = name.split(".", 2)
        per_layer.setdefault(int(index), []).append(rest)
    n_seq, seqlen = tokens.shape
    bs = _batch_size(n_seq, batch_size)
    timings = {"forward_stats": 0.0, "visit": 0.0, "forward_pruned": 0.0}

    t0 = time.perf_counter()
    x = embed_inputs(model, tokens, bs)
    inv_freq = model.inv_freq
    timings["embed"] = time.perf_counter() - t0
    bar = tqdm(total=len(model.layers), desc=desc, unit="layer", disable=not progress, leave=False)
    for i, layer in enumerate(model.layers):
        names = per_layer.get(i, [])
        if names:
            t0 = time.perf_counter()
            _set_recording(layer, names, True)
            graphdef, state = nnx.split(layer)
            _set_recording(layer, names, False)
            sums: dict[str, list] = {}
            for start in range(0, n_seq, bs):
                batch_stats = _forward_with_stats(graphdef, state, x[start:start + bs], inv_freq,
                                                  want_xtx)
                for name, (sumsq, xtx) in batch_stats.items():
                    if name not in sums:
                        sums[name] = [sumsq, xtx]
                    else:
                        sums[name][0] = sums[name][0] + sumsq
                        if xtx is not None:
                            sums[name][1] = sums[name][1] + xtx
            jax.block_until_ready(sums)  # (ProjectionStats is no pytree: block on the arrays)
            stats = {name: ProjectionStats(tokens=n_seq * seqlen, sequences=n_seq, sumsq=s, xtx=h)
                     for name, (s, h) in sums.items()}
            timings["forward_stats"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            visit(i, layer, stats)
            timings["visit"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        graphdef, state = nnx.split(layer)
        x = jnp.concatenate([_forward(graphdef, state, x[s:s + bs], inv_freq)
                             for s in range(0, n_seq, bs)])
        x.block_until_ready()
        timings["forward_pruned"] += time.perf_counter() - t0
        bar.update(1)
    bar.close()
    return timings
