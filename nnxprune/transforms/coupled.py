"""LLM-Pruner's structural step: MLP neurons and attention head groups (or hidden channels).

Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023,
arXiv 2305.11627; code horseee/LLM-Pruner, `hf_prune.py` / `llama3.py` with `--block_wise`,
`MetaPruner.prune_local`). By default (block-wise, local, one-shot), in every layer of a range
the same `ratio` of each group is removed in one step, ranked by a score computed once on the
dense model:

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

The reference's other options (`hf_prune.py`, `MetaPruner` in its bundled Torch-Pruning):

- `iterative_steps = k` (`--iterative_steps`): k rounds of score-then-prune. Round s targets
  `(s / k) * ratio` of each group's ORIGINAL channels (`linear_scheduler`), removing
  `current - int(initial * (1 - target))` channels (whole heads: rounded down to `head_dim`), and
  every round scores the model the earlier rounds left (a new gradient pass). k = 1 is the
  one-shot prune. The reference draws fresh calibration samples each round; here every round
  reads the same calibration tokens, so a difference between rounds comes from the pruning.
- `global_pruning = true` (`--global_pruning`, `prune_global`): one ranking of the units of
  every group in the ranges, KV groups (or query heads) and MLP neurons together, a unit's score
  being its group score (a head's summed over its `head_dim` channels). Round s removes
  `n = units - int(initial units * (1 - target))` by thresholding at the n-th lowest score, so
  layers lose different amounts. Departures: every group keeps at least one unit (the reference
  would skip a group that lost all); with `heads = "q"` a unit is the j-th lowest query head of
  EVERY KV group of a layer (GQA stays valid), scored by their mean and counted as K heads. The
  shapes depend on the scores, so `check` cannot predict them (`shapes_from_scores`).
- `mode = "channel"` (`--channel_wise`): hidden channels, the `embed` group (embedding, every
  norm, every projection's hidden side, the output head), `D - int(D * (1 - ratio))` of the
  hidden size D, scored with every member's term (`scoring.taylor.hidden_gradient_pass`); the
  layer ranges and `heads` do not apply.

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
from nnxprune.scoring.taylor import GradientScore, hidden_gradient_pass
from nnxprune.transforms.base import Context, Transform, register

HEADS = ("kv", "q")
MODES = ("block", "channel")
FIRST_WHOLE, LAST_WHOLE = 4, 2  # LLM-Pruner's scripts prune layers 4 .. 30 of 32


def step_counts(units: int, unit: int, ratio: float, steps: int = 1) -> list[int]:
    """Units removed in each of `steps` rounds from `units` units of `unit` channels
    (`MetaPruner.prune_local` with `linear_scheduler`): round s targets `(s / steps) * ratio` of
    the original channels, `current - int(initial * (1 - target))` channels go, rounded down to
    whole units."""
    initial, current, out = units * unit, units, []
    for s in range(1, steps + 1):
        target = (s / float(steps)) * ratio
        gone = max(current * unit - int(initial * (1 - target)), 0) // unit
        out.append(gone)
        current -= gone
    return out


def removed_heads(heads: int, head_dim: int, ratio: float, steps: int = 1) -> int:
    """Heads removed from `heads` by `prune_local`: channels, then whole heads, rounded down."""
    return sum(step_counts(heads, head_dim, ratio, steps))


def removed_neurons(size: int, ratio: float, steps: int = 1) -> int:
    return sum(step_counts(size, 1, ratio, steps))


def _range(start: int | None, end: int | None, n: int, what: str) -> range:
    lo = min(FIRST_WHOLE, n) if start is None else start
    hi = max(n - LAST_WHOLE, 0) if end is None else end
    if not 0 <= lo <= hi <= n:
        raise UserError(f"{what} layer range [{lo}, {hi}) is not inside the model's {n} layers "
                        f"(need 0 <= start <= end <= {n})")
    return range(lo, hi)


def _global_keep(units: list[tuple], n: int) -> dict:
    """`{key: kept indices}` after removing the `n` lowest of all `units` at once (one threshold,
    `prune_global`). `units` holds `(key, scores [m], weight)`: `m` candidates of the group `key`
    in removal order, a candidate counting `weight` units; each group keeps its last candidate."""
    flat = np.concatenate([np.repeat(s, w) for _, s, w in units]) if units else np.zeros(0)
    if n <= 0 or flat.size == 0:
        return {key: np.arange(len(s)) for key, s, _ in units}
    threshold = np.sort(flat, kind="stable")[min(n, flat.size) - 1]
    return {key: np.flatnonzero(~(s <= threshold) | (np.arange(len(s)) == len(s) - 1))
            for key, s, _ in units}


@register("llm_pruner")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMPruner(Transform):
    """Removes `ratio` of the MLP neurons and of the head groups of every layer in the ranges
    (or of the hidden channels with `mode = "channel"`), in `iterative_steps` rounds, ranked per
    group or, with `global_pruning`, across all groups at once."""

    ratio: float
    score: str = "taylor"
    heads: str = "kv"
    mode: str = "block"
    global_pruning: bool = False
    iterative_steps: int = 1
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

    @property
    def shapes_from_scores(self) -> bool:
        """True when the pruned shapes depend on the scores (global ranking of head and neuron
        groups, hard edit): `check` returns the unpruned shapes then."""
        return self.global_pruning and self.mode == "block" and not self.soft

    def ranges(self, n: int) -> tuple[range, range]:
        return (_range(self.attention_start, self.attention_end, n, "attention"),
                _range(self.mlp_start, self.mlp_end, n, "MLP"))

    def _check_settings(self) -> None:
        get_score(self.score)
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.heads not in HEADS:
            raise UserError(f"heads must be one of {', '.join(HEADS)}, got {self.heads!r}")
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.global_pruning, bool):
            raise UserError(f"global_pruning must be true or false, got {self.global_pruning!r}")
        if (isinstance(self.iterative_steps, bool) or not isinstance(self.iterative_steps, int)
                or self.iterative_steps < 1):
            raise UserError(f"iterative_steps must be an integer >= 1, got {self.iterative_steps!r}")
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise UserError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        ranges = (self.attention_start, self.attention_end, self.mlp_start, self.mlp_end)
        if self.mode == "channel" and any(r is not None for r in ranges):
            raise UserError("mode = 'channel' prunes hidden channels everywhere; the attention and "
                            "MLP layer ranges apply to mode = 'block'")

    def check(self, config: LlamaConfig) -> LlamaConfig:
        self._check_settings()
        if self.mode == "channel":
            gone = removed_neurons(config.hidden_size, self.ratio, self.iterative_steps)
            if gone >= config.hidden_size:
                raise UserError(f"ratio {self.ratio} removes all {config.hidden_size} hidden channels")
            return config if self.soft else dataclasses.replace(
                config, hidden_size=config.hidden_size - gone)
        attention, mlp = self.ranges(config.num_layers)
        shapes = list(config.layers)
        any_heads = False
        keep_shapes = self.soft or self.global_pruning  # global: the shapes follow the scores
        for i in attention:
            s = shapes[i]
            if s.num_kv_heads == 0:
                raise UserError(f"layer {i} has no attention heads left to prune")
            per = s.num_heads // s.num_kv_heads
            total = s.num_kv_heads if self.heads == "kv" else per
            gone = removed_heads(total, config.head_dim, self.ratio, self.iterative_steps)
            if gone >= total and not self.global_pruning:
                raise UserError(f"ratio {self.ratio} removes all {total} "
                                f"{'KV groups' if self.heads == 'kv' else 'query heads per KV group'} "
                                f"of layer {i}")
            any_heads |= gone > 0
            if not keep_shapes:
                kv = s.num_kv_heads - gone if self.heads == "kv" else s.num_kv_heads
                shapes[i] = dataclasses.replace(s, num_kv_heads=kv,
                                                num_heads=kv * (per if self.heads == "kv" else per - gone))
        if attention and not any_heads and not self.global_pruning:
            raise UserError(f"ratio {self.ratio} removes no {'KV group' if self.heads == 'kv' else 'query head'} "
                            f"in any layer of [{attention.start}, {attention.stop}) (heads are removed whole); "
                            f"raise the ratio, use heads = \"q\", or give an empty attention range")
        for i in mlp:
            size = shapes[i].intermediate_size
            gone = removed_neurons(size, self.ratio, self.iterative_steps)
            if gone >= size and not self.global_pruning:
                raise UserError(f"ratio {self.ratio} removes all {size} MLP neurons of layer {i}")
            if not keep_shapes:
                shapes[i] = dataclasses.replace(shapes[i], intermediate_size=size - gone)
        return dataclasses.replace(config, layers=tuple(shapes))

    def _score(self) -> Score:
        score = get_score(self.score)
        if "seed" in {f.name for f in dataclasses.fields(score)}:
            score = dataclasses.replace(score, seed=self.seed)
        return score

    def statistics(self, model, ctx: Context, score: Score) -> tuple[Stats | None, dict]:
        """The score's statistics over the model as it is now, and what the pass reports."""
        if not score.needs_calibration():
            return None, {}
        tokens = ctx.required_tokens(f"score {self.score!r}")
        if isinstance(score, GradientScore):
            if self.mode == "channel":  # every parameter: the embedding, norms and head too
                grads = hidden_gradient_pass(model, tokens, second_order=score.second_order)
            else:
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

    def groups(self, model) -> list[tuple[str, int | None]]:
        """`(kind, layer)` of every group this step prunes."""
        if self.mode == "channel":
            return [("embed", None)]
        attention, mlp = self.ranges(model.config.num_layers)
        return [(self.heads, i) for i in attention] + [("mlp", i) for i in mlp]

    def plan(self, model, score: Score, stats, alive: dict, initial: dict, step: int) -> list:
        """`(group, kept indices)` for every group in round `step` (0-based), ranked on the model
        as it is; `alive[key]` are each group's indices not yet removed (all of them after a hard
        edit), `initial[key]` its unit count before round 0."""
        todo = []
        for kind, i in self.groups(model):
            group = graph.find_group(model, kind, i)
            scores = self.rank(score, model, group, stats)[alive[(kind, i)]]
            todo.append((group, scores))
        if self.global_pruning and self.mode == "block":
            return self._plan_global(todo, alive, initial, step)
        out = []
        for group, scores in todo:
            key = (group.kind, group.layer)
            unit = model.config.head_dim if group.kind in ("kv", "q") else 1  # heads: on channels
            per_block = initial[key] // group.blocks
            gone = step_counts(per_block, unit, self.ratio, self.iterative_steps)[step]
            out.append((group, alive[key][lowest(scores, gone, group.blocks)]))
        return out

    def _plan_global(self, todo: list, alive: dict, initial: dict, step: int) -> list:
        """One threshold over every unit (`_global_keep`); `q` groups by slices (docstring)."""
        units, slices = [], {}
        for group, scores in todo:
            key = (group.kind, group.layer)
            if group.kind == "q":  # slice j: the j-th lowest head of every KV group
                order = np.argsort(scores.reshape(group.blocks, -1), axis=1, kind="stable")
                sorted_scores = np.take_along_axis(scores.reshape(group.blocks, -1), order, axis=1)
                slices[key] = order
                units.append((key, sorted_scores.mean(axis=0), group.blocks))
            else:
                order = np.argsort(scores, kind="stable")
                slices[key] = order
                units.append((key, scores[order], 1))
        total = sum(len(s) * w for _, s, w in units)
        target = ((step + 1) / float(self.iterative_steps)) * self.ratio
        kept = _global_keep(units, total - int(sum(initial.values()) * (1 - target)))
        out = []
        for group, _ in todo:
            key = (group.kind, group.layer)
            order, ranks = slices[key], kept[key]
            if group.kind == "q":
                per = order.shape[1]
                local = np.sort((order[:, ranks] + per * np.arange(group.blocks)[:, None]).ravel())
            else:
                local = np.sort(order[ranks])
            out.append((group, alive[key][local]))
        return out

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        score = self._score()
        alive = {}
        for kind, i in self.groups(model):
            alive[(kind, i)] = np.arange(graph.find_group(model, kind, i).size)
        initial = {key: len(v) for key, v in alive.items()}
        rounds = []
        for step in range(self.iterative_steps):
            stats, info = self.statistics(model, ctx, score)  # re-scored after every round
            plan = self.plan(model, score, stats, alive, initial, step)
            for group, keep in plan:
                key = (group.kind, group.layer)
                if self.soft:
                    graph.mask_group(model, group, keep)
                    alive[key] = np.asarray(keep)
                else:
                    graph.take(model, group, keep)
                    alive[key] = np.arange(len(keep))
            rounds.append({"kept": {g.name: len(keep) for g, keep in plan}, **info})
        ctx.log(self.kind, score=self.score, ratio=self.ratio, heads=self.heads, soft=self.soft,
                mode=self.mode, global_pruning=self.global_pruning,
                iterative_steps=self.iterative_steps, kept=_overall(initial, alive),
                rounds=rounds, **{k: v for k, v in rounds[-1].items() if k != "kept"})
        return model


def _overall(initial: dict, alive: dict) -> dict:
    """`{group name: [units before, units after]}` over all rounds."""
    name = lambda kind, layer: kind if layer is None else f"{kind}[{layer}]"  # noqa: E731
    return {name(*key): [initial[key], len(alive[key])] for key in initial}
