"""Perplexity under a pinned `PerplexityProtocol`.

Each window of `seqlen` tokens is scored on its own (no context carried between windows); the
model predicts tokens 1..seqlen-1 of it. Perplexity is `exp(sum NLL / predicted tokens)` over all
windows, which equals the Wanda / SparseGPT reference evaluation (mean of per-window mean losses)
because every window predicts the same number of tokens.

`score_windows` runs the model layer by layer over all windows (`evaluate.layerwise`, the engine
the streamed evaluator shares): one program per layer shape and one for the head, each compiled
ahead of time once per batch shape (the ragged last batch is padded and masked, so there is one
shape), with XLA's default pipeline and no compiler options, on every CPU (DESIGN.md principle
14: an experimental option such as oneDNN matmuls killed the process with SIGILL on an AVX-512
EPYC). A pruned layer's masks are folded into its kernels once per chunk of windows, so one
layer's masked kernels exist at a time (in one whole-model program XLA computed every layer's
masked kernels first and held them all: a second copy of the kernels). `make_scorer` is the
whole-model program (for benchmarks); both give the same numbers bit for bit. The output head
runs in position chunks and vocabulary tiles (`evaluate.head`), so no `[B, T, V]` logits exist.

Example:
    >>> result = evaluate_perplexity(loaded.model, loaded.tokenizer, protocol_for("wikitext2"),
    ...                              data_dir="../shared/data")
    >>> result.ppl, result.protocol.describe()
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune import data as data_lib
from nnxprune.errors import UserError
from nnxprune.evaluate.head import head_logprobs
from nnxprune.evaluate.layerwise import ModelPieces, score_layerwise
from nnxprune.evaluate.protocol import PerplexityProtocol
from nnxprune.models.llama import Llama

HOST_MEMORY_BYTES = 2**30  # the in-memory evaluator's budget for the windows' hidden states


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    """A perplexity number with everything needed to interpret it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens fed to the model (windows * seqlen)
    predicted_tokens: int
    windows: int
    seconds: float  # wall time of the scoring loop, compilation excluded
    compile_seconds: float
    protocol: PerplexityProtocol

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["protocol"] = self.protocol.to_dict()
        d["tokens_per_second"] = self.tokens_per_second
        return d

    def summary(self) -> dict[str, Any]:
        """The entry a run report keeps (its protocol is recorded once, beside the entries)."""
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second}


def token_nll(model: Llama, tokens: jax.Array) -> jax.Array:
    """Per-token NLL `[B, T-1]` of `tokens [B, T]` under `model`, in float32."""
    h, _ = model.hidden_states(tokens)
    h, targets = h[:, :-1], tokens[:, 1:]
    b, t, d = h.shape
    lp, _ = head_logprobs(model, h.reshape(b * t, d), targets.reshape(-1))
    return -lp.reshape(b, t)


def make_scorer(model: Llama):
    """`score(state, tokens [B, T], weight [B]) -> weighted NLL sum`, jitted over the state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, tokens, weight):
        nll = token_nll(nnx.merge(graphdef, state), tokens)
        return jnp.sum(nll.sum(axis=1) * weight)

    return score, state


def compile_scorer(model: Llama, batch: int, seqlen: int):
    """`make_scorer` compiled ahead of time for `[batch, seqlen]` windows, with XLA's defaults:
    `(compiled(state, tokens, weight), state)`."""
    score, state = make_scorer(model)
    lowered = score.trace(state, jax.ShapeDtypeStruct((batch, seqlen), jnp.int32),
                          jax.ShapeDtypeStruct((batch,), jnp.float32)).lower()
    return lowered.compile(), state


def evaluate_perplexity(model: Llama, tokenizer: Any, protocol: PerplexityProtocol, *,
                        data_dir=None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` under `protocol` (data from `data_dir`, `$NNXPRUNE_DATA_DIR` or the hub)."""
    context = model.config.max_position_embeddings
    if protocol.seqlen > context:
        raise UserError(f"seqlen {protocol.seqlen} is beyond the model's context of {context} tokens")
    data_dir = data_lib.resolve_data_dir(data_dir)
    stream = data_lib.token_stream(protocol, tokenizer, data_dir)
    windows = data_lib.windows(stream, protocol)
    return score_windows(model, windows, protocol, progress=progress)


def score_windows(model: Llama, windows: np.ndarray, protocol: PerplexityProtocol, *,
                  progress: bool = True,
                  host_memory_bytes: int = HOST_MEMORY_BYTES) -> PerplexityResult:
    """Scores pre-cut `windows [N, seqlen]` (the part of `evaluate_perplexity` that runs the model).

    Layer by layer over all windows (`evaluate.layerwise`): each layer's masks are folded once
    per chunk of windows, so one layer's masked kernels exist at a time; the windows' hidden
    states take at most `host_memory_bytes` (float32), more windows go in chunks. The numbers are
    the whole-model scorer's (`make_scorer`), bit for bit."""
    windows = np.asarray(windows)
    t0 = time.perf_counter()
    sums, compile_seconds = score_layerwise(ModelPieces(model), windows, protocol.batch_size,
                                            host_memory_bytes=host_memory_bytes, progress=progress,
                                            desc=f"ppl {protocol.dataset}")
    return result_of(sums, windows.shape, protocol, seconds=time.perf_counter() - t0 - compile_seconds,
                     compile_seconds=compile_seconds)


def result_of(sums: list[float], shape: tuple[int, int], protocol: PerplexityProtocol, *,
              seconds: float, compile_seconds: float) -> PerplexityResult:
    """The `PerplexityResult` of per-batch weighted NLL sums over windows of `shape [N, T]`."""
    n, seqlen = shape
    predicted = n * (seqlen - 1)
    nll = sum(sums, 0.0) / predicted
    if not math.isfinite(nll):
        raise FloatingPointError(f"perplexity is not finite (mean NLL {nll})")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=n * seqlen, predicted_tokens=predicted,
                            windows=n, seconds=seconds, compile_seconds=compile_seconds,
                            protocol=protocol)
