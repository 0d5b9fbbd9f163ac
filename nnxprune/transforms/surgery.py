"""Structural transforms: drop layers, shrink MLPs, remove query heads / KV groups / hidden
channels, fold masks. Channels are ranked by any registered score (`nnxprune.scoring`; default
`weight_norm`, calibration-free). A score that reads activation statistics (e.g. `wanda`) makes
the transform ask for calibration: its collectors run over the dense model in one pass of the
sequential driver before anything is removed (as Minitron ranks all widths from one forward),
and every group is then ranked from those statistics.

Every structured transform takes `soft = true` to mask the channels instead of slicing them
(shapes kept; `fold_masks` or a later hard edit makes it real). Layer indices refer to the model
as it is when the step runs (after earlier steps dropped layers); `layers` omitted = every layer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nnxprune import graph
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.models.llama import LayerShape, LlamaConfig
from nnxprune.scoring import SCORES, Stats, get_score, lowest
from nnxprune.transforms.base import Context, Transform, register


def check_layers(layers: tuple[int, ...] | None, config: LlamaConfig) -> tuple[int, ...]:
    n = config.num_layers
    if layers is None:
        return tuple(range(n))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UserError(f"layer indices {bad} out of range: the model has {n} layers at this step")
    if len(set(layers)) != len(layers):
        raise UserError(f"layer indices repeat: {list(layers)}")
    return tuple(layers)


def check_score(score: str, kind: str) -> None:
    get_score(score).check_kind(kind)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scored(Transform):
    """A structured transform that ranks channels by `score` (module docstring)."""

    score: str = "weight_norm"
    soft: bool = False
    batch_size: int = 8
    kind: ClassVar[str]

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.score in SCORES and SCORES[self.score].needs_calibration()

    def statistics(self, model, ctx: Context) -> Stats | None:
        """The score's statistics over the dense model (None for a calibration-free score)."""
        score = get_score(self.score)
        collectors, gather = score.collectors(), getattr(score, "gather", None)
        if not collectors and gather is None:
            return None
        tokens = ctx.calibration_tokens()
        if tokens is None:
            raise UserError(f"score {self.score!r} needs calibration data: add a [calibration] "
                            "section")
        if gather is not None:  # a score read from gradients (scoring.taylor), not collectors
            return gather(model, tokens)
        return collect_statistics(model, tokens, collectors, batch_size=self.batch_size,
                                  progress=ctx.progress, desc=f"{self.kind} ({self.score})")

    def rank(self, model, group, stats: Stats | None):
        return get_score(self.score)(model, group, stats)

    def edit_groups(self, model, ctx: Context, kind: str, layers, removed) -> dict:
        """Ranks the `kind` group of each layer in `layers` (one group for `embed`: `layers =
        (None,)`) and removes `removed(group)` channels from it (from each of its blocks); returns
        `{layer: (group, kept indices)}`. Statistics, when the score needs them, come from the
        model before any edit."""
        stats = self.statistics(model, ctx)
        done = {}
        for i in layers:
            group = graph.find_group(model, kind, i)
            keep = lowest(self.rank(model, group, stats), removed(group), group.blocks)
            edit(model, group, keep, self.soft)
            done[i] = (group, keep)
        return done


def amount(size: int, fraction: float | None, count: int | None, what: str) -> int:
    """How many channels to remove: `count`, or `int(fraction * size)`."""
    if (fraction is None) == (count is None):
        raise UserError(f"give exactly one of 'fraction' and 'count' ({what})")
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise UserError(f"fraction must be in [0, 1), got {fraction} ({what})")
        return int(fraction * size)
    if not 0 <= count < size:
        raise UserError(f"count must be in [0, {size}) for {what} of size {size}, got {count}")
    return count


def edit(model, group, keep, soft: bool):
    return graph.mask_group(model, group, keep) if soft else graph.take(model, group, keep)


@register("drop_layers")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DropLayers(Transform):
    """Deletes decoder layers (ShortGPT-style depth pruning with given indices)."""

    layers: tuple[int, ...]
    soft: bool = False
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        layers = check_layers(self.layers, config)
        if len(layers) >= config.num_layers:
            raise UserError(f"cannot drop all {config.num_layers} layers")
        if self.soft:
            return config
        return dataclasses.replace(config, layers=tuple(
            s for i, s in enumerate(config.layers) if i not in set(layers)))

    def __call__(self, model, ctx: Context):
        if self.soft:
            for i in self.layers:
                graph.mask_group(model, graph.find_group(model, "layer", i), [])
        else:
            graph.drop_layers(model, self.layers)
        ctx.log(self.kind, layers=list(self.layers), soft=self.soft)
        return model


