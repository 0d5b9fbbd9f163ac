"""The sequential driver over a lazy layer source: memory bounded by one layer (DESIGN.md, 12).

The same steps as `run_sequential` (`calibrate_layer` is shared, so both give identical results),
but the model is never built: the calibration activations of all samples stay on the host
(`[N, T, D]` float32 NumPy), and for each decoder layer in order

1. the layer is onloaded from the source (`nnxprune.io.layers.LayerSource.layer`) in the run dtype;
2. its statistics are collected batch by batch, `visit` prunes it, and its pruned outputs come
   back to the host as the next layer's inputs;
3. `write(i, layer)` saves it, and it is released before the next layer is read.

Without calibration tokens (Magnitude) no forward runs: each layer is read, visited, written.

Example:
    >>> source = open_layers("smollm2-135m")
    >>> run_streamed(source, tokens, visit, [InputSumSq.for_layers(names)], write=writer.write_layer)
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nnxprune import interrupt
from nnxprune.calibration.collectors import Collector
from nnxprune.calibration.sequential import Visit, batch_size_for, calibrate_layer
from nnxprune.models.llama import rope_inv_freq


def host_embeddings(source, tokens: np.ndarray, param_dtype=jnp.float32) -> np.ndarray:
    """The first layer's inputs `[N, T, D]` (float32, on the host): the embedding rows of
    `tokens`, rounded to the run dtype as the in-memory model's embedding would be."""
    embedding = source.tensor("model.embed_tokens.weight")
    rows = np.asarray(embedding[np.asarray(tokens)])
    del embedding
    return np.asarray(jnp.asarray(rows, param_dtype), np.float32)


def run_streamed(source, tokens: np.ndarray | None, visit: Visit,
                 collectors: Sequence[Collector] = (), *,
                 write: Callable[[int, object], None] | None = None,
                 param_dtype=jnp.float32, batch_size: int = 8, progress: bool = True,
                 desc: str = "stream", start: int = 0, x: np.ndarray | None = None,
                 after_layer: Callable[[int, np.ndarray | None, dict], None] | None = None,
                 edits: bool = True, read: Callable[[int], object] | None = None) -> dict:
    """Runs every layer of `source` through `visit` and `write` (module docstring). Returns
    timings in seconds, with `per_layer` (read + calibrate + visit + write of each layer).

    A resumed run starts at layer `start` with `x`, the host activations entering it (with
    calibration tokens); `after_layer(i, x, timings)` is called once layer `i` is written, with
    the activations entering layer `i + 1` (`nnxprune.io.resumable` saves them).

    `edits = False` promises, as for `run_sequential`, that the next layer's inputs are the
    unedited layer's outputs (one forward per layer: an analysis pass over the dense model, or
    surgery that `visit` does after the statistics). Without `write` nothing is written (an
    analysis pass); `read(i)` replaces `source.layer(i, param_dtype)` (None: a pass that copies
    tensors and onloads nothing)."""
    cfg = source.config
    timings = {"forward_stats": 0.0, "visit": 0.0, "forward_pruned": 0.0, "read": 0.0,
               "write": 0.0, "embed": 0.0, "per_layer": []}
    if tokens is None:
        x = None
    else:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"calibration tokens must be [nsamples, seqlen], got {tokens.shape}")
        if x is None:
            t0 = time.perf_counter()
            x = host_embeddings(source, tokens, param_dtype)
            timings["embed"] = time.perf_counter() - t0
        bs = batch_size_for(tokens.shape[0], batch_size)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    for i in tqdm(range(start, cfg.num_layers), desc=desc, unit="layer", disable=not progress,
                  leave=False, initial=start, total=cfg.num_layers):
        interrupt.stop_if_requested()  # a safe point: between layers
        begin = time.perf_counter()
        layer = source.layer(i, param_dtype) if read is None else read(i)
        timings["read"] += time.perf_counter() - begin
        if x is None:
            t0 = time.perf_counter()
            visit(i, layer, None)
            timings["visit"] += time.perf_counter() - t0
        else:
            x = calibrate_layer(i, layer, x, inv_freq, visit, collectors, batch_size=bs,
                                timings=timings, to_host=True, edits=edits)
        if write is not None:
            t0 = time.perf_counter()
            write(i, layer)
            timings["write"] += time.perf_counter() - t0
        del layer
        timings["per_layer"].append(time.perf_counter() - begin)
        if after_layer is not None:
            after_layer(i, x, timings)
    return timings
