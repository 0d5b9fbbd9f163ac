"""Shortened LLaMA: one-shot depth pruning by the Taylor+ or the PPL criterion.

Kim et al., "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of
Retraining Methods", arXiv 2402.02834; code Nota-NetsPresso/shortened-llm
(`src/anal_block_sensitivity_taylor.py`, `src/anal_block_sensitivity_ppl.py`, `src/block_prune.py`).
Every block is scored once on the unpruned model, blocks are sorted by score (ascending, stable),
and the first `count` of that order go in one shot:

- `criterion = "taylor"` (Taylor+): per block, the sum over all its weights (the seven projection
  kernels and both RMSNorm scales; not the embedding, final norm or head) of `|W * g|`, `g` the
  gradient of the mean next-token cross-entropy. The reference accumulates `W * g_b` over batches
  of `batch_size` calibration sequences (`g_b` the gradient of batch `b`'s mean loss), then takes
  the absolute value; its default batch is all 10 sequences at once. Norm power 1, weight and block
  reductions `sum` (its defaults).
- `criterion = "ppl"`: the perplexity of the calibration sequences with that block alone removed
  (`exp` of the mean next-token NLL over all their tokens); `sleb.removal_nll` scores every block,
  sharing the dense hidden states entering each one.

The "+" heuristic of `block_prune.py` (applied there to both criteria unless
`--no_plus_heuristic`): the first `keep_first` (4) and last `keep_last` (2) blocks are never
removed. Calibration in the reference: 10 BookCorpus passages of 128 tokens (seed 1234); BookCorpus
is not available offline, so the recipes draw 10 x 128 tokens of C4.

Recovery is the recipe's `[recovery]` section, the paper's two settings: LoRA (arXiv v1: rank 8,
alpha 16, dropout 0.05 on q, k, v, o, gate, up, down, lr 1e-4, Alpaca-cleaned; recipes
`shortened-*-lora.toml`) and continued pretraining of all weights (arXiv v2, SlimPajama;
`shortened-ppl-cpt.toml`).

Example (a recipe step):
    [[prune]]
    kind = "shortened"
    criterion = "taylor"
    count = 8
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune import graph
from nnxprune.calibration.gradients import mean_next_token_ce
from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, Transform, nearest, register
from nnxprune.transforms.sleb import removal_nll

CRITERIA = ("ppl", "taylor")
KEEP_FIRST, KEEP_LAST = 4, 2  # block_prune.py's "+" heuristic


def _is_block_param(path, value) -> bool:
    return isinstance(value, nnx.Param) and len(path) >= 2 and path[0] == "layers"


def _loss(graphdef, params, rest, tokens):
    model = nnx.merge(graphdef, params, rest)
    return mean_next_token_ce(model(tokens), tokens)


@jax.jit
def _salience(graphdef, params, rest, tokens):
    """`W * dL/dW` for every decoder-block parameter (L the mean CE of `tokens`)."""
    grads = jax.grad(_loss, argnums=1)(graphdef, params, rest, tokens)
    return jax.tree.map(lambda w, g: w * g, params, grads)


def _float32(state):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, state)


def taylor_block_scores(model, tokens: np.ndarray, *, batch_size: int = 10) -> list[float]:
    """Taylor+ importance of every block: `sum |sum_b W * g_b|` over the block's weights, `g_b`
    the gradient of the mean CE of calibration batch `b` (`batch_size` rows; float32)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, T] with T >= 2, got shape {tokens.shape}")
    graphdef, params, rest = nnx.split(model, _is_block_param, ...)
    params, rest = _float32(params), _float32(rest)
    total = None
    for lo in range(0, tokens.shape[0], batch_size):
        s = _salience(graphdef, params, rest, jnp.asarray(tokens[lo:lo + batch_size], jnp.int32))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    scores = [0.0] * len(model.layers)
    for path, var in nnx.to_flat_state(total):
        scores[int(path[1])] += float(jnp.sum(jnp.abs(var[...])))
    return scores


def ppl_block_scores(model, tokens: np.ndarray, *, batch_size: int = 8) -> list[float]:
    """PPL criterion: the calibration perplexity with each block alone removed."""
    tokens = np.asarray(tokens)
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    nll = removal_nll(model, tokens, range(len(model.layers)), batch_size=batch_size)
    return [math.exp(v / predicted) for v in nll]


def removal_order(scores, keep_first: int, keep_last: int) -> list[int]:
    """Blocks by ascending score (stable), without the first and last blocks the "+" heuristic
    keeps."""
    n = len(scores)
    kept = set(range(min(keep_first, n))) | set(range(max(n - keep_last, 0), n))
    return [int(i) for i in np.argsort(np.asarray(scores), kind="stable") if int(i) not in kept]


@register("shortened")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Shortened(Transform):
    """Removes `count` blocks ranked once by Taylor+ or PPL (module docstring)."""

    count: int
    criterion: str = "ppl"
    keep_first: int = KEEP_FIRST
    keep_last: int = KEEP_LAST
    batch_size: int = 10  # sequences per gradient batch (taylor) or per forward (ppl)
    kind: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.criterion not in CRITERIA:
            raise UserError(nearest(self.criterion, CRITERIA, "criterion"))
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        n = config.num_layers
        free = n - min(self.keep_first + self.keep_last, n)
        if not 1 <= self.count <= free:
            raise UserError(f"count must be in [1, {free}]: {n} blocks, of which the first "
                            f"{self.keep_first} and last {self.keep_last} stay; got {self.count}")
        return dataclasses.replace(config, layers=config.layers[:n - self.count])

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        tokens = ctx.required_tokens("shortened")
        if self.criterion == "taylor":
            scores = taylor_block_scores(model, tokens, batch_size=self.batch_size)
        else:
            scores = ppl_block_scores(model, tokens, batch_size=self.batch_size)
        order = removal_order(scores, self.keep_first, self.keep_last)
        drop = sorted(order[:self.count])
        graph.drop_layers(model, drop)
        ctx.log(self.kind, criterion=self.criterion, scores=scores, order=order, dropped=drop,
                calibration_tokens=int(np.asarray(tokens).size))
        return model
