"""SLEB: iterative removal of the decoder block whose removal raises calibration perplexity least.

Song et al., "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks", ICML 2024, arXiv 2402.09025; code jiwonsong-dev/SLEB (`sleb.py`,
`utils/onoff_utils/onoff_llama.py`). `count` times: every surviving block that is neither among
the first `early_barrier` nor the last `latter_barrier` surviving blocks (the reference's
barriers, 1 and 1) is switched off in turn, the model without it scores the calibration text, and
the block whose removal gives the lowest total next-token NLL goes (ties: the earlier block, as the
reference's strict `<`). Each step scores the model after the previous removals, so the choice
adapts to what is already gone (one-shot methods, `depth` and `shortened`, rank all blocks once).

Scoring is soft, as the reference's `turn_off`: a switched-off block passes its input through.
That equals the block's soft removal in the graph (`graph.mask_group` on `layer[i]` masks o_proj
and down_proj, so the block adds exactly zero to the residual stream); skipping it gives the same
numbers without computing them. Every block runs through one jitted layer forward per layer shape
(`_layer_forward`, compiled once and reused by every candidate of every step: a candidate is a
different keep vector over the same compiled programs, never a recompilation), and candidates share
work: the hidden states entering every surviving block are computed once per step, so candidate `j`
runs only the surviving blocks after it, then the final norm and output head. At the end the chosen
blocks are deleted for real (`graph.drop_layers`).

Metric: the reference sums, over its calibration windows, the mean cross-entropy times the window
length; with windows of equal length that ranks candidates exactly as the total NLL, which is what
we minimize (the report gives it as perplexity, `exp(total NLL / predicted tokens)`).

Calibration: the reference joins 128 documents (lines) of the shuffled WikiText-2 train split with
"\\n\\n" (~8k tokens with LLaMA's tokenizer) and cuts it into 2048-token windows. Here the recipe's
`[calibration]` draw is used (`recipes/sleb.toml`: C4, since the WikiText-2 train split is not
available offline; set `calibration.dataset = "wikitext2"` where it is). Memory: the entering
states of every surviving block, `layers x N x T x D` floats (283 MB for SmolLM2 at 4 x 1024).

Example (a recipe step):
    [[prune]]
    kind = "sleb"
    count = 8
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nnxprune import graph, interrupt
from nnxprune.calibration.sequential import batch_size_for, embed_inputs
from nnxprune.errors import UserError
from nnxprune.evaluate.head import head_logprobs
from nnxprune.models.llama import LlamaConfig, default_positions
from nnxprune.transforms.base import Context, Transform, register


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_forward(graphdef, state, x, inv_freq):
    """One decoder layer on `x [B, T, D]`."""
    return nnx.merge(graphdef, state)(x, default_positions(x[..., 0]), inv_freq)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _head_nll(graphdef, state, h, tokens):
    """Summed next-token NLL of `tokens [B, T]` from last-layer hidden states `h [B, T, D]`
    (`graphdef`/`state`: the model without its decoder layers' work: final norm and head)."""
    model = nnx.merge(graphdef, state)
    hn = model.norm(h[:, :-1])
    b, t, d = hn.shape
    lp, _ = head_logprobs(model, hn.reshape(b * t, d), tokens[:, 1:].reshape(-1))
    return -jnp.sum(lp)


class _Runner:
    """Runs single layers and the head of `model` in batches of `bs` sequences."""

    def __init__(self, model, tokens: np.ndarray, batch_size: int):
        self.model = model
        self.tokens = jnp.asarray(tokens, jnp.int32)
        self.bs = batch_size_for(tokens.shape[0], batch_size)
        self.inv_freq = model.inv_freq
        self.splits = [nnx.split(layer) for layer in model.layers]
        self.head = nnx.split(model)

    def layer(self, i: int, x):
        graphdef, state = self.splits[i]
        return jnp.concatenate([_layer_forward(graphdef, state, x[s:s + self.bs], self.inv_freq)
                                for s in range(0, x.shape[0], self.bs)])

    def nll(self, x) -> float:
        graphdef, state = self.head
        return sum(float(_head_nll(graphdef, state, x[s:s + self.bs], self.tokens[s:s + self.bs]))
                   for s in range(0, x.shape[0], self.bs))


def removal_nll(model, tokens: np.ndarray, candidates: Sequence[int], *,
                alive: Sequence[int] | None = None, batch_size: int = 8,
                progress: bool = False, desc: str = "candidates") -> list[float]:
    """The total next-token NLL of `tokens [N, T]` under `model` with the blocks not in `alive`
    (default: all) and candidate `c` switched off, for every `c` in `candidates` (each alive)."""
    tokens = np.asarray(tokens)
    n = len(model.layers)
    alive = list(range(n)) if alive is None else sorted(alive)
    bad = [c for c in candidates if c not in alive]
    if bad:
        raise ValueError(f"candidates {bad} are not among the alive blocks {alive}")
    run = _Runner(model, tokens, batch_size)
    entering = {}  # hidden states entering every alive block, computed once
    x = embed_inputs(model, tokens, run.bs)
    for i in alive:
        entering[i] = x
        x = run.layer(i, x)
    out = []
    for c in tqdm(candidates, desc=desc, unit="block", disable=not progress, leave=False):
        interrupt.stop_if_requested()  # a safe point: between candidates
        x = entering[c]
        for i in alive:
            if i > c:
                x = run.layer(i, x)
        out.append(run.nll(x))
    return out


def sleb_search(model, tokens: np.ndarray, count: int, *, early_barrier: int = 1,
                latter_barrier: int = 1, batch_size: int = 8, progress: bool = False
                ) -> tuple[list[int], list[dict[int, float]]]:
    """SLEB's removal order (original layer indices) and, per step, each candidate's perplexity."""
    tokens = np.asarray(tokens)
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    alive = list(range(len(model.layers)))
    removed, history = [], []
    for step in range(count):
        candidates = alive[early_barrier:len(alive) - latter_barrier]
        nll = removal_nll(model, tokens, candidates, alive=alive, batch_size=batch_size,
                          progress=progress, desc=f"SLEB step {step + 1}/{count}")
        best = min(range(len(candidates)), key=lambda k: (nll[k], k))  # first on ties
        history.append({c: math.exp(v / predicted) for c, v in zip(candidates, nll)})
        removed.append(candidates[best])
        alive.remove(candidates[best])
    return removed, history


@register("sleb")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SLEB(Transform):
    """Removes `count` decoder blocks one at a time by calibration perplexity (module docstring)."""

    count: int
    early_barrier: int = 1
    latter_barrier: int = 1
    batch_size: int = 8
    kind: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def check(self, config: LlamaConfig) -> LlamaConfig:
        n = config.num_layers
        for name in ("early_barrier", "latter_barrier"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.count < 1:
            raise UserError(f"count must be a positive number of blocks to remove, got {self.count}")
        last = n - (self.count - 1)  # blocks alive at the last step
        if last - self.early_barrier - self.latter_barrier < 1:
            raise UserError(f"cannot remove {self.count} of {n} blocks with barriers "
                            f"{self.early_barrier} (first) and {self.latter_barrier} (last): at the "
                            f"last step no block would be left to choose from")
        # which blocks go is measured; later steps see the first n - count layer shapes
        return dataclasses.replace(config, layers=config.layers[:n - self.count])

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        tokens = ctx.required_tokens("sleb")
        removed, history = sleb_search(model, tokens, self.count,
                                       early_barrier=self.early_barrier,
                                       latter_barrier=self.latter_barrier,
                                       batch_size=self.batch_size, progress=ctx.progress)
        graph.drop_layers(model, removed)
        ctx.log(self.kind, removal_order=removed, dropped=sorted(removed),
                step_ppl=[{str(k): v for k, v in h.items()} for h in history],
                calibration_tokens=int(np.asarray(tokens).size))
        return model
