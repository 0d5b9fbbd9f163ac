"""Perplexity one decoder layer at a time: memory bounded by one layer (DESIGN.md, principle 12).

The same protocol, windows and numbers as `evaluate.perplexity`, but the model is never built.
The hidden states of the windows live on the host (`[N, T, D]` float32 NumPy, in chunks of
windows that fit `host_memory_bytes` when all of them would not), and

1. the embedding rows of the windows are looked up (the embedding read once, then released);
2. each decoder layer in order is onloaded from a lazy layer source
   (`nnxprune.io.layers.LayerSource.layer`: an HF folder, a GGUF file or an nnxprune checkpoint)
   in the run dtype, its masks (a checkpoint's) folded into its kernels, applied to every window a batch at a
   time (one jitted program per layer shape, the call the in-memory model makes), and released;
3. the final norm, the output head and the log-likelihood of each batch run as the in-memory
   scorer's tail does (`token_nll`'s `head_logprobs`), the NLL summed per batch in the same order.

The steps, programs and batches are `evaluate.layerwise`'s, which the in-memory `score_windows`
runs too, so both give the same number. A window chunk holds a whole number of batches; chunking
changes nothing but how often each layer is read.

This is the sequential onloading of llm-compressor (vllm-project/llm-compressor, "sequential
pipeline") applied to evaluation: a 70B model's perplexity needs one layer's weights, the
windows' hidden states and the head in memory.

Example:
    >>> source = open_layers("smollm2-135m")
    >>> result = evaluate_streamed(source, load_tokenizer(source.path, source.kind),
    ...                            protocol_for("wikitext2", max_windows=8))
    >>> result.ppl      # equals evaluate_perplexity's on the loaded model
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnxprune import data as data_lib
from nnxprune.errors import UserError
from nnxprune.evaluate.layerwise import Head, folded, score_layerwise
from nnxprune.evaluate.perplexity import PerplexityResult, result_of
from nnxprune.evaluate.protocol import PerplexityProtocol

HOST_MEMORY_BYTES = 4 * 2**30  # default budget for the windows' hidden states on the host


def globals_model(source, param_dtype=jnp.float32):
    """A `Llama` with no decoder layers holding `source`'s embedding, final norm and (untied)
    head in `param_dtype`: the pieces of the model outside the layer stack."""
    from nnxprune.io.hf import model_from_tensors

    cfg = dataclasses.replace(source.config, layers=())
    return model_from_tensors(cfg, ((k, source.tensor(k)) for k in source.global_keys()),
                              param_dtype=param_dtype, source=str(source.path))


class SourcePieces:
    """A lazy layer source as `evaluate.layerwise`'s pieces, in `param_dtype`."""

    def __init__(self, source, param_dtype=jnp.float32):
        self.source, self.param_dtype = source, param_dtype
        self.config = source.config

    def embedded(self, tokens: np.ndarray) -> np.ndarray:
        """The embedding rows of `tokens` in the run dtype, as float32 (what `Embed` gives)."""
        embedding = self.source.tensor("model.embed_tokens.weight")
        rows = np.asarray(embedding[np.asarray(tokens)])
        del embedding
        return np.array(jnp.asarray(rows, self.param_dtype), np.float32)  # a writable copy

    def layer(self, i: int):
        """Layer `i` onloaded, masks (an nnxprune checkpoint's) folded as `ModelPieces` folds them."""
        return folded(self.source.layer(i, self.param_dtype))

    def head(self) -> Head:
        return Head(globals_model(self.source, self.param_dtype))


def evaluate_streamed_windows(source, windows: np.ndarray, protocol: PerplexityProtocol, *,
                              param_dtype=jnp.float32, progress: bool = True,
                              host_memory_bytes: int = HOST_MEMORY_BYTES) -> PerplexityResult:
    """Scores pre-cut `windows [N, seqlen]` layer by layer from `source` (module docstring).

    `source` is a `nnxprune.io.layers.LayerSource` (or anything with its `config`, `path`,
    `layer(i, param_dtype)`, `tensor(key)` and `global_keys()`): a model's files, or a pruned
    output folder written layer by layer. The result equals `score_windows` on the same model
    loaded in `param_dtype`."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [N, seqlen] with N >= 1, got {windows.shape}")
    t0 = time.perf_counter()
    sums, compile_seconds = score_layerwise(
        SourcePieces(source, param_dtype), windows, protocol.batch_size,
        host_memory_bytes=host_memory_bytes, progress=progress,
        desc=f"ppl {protocol.dataset} (streamed)")
    return result_of(sums, windows.shape, protocol, seconds=time.perf_counter() - t0 - compile_seconds,
                     compile_seconds=compile_seconds)


def evaluate_streamed(source, tokenizer: Any, protocol: PerplexityProtocol, *, data_dir=None,
                      param_dtype=jnp.float32, progress: bool = True,
                      host_memory_bytes: int = HOST_MEMORY_BYTES) -> PerplexityResult:
    """`evaluate_perplexity` for a model that stays in its files: `protocol`'s windows (data from
    `data_dir`, `$NNXPRUNE_DATA_DIR` or the hub) scored layer by layer from `source`."""
    context = source.config.max_position_embeddings
    if protocol.seqlen > context:
        raise UserError(f"seqlen {protocol.seqlen} is beyond the model's context of {context} tokens")
    if host_memory_bytes < 1:
        raise UserError(f"the host memory budget must be positive, got {host_memory_bytes} bytes")
    data_dir = data_lib.resolve_data_dir(data_dir)
    stream = data_lib.token_stream(protocol, tokenizer, data_dir)
    windows = data_lib.windows(stream, protocol)
    return evaluate_streamed_windows(source, windows, protocol, param_dtype=param_dtype,
                                     progress=progress, host_memory_bytes=host_memory_bytes)