@register("shrink_mlp")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkMLP(Scored):
    """Removes the lowest-scoring MLP neurons of each chosen layer."""

    fraction: float | None = None
    count: int | None = None
    layers: tuple[int, ...] | None = None
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        check_score(self.score, "mlp")
        layers = check_layers(self.layers, config)
        shapes = list(config.layers)
        for i in layers:
            size = shapes[i].intermediate_size
            removed = amount(size, self.fraction, self.count, f"MLP of layer {i}")
            if not self.soft:
                shapes[i] = dataclasses.replace(shapes[i], intermediate_size=size - removed)
        return dataclasses.replace(config, layers=tuple(shapes))

    def __call__(self, model, ctx: Context):
        done = self.edit_groups(model, ctx, "mlp", check_layers(self.layers, model.config),
                                lambda g: amount(g.size, self.fraction, self.count, f"MLP of layer {g.layer}"))
        ctx.log(self.kind, score=self.score, soft=self.soft,
                widths={i: [g.size, len(keep)] for i, (g, keep) in done.items()})
        return model


@register("remove_query_heads")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoveQueryHeads(Scored):
    """Removes `per_kv_group` query heads from every KV group of each chosen layer (GQA stays
    valid: every KV group keeps the same number of query heads)."""

    per_kv_group: int = 1
    layers: tuple[int, ...] | None = None
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        check_score(self.score, "q")
        shapes = list(config.layers)
        for i in check_layers(self.layers, config):
            s = shapes[i]
            per = s.num_heads // s.num_kv_heads
            if not 0 <= self.per_kv_group < per:
                raise UserError(f"layer {i} has {per} query heads per KV group; cannot remove "
                                f"{self.per_kv_group} from each (at least one must stay)")
            if not self.soft:
                shapes[i] = dataclasses.replace(
                    s, num_heads=s.num_heads - self.per_kv_group * s.num_kv_heads)
        return dataclasses.replace(config, layers=tuple(shapes))

    def __call__(self, model, ctx: Context):
        done = self.edit_groups(model, ctx, "q", check_layers(self.layers, model.config),
                                lambda g: self.per_kv_group)
        ctx.log(self.kind, score=self.score, soft=self.soft,
                kept_heads={i: [int(k) for k in keep] for i, (_, keep) in done.items()})
        return model


@register("remove_kv_groups")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoveKVGroups(Scored):
    """Removes `count` whole KV groups (a k and v head with all their query heads) per layer."""

    count: int = 1
    layers: tuple[int, ...] | None = None
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        check_score(self.score, "kv")
        shapes = list(config.layers)
        for i in check_layers(self.layers, config):
            s = shapes[i]
            if not 0 <= self.count < s.num_kv_heads:
                raise UserError(f"layer {i} has {s.num_kv_heads} KV heads; cannot remove "
                                f"{self.count} (at least one must stay)")
            if not self.soft:
                per = s.num_heads // s.num_kv_heads
                shapes[i] = LayerShape(num_heads=s.num_heads - self.count * per,
                                       num_kv_heads=s.num_kv_heads - self.count,
                                       intermediate_size=s.intermediate_size)
        return dataclasses.replace(config, layers=tuple(shapes))

    def __call__(self, model, ctx: Context):
        done = self.edit_groups(model, ctx, "kv", check_layers(self.layers, model.config),
                                lambda g: self.count)
        ctx.log(self.kind, score=self.score, soft=self.soft,
                kept_kv_heads={i: [int(k) for k in keep] for i, (_, keep) in done.items()})
        return model


@register("shrink_hidden")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkHidden(Scored):
    """Removes the lowest-scoring hidden (embedding) channels everywhere at once."""

    fraction: float | None = None
    count: int | None = None
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        check_score(self.score, "embed")
        removed = amount(config.hidden_size, self.fraction, self.count, "hidden size")
        if self.soft:
            return config
        return dataclasses.replace(config, hidden_size=config.hidden_size - removed)

    def __call__(self, model, ctx: Context):
        ((group, keep),) = self.edit_groups(
            model, ctx, "embed", (None,),
            lambda g: amount(g.size, self.fraction, self.count, "hidden size")).values()
        ctx.log(self.kind, score=self.score, soft=self.soft, hidden=[group.size, len(keep)])
        return model


@register("fold_masks")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldMasks(Transform):
    """Bakes every mask into the weights and removes it. With `compact` (default), structured
    masks (whole layers, KV groups, query heads, neurons, hidden channels) become real slices
    first, so a soft pipeline folds to the shapes of the hard one."""

    compact: bool = True
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        return config  # the hidden size may shrink if hidden channels were masked

    def __call__(self, model, ctx: Context):
        graph.fold_masks(model, compact_structured=self.compact)
        ctx.log(self.kind, compact=self.compact)
        return model
