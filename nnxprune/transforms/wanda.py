"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
arXiv 2306.11695; code locuslab/wanda): score `|W_ij| * ||X_j||_2` (`scoring.activation.wanda`),
compared per output channel (each output keeps the same number of inputs), or N:M along the
inputs. Statistics come from the sequential driver (`nnxprune.calibration.sequential`) through
the `InputSumSq` collector: all projections of a layer from one forward of the unpruned layer,
the pruned layer's outputs feeding the next layer, as the reference's `prune_wanda` does.

Example:
    >>> Wanda(sparsity=0.5)(model, Context(tokens=calibration_tokens))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nnxprune.calibration.collectors import InputSumSq
from nnxprune.calibration.sequential import run_sequential
from nnxprune.graph import mask_weights
from nnxprune.scoring.activation import wanda
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.sparsify import (Sparsify, by_layer, calibration_tokens, measured, node,
                                          record)


@register("wanda")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Wanda(Sparsify):
    """|W| * ||X_j||, per output channel (or N:M), sequential calibration."""

    needs_calibration: ClassVar[bool] = True

    batch_size: int = 8
    kind: ClassVar[str]
    streamable: ClassVar[bool] = True

    def layer_collectors(self, names):
        return [InputSumSq.for_layers(names)]

    def prune_layer(self, i, layer, calib, names, log):
        sumsq = calib.stats[InputSumSq.name]
        for name in names:
            lin = node(layer, name)
            keep = self.keep_from_scores(wanda(lin.effective_kernel(), sumsq[name]),
                                         self.sparsity_of(i), per_output=True)
            mask_weights(lin, keep)
            log.setdefault("per_matrix", {})[f"layers.{i}.{name}"] = measured(lin)

    def __call__(self, model, ctx: Context):
        tokens = calibration_tokens(ctx)
        log = {"per_matrix": {}}
        names = by_layer(self.selected(model.config))

        def visit(i, layer, calib):
            self.prune_layer(i, layer, calib, names[i], log)

        timings = run_sequential(model, tokens, visit, self.layer_collectors(names),
                                 batch_size=self.batch_size, progress=ctx.progress, desc="wanda")
        record(ctx, self.kind, log["per_matrix"], pattern=self.pattern or "unstructured",
               timings=timings, calibration_tokens=int(tokens.size))
        return model
