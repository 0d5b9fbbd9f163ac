"""Perplexity scored layer by layer over all windows: the engine of both evaluators.

`perplexity.score_windows` (a model in memory) and `streamed.evaluate_streamed_windows` (a model
that stays in its files) run the same steps, with the same programs, so they give the same
numbers. The windows' hidden states live on the host (`[n, T, D]` float32 NumPy, in chunks of
whole batches that fit `host_memory_bytes`), and per chunk

1. the embedding rows of the windows are looked up (`pieces.embedded`);
2. each decoder layer in order is taken from `pieces.layer(i)` (onloaded from a file, or the
   in-memory layer with its masks folded into its kernels, once for the whole chunk: one layer's
   masked kernels exist at a time, not every layer's as when XLA compiles the masking of every
   layer into one program), applied to every window a batch at a time (one program per layer
   shape), and released;
3. the final norm, the output head and the log-likelihood of each batch run as `token_nll`'s tail
   (`head_logprobs`), the NLL summed per batch, in the batches' order.

Batches have the protocol's batch size; the ragged tail is padded with copies of the first window
and weighted 0, so every program has one shape. Each program is compiled ahead of time with XLA's
defaults (DESIGN.md, principle 14), RoPE frequencies inside it, as the whole-model scorer
(`perplexity.make_scorer`) computes them: the per-layer programs give that scorer's numbers
bit for bit (tests/evaluate/test_streamed_eval.py). llm-compressor's sequential onloading
(vllm-project/llm-compressor, "sequential pipeline") is the model for the streamed use.

Example:
    >>> sums, compile_seconds = score_layerwise(ModelPieces(model), windows, batch_size=4)
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune import interrupt
from nnxprune.evaluate.head import head_logprobs
from nnxprune.layers import Linear
from nnxprune.models.llama import default_positions, rope_inv_freq


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer_forward(graphdef, rope, state, x):
    """One decoder layer on `x [B, T, D]` (whole windows, positions 0..T-1). The RoPE frequencies
    are computed inside from `rope = (head_dim, theta, scaling)`, as in the whole-model scorer
    (XLA folds them to constants there; computed outside they may differ in the last bit)."""
    layer = nnx.merge(graphdef, state)
    return layer(x, default_positions(x[:, :, 0]), rope_inv_freq(*rope), None, None)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _tail_nll(graphdef, state, x, tokens, weight):
    """`token_nll`'s tail on the last layer's output `x [B, T, D]`: the final norm, the head's
    log-likelihood of tokens 1..T-1, summed per window and weighted."""
    head = nnx.merge(graphdef, state)
    h, targets = head.norm(x)[:, :-1], tokens[:, 1:]
    b, t, d = h.shape
    lp, _ = head_logprobs(head, h.reshape(b * t, d), targets.reshape(-1))
    return jnp.sum(-lp.reshape(b, t).sum(axis=1) * weight)


class Head(nnx.Module):
    """The pieces of a model outside its layer stack, shared (not copied): what the tail reads."""

    def __init__(self, model):
        self.embed_tokens, self.norm = model.embed_tokens, model.norm
        self.lm_head = nnx.data(model.lm_head)


def folded(layer):
    """A view of decoder `layer` whose masked kernels are `kernel * mask` and carry no mask: the
    folded kernels are new arrays, everything else is shared; `layer` is left as it is."""
    graphdef, state = nnx.split(layer)
    view = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(view):
        if isinstance(node, Linear) and node.mask is not None:
            if node.bias is not None:  # wholly masked output channels emit no bias (Linear)
                node.bias = nnx.Param(node.effective_bias())
            node.kernel = nnx.Param(node.effective_kernel())
            node.mask = None
    return view


class ModelPieces:
    """An in-memory `Llama` as the engine's pieces (module docstring)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def embedded(self, tokens: np.ndarray) -> np.ndarray:
        rows = self.model.embed_tokens(jnp.asarray(tokens, jnp.int32))
        return np.array(rows, np.float32)  # a writable copy

    def layer(self, i: int):
        return folded(self.model.layers[i])

    def head(self) -> Head:
        return Head(self.model)


