"""OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175; code luuyin/OWL): a
first dense pass measures each layer's outlier ratio (the share of its Wanda scores above M times
their mean, over all its projections together; `algorithms.owl`), the ratios become one sparsity
per layer around the target (mean = target, range target +- lambda), and Wanda, Magnitude or
SparseGPT prunes each layer at its own sparsity, through their `layer_sparsity` field (the OWL
code has the same three: `prune_wanda_outlier`, `prune_mag_outlier`, `prune_sparsegpt_outlier`;
the outlier ratios are the Wanda scores' in every case).

The outlier pass runs the sequential driver over the dense model without pruning, as the OWL
code's `check_outlier_mean` does (a calibration pass of its own, so OWL-Wanda costs about two
Wanda runs).

Example:
    >>> OWL(sparsity=0.7, outlier_m=5, lam=0.08)(model, Context(tokens=calibration_tokens))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune.algorithms.owl import outlier_ratio, owl_allocation
from nnxprune.calibration.collectors import InputSumSq
from nnxprune.calibration.sequential import run_sequential
from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.scoring.activation import wanda
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.magnitude import Magnitude
from nnxprune.transforms.sparsegpt import SparseGPT, check_solver
from nnxprune.transforms.sparsify import Sparsify, by_layer, calibration_tokens, node
from nnxprune.transforms.wanda import Wanda


@register("owl")
@dataclasses.dataclass(frozen=True, kw_only=True)
class OWL(Sparsify):
    """Outlier-weighed layerwise sparsity feeding Wanda (default), Magnitude or SparseGPT
    (`blocksize` and `percdamp` are SparseGPT's)."""

    needs_calibration: ClassVar[bool] = True

    method: str = "wanda"
    outlier_m: float = 5.0
    lam: float = 0.08
    batch_size: int = 8
    blocksize: int = 128
    percdamp: float = 0.01
    kind: ClassVar[str]

    METHODS: ClassVar[tuple[str, ...]] = ("wanda", "magnitude", "sparsegpt")

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.method not in self.METHODS:
            raise UserError(f"owl.method must be one of {', '.join(self.METHODS)}, got {self.method!r}")
        if self.pattern is not None:
            raise UserError("OWL allocates unstructured sparsity per layer; 'pattern' is not supported")
        if self.layer_sparsity is not None:
            raise UserError("OWL computes layer_sparsity itself; give 'sparsity' (the mean)")
        if self.outlier_m <= 0:
            raise UserError(f"outlier_m must be > 0, got {self.outlier_m}")
        if self.method == "sparsegpt":
            check_solver(self.blocksize, self.percdamp, None)
        config = super().check(config)
        if not 0 <= self.lam <= min(self.sparsity, 1 - self.sparsity):
            raise UserError(f"lam must be in [0, {min(self.sparsity, 1 - self.sparsity):.4g}] so every "
                            f"layer's sparsity stays in [0, 1], got {self.lam}")
        return config

    def outlier_ratios(self, model, ctx: Context) -> tuple[np.ndarray, list[int]]:
        """Each layer's share of Wanda scores above `outlier_m` x their mean (dense pass)."""
        ratios = {}
        names = by_layer(self.selected(model.config))

        def visit(i, layer, calib):
            ratios[i] = self.layer_outlier_ratio(layer, calib, names[i])

        run_sequential(model, calibration_tokens(ctx), visit, self.outlier_collectors(names),
                       batch_size=self.batch_size, progress=ctx.progress, desc="owl outliers")
        return np.asarray([ratios[i] for i in sorted(ratios)]), sorted(ratios)

    # -- the per-layer parts, shared with the streamed run (`nnxprune.streamed_passes`)
    @staticmethod
    def outlier_collectors(names: dict[int, list[str]]) -> list:
        """The statistics of the outlier pass, for the projections `{layer: [names]}`."""
        return [InputSumSq.for_layers(names)]

    def layer_outlier_ratio(self, layer, calib, names: list[str]) -> float:
        """The outlier ratio of one dense decoder layer (its projections `names`)."""
        sumsq = calib.stats[InputSumSq.name]
        return outlier_ratio([wanda(node(layer, n).effective_kernel(), sumsq[n]) for n in names],
                             self.outlier_m)

    def pruning_step(self, ratios, layers: list[int], num_layers: int, ctx: Context) -> Sparsify:
        """The step that prunes each layer at its OWL sparsity, from the outlier `ratios` of
        `layers` (logged in `ctx`)."""
        sparsities = owl_allocation(ratios, self.sparsity, self.lam)
        per_layer = [self.sparsity] * num_layers
        for i, s in zip(layers, sparsities):
            per_layer[i] = float(s)
        ctx.log(self.kind, outlier_ratios=[float(r) for r in ratios],
                layer_sparsity=[float(s) for s in sparsities], outlier_m=self.outlier_m, lam=self.lam)
        kwargs = dict(sparsity=self.sparsity, targets=self.targets, ignore=self.ignore,
                      layer_sparsity=tuple(per_layer))
        if self.method == "wanda":
            return Wanda(batch_size=self.batch_size, **kwargs)
        if self.method == "sparsegpt":
            return SparseGPT(batch_size=self.batch_size, blocksize=self.blocksize,
                             percdamp=self.percdamp, **kwargs)
        return Magnitude(**kwargs)

    def __call__(self, model, ctx: Context):
        ratios, layers = self.outlier_ratios(model, ctx)
        return self.pruning_step(ratios, layers, model.config.num_layers, ctx)(model, ctx)
