"""Width pruning to target sizes (Minitron): hidden channels, MLP neurons, attention heads.

Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation",
arXiv 2407.14679; Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron
Approach", arXiv 2408.11796. Every width is ranked from one calibration pass over the dense model
(`score = "activation"`: Minitron's activation importance with ModelOpt's aggregation, see
`scoring.activation`; any registered score works), then every group is sliced through the graph
(`graph.take`; a tied embedding is one slice of the shared matrix), so the result is a smaller
dense model, not a masked one (`soft = true` masks instead).

Targets are the sizes to keep: `hidden` (the model's hidden size), `intermediate` (MLP neurons per
layer), `heads` (query heads per layer) and `kv_heads` (KV heads per layer; unchanged by default,
as in Minitron, which keeps every KV head). `intermediate`, `heads` and `kv_heads` take one number
for every layer (Minitron's uniform widths) or a list with one per layer. Query heads are ranked
within their KV group and the same number stays in every group; with `kv_heads` set, whole KV
groups go first (ranked by the L2 norm of their query heads' importance), then query heads within
the groups that stay. All rankings come from the dense model's statistics.

The collection's `prune_width.py` (zlab-princeton/llm-pruning-collection) prunes hidden and MLP
widths but not heads; ModelOpt's Minitron plugin prunes heads too. Example (a recipe step):

    [[prune]]
    kind = "width"
    hidden = 448
    intermediate = 1024
    heads = 6
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune import graph
from nnxprune.errors import UserError
from nnxprune.models.llama import LayerShape, LlamaConfig
from nnxprune.scoring import lowest
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.surgery import Scored, check_score, edit

PerLayer = int | tuple[int, ...] | None


def per_layer(value: PerLayer, n: int, what: str) -> list[int | None]:
    """One target per layer from a number (every layer), a list (one each) or None (unchanged)."""
    if value is None or isinstance(value, int):
        return [value] * n
    if len(value) != n:
        raise UserError(f"{what}: {len(value)} values for {n} layers (give one number for every "
                        "layer, or one per layer)")
    return list(value)


def _target(value: int | None, current: int, what: str) -> int:
    if value is None:
        return current
    if not 1 <= value <= current:
        raise UserError(f"{what} must be in [1, {current}] (the current size), got {value}")
    return value


def _layer_shape(s: LayerShape, i: int, heads, kv_heads, intermediate) -> LayerShape:
    kv = _target(kv_heads, s.num_kv_heads, f"kv_heads of layer {i}")
    per = s.num_heads // s.num_kv_heads
    h = _target(heads, kv * per if kv_heads is not None else s.num_heads, f"heads of layer {i}")
    if h % kv:
        raise UserError(f"heads of layer {i}: {h} query heads do not divide over {kv} KV groups "
                        "(every KV group keeps the same number)")
    return LayerShape(num_heads=h, num_kv_heads=kv,
                      intermediate_size=_target(intermediate, s.intermediate_size,
                                                f"intermediate of layer {i}"))


@register("width")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Width(Scored):
    """Slices hidden channels, MLP neurons and heads to target sizes (module docstring)."""

    score: str = "activation"
    hidden: int | None = None
    intermediate: PerLayer = None
    heads: PerLayer = None
    kv_heads: PerLayer = None
    kind: ClassVar[str]

    def targets(self, config: LlamaConfig) -> tuple[int, list[LayerShape]]:
        """The hidden size and the layer shapes after the transform (UserError when invalid)."""
        n = config.num_layers
        lists = [per_layer(v, n, name) for v, name in ((self.heads, "heads"),
                 (self.kv_heads, "kv_heads"), (self.intermediate, "intermediate"))]
        shapes = [_layer_shape(s, i, *(lst[i] for lst in lists))
                  for i, s in enumerate(config.layers)]
        return _target(self.hidden, config.hidden_size, "hidden"), shapes

    def check(self, config: LlamaConfig) -> LlamaConfig:
        for kind in ("embed", "mlp", "q", "kv"):
            check_score(self.score, kind)
        hidden, shapes = self.targets(config)
        if all(getattr(self, f) is None for f in ("hidden", "intermediate", "heads", "kv_heads")):
            raise UserError("width: give at least one of hidden, intermediate, heads, kv_heads")
        if self.soft:
            if self.kv_heads is not None:
                raise UserError("width: soft edits do not remove KV groups (use kind = "
                                "\"remove_kv_groups\" with soft = true, or a hard edit)")
            return config
        return dataclasses.replace(config, hidden_size=hidden, layers=tuple(shapes))

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        hidden, shapes = self.targets(model.config)
        stats = self.statistics(model, ctx)
        before = model.config
        plan = []  # (group, keep) in the order the edits run; every ranking on the dense model
        for i, (old, new) in enumerate(zip(before.layers, shapes)):
            plan.extend(self.layer_plan(model, stats, i, old, new))
        if hidden < before.hidden_size:
            plan.append(("embed", None, self.hidden_keep(model, stats, hidden)))
        for kind, i, keep in plan:
            edit(model, graph.find_group(model, kind, i), keep, self.soft)
        self.record(ctx, before, hidden, shapes)
        return model

    # -- the parts shared with the streamed run (`nnxprune.streamed_passes`), where `model` is a
    # view of one dense decoder layer (per-layer plans) or the abstract model (hidden channels)
    def layer_plan(self, model, stats, i: int, old: LayerShape, new: LayerShape) -> list:
        """The edits of layer `i` (KV groups, query heads, MLP neurons): `[(kind, layer, keep)]`,
        ranked on the dense layer."""
        plan = self._attention_plan(model, stats, i, old, new)
        if new.intermediate_size < old.intermediate_size:
            group = graph.find_group(model, "mlp", i)
            plan.append(("mlp", i, lowest(self.rank(model, group, stats),
                                          group.size - new.intermediate_size)))
        return plan

    def hidden_keep(self, model, stats, hidden: int):
        """The `hidden` hidden channels to keep, ranked on the dense model."""
        group = graph.find_group(model, "embed")
        return lowest(self.rank(model, group, stats), group.size - hidden)

    def record(self, ctx: Context, before: LlamaConfig, hidden: int, shapes) -> None:
        ctx.log(self.kind, score=self.score, soft=self.soft,
                hidden=[before.hidden_size, hidden],
                layers=[[[o.num_heads, o.num_kv_heads, o.intermediate_size],
                         [s.num_heads, s.num_kv_heads, s.intermediate_size]]
                        for o, s in zip(before.layers, shapes)])

    def _attention_plan(self, model, stats, i: int, old: LayerShape, new: LayerShape) -> list:
        """The KV-group and query-head edits of layer `i`: `[(kind, layer, keep)]`."""
        plan = []
        per = old.num_heads // old.num_kv_heads
        heads = np.arange(old.num_heads)
        if new.num_kv_heads < old.num_kv_heads:
            group = graph.find_group(model, "kv", i)
            keep_kv = lowest(self.rank(model, group, stats), group.size - new.num_kv_heads)
            plan.append(("kv", i, keep_kv))
            heads = np.concatenate([np.arange(k * per, (k + 1) * per) for k in keep_kv])
        if new.num_heads < len(heads):
            q_scores = self.rank(model, graph.find_group(model, "q", i), stats)[heads]
            plan.append(("q", i, lowest(q_scores, len(heads) // new.num_kv_heads
                                        - new.num_heads // new.num_kv_heads,
                                        blocks=new.num_kv_heads)))
        return plan
