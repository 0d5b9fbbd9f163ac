"""Magnitude pruning: |W| with one threshold per weight matrix, or the N smallest of every M
inputs (N:M). No calibration. The baseline of every sparsity paper (e.g. Han et al., "Learning
both Weights and Connections for Efficient Neural Networks", 2015; as run by locuslab/wanda's
`prune_magnitude`).

Example:
    >>> Magnitude(sparsity=0.5)(model, Context())
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

from nnxprune.graph import mask_weights
from nnxprune.scoring.weight import magnitude
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.sparsify import Sparsify, by_layer, measured, node, record


@register("magnitude")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Magnitude(Sparsify):
    """|W| with one threshold per weight matrix (or N:M along the inputs)."""

    kind: ClassVar[str]
    streamable: ClassVar[bool] = True

    def prune_layer(self, i, layer, calib, names, log):
        for name in names:
            lin = node(layer, name)
            keep = self.keep_from_scores(magnitude(lin.effective_kernel()), self.sparsity_of(i),
                                         per_output=False)
            mask_weights(lin, keep)
            log.setdefault("per_matrix", {})[f"layers.{i}.{name}"] = measured(lin)

    def __call__(self, model, ctx: Context):
        log = {"per_matrix": {}}
        t0 = time.perf_counter()
        for i, names in by_layer(self.selected(model.config)).items():
            self.prune_layer(i, model.layers[i], None, names, log)
        record(ctx, self.kind, log["per_matrix"], pattern=self.pattern or "unstructured",
               seconds=time.perf_counter() - t0)
        return model