class _Programs:
    """Each program compiled ahead of time once per static arguments and shapes, with XLA's
    defaults (as `perplexity.compile_scorer`); `compile` is the time spent compiling."""

    def __init__(self):
        self.compiled: dict = {}
        self.compile = 0.0

    def call(self, fn, static: tuple, *args):
        """`fn(*static, *args)`, `static` being its static arguments."""
        key = (fn, static, tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args)))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = fn.trace(*static, *args).lower().compile()
            self.compile += time.perf_counter() - t0
        return self.compiled[key](*args)


def _batches(n: int, bs: int):
    """`(start, stop, pad)` of each batch of `bs` windows of `n` (the last padded by `pad`)."""
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        yield start, stop, bs - (stop - start)


def _padded(a: np.ndarray, pad: int) -> np.ndarray:
    """`a` with `pad` copies of its first row appended (the whole-model scorer's padding)."""
    return a if not pad else np.concatenate([a, np.repeat(a[:1], pad, axis=0)])


def chunk_windows(n: int, seqlen: int, hidden: int, batch_size: int, host_memory_bytes: int) -> int:
    """Windows per chunk: as many whole batches as have float32 hidden states `[seqlen, hidden]`
    within `host_memory_bytes` (at least one batch), at most `n` rounded up to a batch."""
    per_batch = batch_size * seqlen * hidden * 4
    batches = max(1, host_memory_bytes // per_batch)
    return min(batches, -(-n // batch_size)) * batch_size


def _run_chunk(pieces, tokens: np.ndarray, bs: int, programs: _Programs, bar) -> list[float]:
    """The weighted NLL sum of each batch of the windows `tokens [n, T]` (module docstring)."""
    cfg = pieces.config
    rope = (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = pieces.embedded(tokens)  # [n, T, D] on the host, updated in place layer by layer
    for i in range(cfg.num_layers):
        interrupt.stop_if_requested()  # a safe point: between layers
        graphdef, state = nnx.split(pieces.layer(i))
        for start, stop, pad in _batches(len(x), bs):
            out = programs.call(_layer_forward, (graphdef, rope), state, _padded(x[start:stop], pad))
            x[start:stop] = np.asarray(out)[:stop - start]
        del graphdef, state, out
        bar.update(1)
    graphdef, state = nnx.split(pieces.head())
    sums = []
    for start, stop, pad in _batches(len(x), bs):
        weight = np.ones(bs, np.float32)
        weight[bs - pad:] = 0.0
        sums.append(float(programs.call(_tail_nll, (graphdef,), state, _padded(x[start:stop], pad),
                                        jnp.asarray(_padded(tokens[start:stop], pad), jnp.int32),
                                        jnp.asarray(weight))))
    bar.update(1)
    return sums


def score_layerwise(pieces, windows: np.ndarray, batch_size: int, *, host_memory_bytes: int,
                    progress: bool = True, desc: str = "ppl") -> tuple[list[float], float]:
    """The weighted NLL sum of every batch of `windows [N, T]` (in order) and the seconds spent
    compiling. `pieces` has `config`, `embedded(tokens)`, `layer(i)` and `head()`."""
    n, seqlen = windows.shape
    bs = min(batch_size, n)
    per_chunk = chunk_windows(n, seqlen, pieces.config.hidden_size, bs, host_memory_bytes)
    programs = _Programs()
    bar = tqdm(total=-(-n // per_chunk) * (pieces.config.num_layers + 1), desc=desc, unit="layer",
               disable=not progress, leave=False)
    sums: list[float] = []
    for start in range(0, n, per_chunk):
        sums += _run_chunk(pieces, windows[start:start + per_chunk], bs, programs, bar)
    bar.close()
    return sums, programs.compile
