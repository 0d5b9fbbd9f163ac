"""Depth pruning by measured importance: ShortGPT's block influence and Minitron's block search.

- `method = "block_influence"` (ShortGPT: Men et al., arXiv 2403.03853): every layer's block
  influence `BI_i = 1 - mean cos(h_in, h_out)` over all calibration tokens, measured on the dense
  model in one pass of the sequential driver (`scoring.block_influence`); the `count` layers of
  lowest BI go in one shot (ties: the earlier layer goes).
- `method = "block_search"` (Minitron: Muralidharan et al., arXiv 2407.14679; the search of
  zlab-princeton/llm-pruning-collection, `pruning/minitron/prune_depth.py`): remove each
  contiguous block of `count` layers in turn, score the model by perplexity on held-out
  calibration text, keep the removal that costs least. The collection scores either by
  perplexity (`get_ppl` on c4, wikitext, wikitext2, cnn_dailymail or pg19 text, `calib_size`
  windows of `seq_len`, one per batch) or by an lm-eval task's accuracy (winogrande), and keeps
  the block whose score is closest to the dense model's; we score by next-token
  NLL on the first `search_samples` calibration sequences (drawn by the recipe's sampler, never
  the evaluation set) and keep the lowest. Candidates share work: the dense hidden states entering
  every layer are computed once, so candidate `s` runs only the layers after its block.

Both measure before anything is removed and then delete the layers (`graph.drop_layers`). The
transform's report lists every layer's score (or every candidate's perplexity) and the layers
dropped.

Example (a recipe step):
    [[prune]]
    kind = "depth"
    count = 8
    method = "block_influence"     # or "block_search"
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune import interrupt
from nnxprune import graph
from nnxprune.calibration.sequential import batch_size_for, collect_statistics, embed_inputs
from nnxprune.errors import UserError
from nnxprune.evaluate.head import head_logprobs
from nnxprune.models.llama import LlamaConfig, default_positions
from nnxprune.scoring import get_score
from nnxprune.transforms.base import Context, Transform, nearest, register

METHODS = ("block_influence", "block_search")


def block_influences(model, tokens: np.ndarray, *, batch_size: int = 8, progress: bool = True
                     ) -> list[float]:
    """ShortGPT's BI of every decoder layer of `model` (one calibration pass)."""
    score = get_score("block_influence")
    stats = collect_statistics(model, tokens, score.collectors(), batch_size=batch_size,
                               progress=progress, desc="block influence")
    return [layer_block_influence(model, i, stats) for i in range(len(model.layers))]


def layer_block_influence(model, i: int, stats) -> float:
    """The BI of decoder layer `i` from its statistics (`stats[i]`); `model` may be a view of that
    one layer (the streamed run)."""
    return float(get_score("block_influence")(model, graph.find_group(model, "layer", i), stats)[0])


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_forward(graphdef, state, x, inv_freq):
    return nnx.merge(graphdef, state)(x, default_positions(x[..., 0]), inv_freq)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _nll_sum(graphdef, state, h, tokens):
    """Summed next-token NLL of `tokens [B, T]` from last-layer hidden states `h [B, T, D]`."""
    model = nnx.merge(graphdef, state)
    hn = model.norm(h[:, :-1])
    b, t, d = hn.shape
    lp, _ = head_logprobs(model, hn.reshape(b * t, d), tokens[:, 1:].reshape(-1))
    return -jnp.sum(lp)


def _run(layer, x, inv_freq, bs: int):
    graphdef, state = nnx.split(layer)
    return jnp.concatenate([_layer_forward(graphdef, state, x[s:s + bs], inv_freq)
                            for s in range(0, x.shape[0], bs)])


def block_search(model, tokens: np.ndarray, count: int, *, batch_size: int = 8,
                 progress: bool = True) -> list[float]:
    """Perplexity of `tokens` after removing layers `s .. s+count-1`, for every start `s` in
    `0 .. num_layers - count` (Minitron's contiguous-block search)."""
    tokens = np.asarray(tokens)
    n = len(model.layers)
    bs = batch_size_for(tokens.shape[0], batch_size)
    inv_freq = model.inv_freq
    graphdef, state = nnx.split(model)
    targets = jnp.asarray(tokens, jnp.int32)
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    entering = [embed_inputs(model, tokens, bs)]  # dense inputs of layers 0 .. n - count
    for i in range(n - count):
        entering.append(_run(model.layers[i], entering[-1], inv_freq, bs))
    ppl = []
    for start in tqdm(range(n - count + 1), desc="block search", unit="block",
                      disable=not progress, leave=False):
        interrupt.stop_if_requested()  # a safe point: between candidates
        x = entering[start]
        for i in range(start + count, n):
            x = _run(model.layers[i], x, inv_freq, bs)
        nll = sum(float(_nll_sum(graphdef, state, x[s:s + bs], targets[s:s + bs]))
                  for s in range(0, x.shape[0], bs))
        ppl.append(math.exp(nll / predicted))
    return ppl


@register("depth")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Depth(Transform):
    """Removes `count` decoder layers chosen by `method` (module docstring)."""

    count: int
    method: str = "block_influence"
    batch_size: int = 8
    search_samples: int = 8  # calibration sequences scored per candidate block (block_search)
    kind: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.method not in METHODS:
            raise UserError(nearest(self.method, METHODS, "depth method"))
        n = config.num_layers
        if self.count < 1:
            raise UserError(f"count must be a positive number of layers to remove, got {self.count}")
        if self.count >= n:
            raise UserError(f"cannot remove {self.count} of the model's {n} layers at this step "
                            "(at least one must stay)")
        for name in ("batch_size", "search_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        # which layers go is measured; when layers differ in shape, later steps are checked
        # against the first n - count shapes and again when they run
        return dataclasses.replace(config, layers=config.layers[:n - self.count])

    def drop_lowest(self, scores: list[float], ctx: Context) -> list[int]:
        """The `count` layers of lowest block influence `scores` (ties: the earlier layer goes),
        logged in `ctx` (shared with the streamed run, `nnxprune.streamed_passes`)."""
        drop = sorted(int(i) for i in np.argsort(scores, kind="stable")[:self.count])
        ctx.log(self.kind, method=self.method, block_influence=scores, dropped=drop)
        return drop

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        tokens = ctx.required_tokens("depth pruning")
        if self.method == "block_influence":
            drop = self.drop_lowest(block_influences(model, tokens, batch_size=self.batch_size,
                                                     progress=ctx.progress), ctx)
        else:
            ppl = block_search(model, tokens[:self.search_samples], self.count,
                               batch_size=self.batch_size, progress=ctx.progress)
            start = int(np.argmin(ppl))
            drop = list(range(start, start + self.count))
            ctx.log(self.kind, method=self.method, search_samples=min(self.search_samples,
                                                                      len(tokens)),
                    candidate_ppl=ppl, dropped=drop)
        graph.drop_layers(model, drop)
        return model
