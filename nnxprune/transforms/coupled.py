"""LLM-Pruner's block-wise step: local, one-shot removal of MLP neurons and attention head groups.

Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023,
arXiv 2305.11627; code horseee/LLM-Pruner, `hf_prune.py` / `llama3.py` with `--block_wise`,
`MetaPruner.prune_local`). In every layer of a range, the same `ratio` of each group is removed
in one step, ranked by a score computed once on the dense model:

- MLP neurons (`mlp[i]`: gate and up output channel, down input channel) in layers
  `[mlp_start, mlp_end)`: `f - int(f * (1 - ratio))` of `f` neurons go;
- attention in layers `[attention_start, attention_end)`, by `heads`:
  `"kv"` (default, `llama3.py`'s GQA roots `k_proj`): whole KV groups (a k and v head, the query
  heads that share them and their o_proj inputs), `(K*dh - int(K*dh*(1-ratio))) // dh` of `K`,
  counted on channels and rounded down to whole heads as `prune_local` does with
  `consecutive_groups = head_dim`; `"q"` (`hf_prune.py`'s roots `q_proj`, for models with few KV
  heads: SmolLM2-135M has 3, and no ratio below 1/3 removes a KV group): query heads, the same
  count from each KV group (`(G*dh - int(G*dh*(1-ratio))) // dh` of its `G`), so GQA stays valid.

The ranges default to LLM-Pruner's scripts (layers 4 to 30 of 32): the first 4 and the last 2
layers stay whole. The score is any registered one (`nnxprune.scoring`): `taylor` (element1,
default), `taylor_vector`, `taylor_element2`, `taylor_mix` run the gradient pass
(`nnxprune.calibration.gradients`) on the calibration data; `l2` and `random` are the paper's
baselines; activation scores (`wanda`) run their collectors. `reduction` overrides how a
score combines a group's members (sum, mean, max, prod). `check` rejects, before any work, a
range outside the model, a ratio that would remove all of a layer's neurons or head groups, and
an attention ratio that removes no head at all.

Example (a recipe's [[prune]] entry):
    kind = "llm_pruner"
    score = "taylor"
    ratio = 0.34
    heads = "q"
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune import graph
from nnxprune.calibration.gradients import gradient_pass
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.scoring import SCORES, Score, Stats, get_score, lowest, reduce_members
from nnxprune.scoring.base import REDUCTIONS
from nnxprune.scoring.taylor import GradientScore
from nnxprune.transforms.base import Context, Transform, register

HEADS = ("kv", "q")
FIRST_WHOLE, LAST_WHOLE = 4, 2  # LLM-Pruner's scripts prune layers 4 .. 30 of 32


def removed_heads(heads: int, head_dim: int, ratio: float) -> int:
    """Heads removed from `heads` by `prune_local`: channels, then whole heads, rounded down."""
    channels = heads * head_dim
    return (channels - int(channels * (1 - ratio))) // head_dim


def removed_neurons(size: int, ratio: float) -> int:
    return size - int(size * (1 - ratio))


def _range(start: int | None, end: int | None, n: int, what: str) -> range:
    lo = min(FIRST_WHOLE, n) if start is None else start
    hi = max(n - LAST_WHOLE, 0) if end is None else end
    if not 0 <= lo <= hi <= n:
        raise UserError(f"{what} layer range [{lo}, {hi}) is not inside the model's {n} layers "
                        f"(need 0 <= start <= end <= {n})")
    return range(lo, hi)


@register("llm_pruner")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMPruner(Transform):
    """Removes `ratio` of the MLP neurons and of the head groups of every layer in the ranges."""

    ratio: float
    score: str = "taylor"
    heads: str = "kv"
    attention_start: int | None = None
    attention_end: int | None = None
    mlp_start: int | None = None
    mlp_end: int | None = None
    reduction: str | None = None
    seed: int = 0
    soft: bool = False
    batch_size: int | None = None
    kind: ClassVar[str]

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.score in SCORES and SCORES[self.score].needs_calibration()

    def ranges(self, n: int) -> tuple[range, range]:
        return (_range(self.attention_start, self.attention_end, n, "attention"),
                _range(self.mlp_start, self.mlp_end, n, "MLP"))

    def _check_settings(self) -> None:
        get_score(self.score)
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.heads not in HEADS:
            raise UserError(f"heads must be one of {', '.join(HEADS)}, got {self.heads!r}")
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise UserError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")

    def check(self, config: LlamaConfig) -> LlamaConfig:
        self._check_settings()
        attention, mlp = self.ranges(config.num_layers)
        shapes = list(config.layers)
        any_heads = False
        for i in attention:
            s = shapes[i]
            if s.num_kv_heads == 0:
                raise UserError(f"layer {i} has no attention heads left to prune")
            per = s.num_heads // s.num_kv_heads
            total = s.num_kv_heads if self.heads == "kv" else per
            gone = removed_heads(total, config.head_dim, self.ratio)
            if gone >= total:
                raise UserError(f"ratio {self.ratio} removes all {total} "
                                f"{'KV groups' if self.heads == 'kv' else 'query heads per KV group'} "
                                f"of layer {i}")
            any_heads |= gone > 0
            if not self.soft:
                kv = s.num_kv_heads - gone if self.heads == "kv" else s.num_kv_heads
                shapes[i] = dataclasses.replace(s, num_kv_heads=kv,
                                                num_heads=kv * (per if self.heads == "kv" else per - gone))
        if attention and not any_heads:
            raise UserError(f"ratio {self.ratio} removes no {'KV group' if self.heads == 'kv' else 'query head'} "
                            f"in any layer of [{attention.start}, {attention.stop}) (heads are removed whole); "
                            f"raise the ratio, use heads = \"q\", or give an empty attention range")
        for i in mlp:
            size = shapes[i].intermediate_size
            gone = removed_neurons(size, self.ratio)
            if gone >= size:
                raise UserError(f"ratio {self.ratio} removes all {size} MLP neurons of layer {i}")
            if not self.soft:
                shapes[i] = dataclasses.replace(shapes[i], intermediate_size=size - gone)
        return dataclasses.replace(config, layers=tuple(shapes))

    def _score(self) -> Score:
        score = get_score(self.score)
        if "seed" in {f.name for f in dataclasses.fields(score)}:
            score = dataclasses.replace(score, seed=self.seed)
        return score

    def statistics(self, model, ctx: Context, score: Score) -> tuple[Stats | None, dict]:
        """The score's statistics over the dense model, and what the pass reports."""
        if not score.needs_calibration():
            return None, {}
        tokens = ctx.calibration_tokens()
        if tokens is None:
            raise UserError(f"score {self.score!r} needs calibration data: add a [calibration] section")
        if isinstance(score, GradientScore):
            grads = gradient_pass(model, tokens, second_order=score.second_order,
                                  batch_size=self.batch_size)
            return grads.stats, {"loss": grads.loss, "timings": {
                "gradient_pass": grads.seconds, "gradient_sq_pass": grads.seconds_sq}}
        return collect_statistics(model, tokens, score.collectors(), batch_size=self.batch_size or 8,
                                  progress=ctx.progress, desc=f"llm_pruner ({self.score})"), {}

    def rank(self, score: Score, model, group, stats) -> np.ndarray:
        """The group's importance, members combined by `reduction` (the score's own if None)."""
        if self.reduction is None or type(score).member is Score.member:
            return score(model, group, stats)
        values = [score.member(model, m, stats) for m in group.members]
        return np.asarray(score.finish(reduce_members(group, values, self.reduction)))

    def plan(self, model, score: Score, stats) -> list:
        """`(group, kept indices)` for every group to prune, all ranked on the unedited model."""
        cfg = model.config
        attention, mlp = self.ranges(cfg.num_layers)
        todo = []
        for i in attention:
            group = graph.find_group(model, self.heads, i)
            per_unit = group.size // group.blocks
            todo.append((group, removed_heads(per_unit, cfg.head_dim, self.ratio)))
        for i in mlp:
            group = graph.find_group(model, "mlp", i)
            todo.append((group, removed_neurons(group.size, self.ratio)))
        return [(g, lowest(self.rank(score, model, g, stats), count, g.blocks)) for g, count in todo]

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        score = self._score()
        stats, info = self.statistics(model, ctx, score)
        plan = self.plan(model, score, stats)
        for group, keep in plan:
            if self.soft:
                graph.mask_group(model, group, keep)
            else:
                graph.take(model, group, keep)
        ctx.log(self.kind, score=self.score, ratio=self.ratio, heads=self.heads, soft=self.soft,
                kept={g.name: [g.size, len(keep)] for g, keep in plan}, **info)
        return model

