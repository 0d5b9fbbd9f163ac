"""Wanda-sp as FLAP's code runs it: the same ratio of heads and MLP neurons out of every layer,
layer by layer, each ranked on the outputs of the already pruned layers before it.

An et al., FLAP (AAAI 2024, arXiv 2312.11983; code CASIA-IVA-Lab/FLAP, `lib/prune.py`,
`prune_wanda_sp`): for decoder layer `i` in order, the layer runs on its calibration inputs (the
outputs of layers `0 .. i-1` as pruned) while the score's statistics are gathered
(`calibration.sequential`), then in that layer `int(ratio * heads)` heads and
`int(ratio * neurons)` MLP neurons of lowest score go, and the pruned layer's outputs feed the next.
The score is `wanda_sp` (`nnxprune.scoring.wanda_sp`) by default; any registered score that reads
calibration statistics (or none) works, so another metric (FLAP's fluctuation metric, in FLAP's
uniform "UL-UM" setting) plugs in by name.

Heads under grouped-query attention (the reference is multi-head): `heads = "kv"` (default)
removes `int(ratio * K)` whole KV groups (a k and v head with the query heads that share them),
which is the reference's rule when every KV head has one query head; `heads = "q"` removes
`int(ratio * G)` query heads from each KV group of `G`, so every group keeps the same number;
`heads = "none"` leaves attention whole. SmolLM2-135M has 3 KV groups of 3 query heads, so any
ratio below 1/3 removes no head either way.

Calibration in the reference: 128 C4 sequences of 128 tokens, seed 0 (`model.seqlen = 128`;
`get_loaders("c4", nsamples=128)`; the `--nsamples` loop runs over further all-zero inputs, which
add nothing to the statistics).

Example (a recipe step):
    [[prune]]
    kind = "wanda_sp"
    ratio = 0.2
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune import graph
from nnxprune.calibration.sequential import run_sequential
from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.scoring import get_score, lowest
from nnxprune.transforms.base import Context, Transform, register
from nnxprune.transforms.surgery import edit

HEADS = ("kv", "q", "none")


def removals(ratio: float, heads: str, num_heads: int, num_kv_heads: int, neurons: int
             ) -> tuple[str | None, int, int]:
    """`(head group kind, heads removed per unit, neurons removed)` in one layer."""
    per = num_heads // num_kv_heads if num_kv_heads else 0
    if heads == "kv":
        return "kv", int(ratio * num_kv_heads), int(ratio * neurons)
    if heads == "q":
        return "q", int(ratio * per), int(ratio * neurons)
    return None, 0, int(ratio * neurons)


@register("wanda_sp")
@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaSP(Transform):
    """Removes `ratio` of every layer's heads and MLP neurons, layer by layer (module docstring)."""

    ratio: float
    heads: str = "kv"
    score: str = "wanda_sp"
    soft: bool = False
    batch_size: int = 8
    kind: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def _check_settings(self) -> None:
        score = get_score(self.score)
        if getattr(score, "gather", None) is not None:
            raise UserError(f"score {self.score!r} needs gradients of the whole model, which a "
                            "layer-by-layer pass does not have (use the llm_pruner transform)")
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.heads not in HEADS:
            raise UserError(f"heads must be one of {', '.join(HEADS)}, got {self.heads!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        score.check_kind("mlp")
        if self.heads != "none":
            score.check_kind(self.heads)

    def check(self, config: LlamaConfig) -> LlamaConfig:
        self._check_settings()
        shapes = []
        for i, s in enumerate(config.layers):
            kind, gone, neurons = removals(self.ratio, self.heads, s.num_heads, s.num_kv_heads,
                                           s.intermediate_size)
            if neurons >= s.intermediate_size:
                raise UserError(f"ratio {self.ratio} removes all MLP neurons of layer {i}")
            per = s.num_heads // s.num_kv_heads if s.num_kv_heads else 0
            if gone and gone >= (s.num_kv_heads if kind == "kv" else per):
                raise UserError(f"ratio {self.ratio} removes every head of layer {i}")
            kv = s.num_kv_heads - (gone if kind == "kv" else 0)
            per_kept = per - (gone if kind == "q" else 0)
            shapes.append(s if self.soft else dataclasses.replace(
                s, num_kv_heads=kv, num_heads=kv * per_kept,
                intermediate_size=s.intermediate_size - neurons))
        return dataclasses.replace(config, layers=tuple(shapes))

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        tokens = ctx.required_tokens("wanda_sp")
        score = get_score(self.score)
        kept: dict[str, list[int]] = {}

        def visit(i, layer, calib):
            stats = {i: calib.stats}
            s = layer.shape
            kind, gone, neurons = removals(self.ratio, self.heads, s.num_heads, s.num_kv_heads,
                                           s.intermediate_size)
            plan = [(kind, gone)] if kind and gone else []
            plan.append(("mlp", neurons))
            # every group of the layer is ranked before any of its edits (the reference's order:
            # heads, then neurons, both from the same statistics)
            ranked = []
            for kind_, count in plan:
                group = graph.find_group(model, kind_, i)
                ranked.append((group, lowest(score(model, group, stats), count, group.blocks)))
            for group, keep in ranked:
                edit(model, group, keep, self.soft)
                kept[group.name] = [group.size, int(len(keep))]

        run_sequential(model, tokens, visit, score.collectors(), batch_size=self.batch_size,
                       progress=ctx.progress, desc=f"wanda_sp ({self.score})")
        ctx.log(self.kind, score=self.score, ratio=self.ratio, heads=self.heads, soft=self.soft,
                kept=kept, calibration_tokens=int(np.asarray(tokens).size))
        return model
