"""FLAP: fluctuation-based adaptive structured pruning with bias compensation, no retraining.

An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP,
AAAI 2024, arXiv 2312.11983; code CASIA-IVA-Lab/FLAP, `lib/prune.py`: `prune_flap`, `compress`).
Three parts, as in the reference:

1. **Metric.** One pass of the dense model over the calibration text gathers, per input channel
   of every o_proj and down_proj, the mean, variance and sum of squares
   (`scoring.flap.InputMoments`); the fluctuation metric (`metric`: `wifv`, the paper's, `ifv` or
   `wifn`) scores every channel (`scoring.flap.channel_metric`; o_proj's squared).
2. **Adaptive structure search** (`structure = "AL-AM"`, the paper's): in every layer the o_proj
   channel scores and the down_proj channel scores are standardized separately (minus their mean,
   over their sample standard deviation); a head's score is the mean of its channels' standardized
   scores. All heads and neurons of all layers are then sorted together, descending; walking down,
   each adds its weight (its parameter count), and the threshold is the score where the running
   sum comes closest to `(1 - ratio)` of the total; structures scoring above it stay. So `ratio` is
   the fraction of the attention and MLP weights removed (embeddings and norms not counted), and
   every layer keeps what its scores earn. `"UL-UM"` (the paper's uniform ablation) removes
   `int(ratio * K)` KV groups and `int(ratio * F)` neurons of lowest unstandardized score from
   every layer instead.
3. **Bias compensation** (`bias = true`): a removed channel is replaced by its calibration mean,
   so o_proj and down_proj get the bias `sum over removed j of mean_j * W[j, :]` (added to any
   bias they have). For the mean input the pruned projection gives the dense one's output.

Grouped-query attention (the reference is multi-head): a "head" is a KV group, a k and v head with
the `G` query heads that share them, scored by the mean of its `G * head_dim` standardized o_proj
channels and weighted by its `(2 G + 2) * head_dim * hidden` parameters (the reference's head
weight, `512 / 3` neurons, is this with `G = 1`, `head_dim = 128`: `4 * 128 / 3`).

Departures: a layer whose every KV group falls below the threshold keeps its best one (this model
cannot have a layer without attention; the reference would empty it); the threshold's structure
itself goes, as in the reference (`metric > threshold`). The paper calibrates on 1024 WikiText-2
train sequences of 128 tokens; the recipe uses C4 (WikiText-2 here is the test split that is
evaluated). The statistics are exact (`scoring.flap`). Nothing runs on pruned outputs: FLAP scores
every layer on the dense model, then prunes.

Example (a recipe step):
    [[prune]]
    kind = "flap"
    ratio = 0.25
    metric = "wifv"
    structure = "AL-AM"
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune import graph
from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.scoring import lowest
from nnxprune.scoring.flap import METRICS, InputMoments, channel_metric
from nnxprune.transforms.base import Context, Transform, register
from nnxprune.transforms.surgery import edit

STRUCTURES = ("AL-AM", "UL-UM")


def standardize(x: np.ndarray) -> np.ndarray:
    """`(x - mean) / std` with the sample standard deviation (torch's default, the reference's);
    constant scores standardize to zeros."""
    x = np.asarray(x, np.float64)
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


def threshold(scores: np.ndarray, weights: np.ndarray, ratio: float) -> float:
    """The reference's global threshold: scores sorted descending, the one where the running sum
    of `weights` comes closest to `(1 - ratio)` of their total (structures above it stay)."""
    order = np.argsort(-scores, kind="stable")
    running = np.cumsum(weights[order])
    return float(scores[order][np.argmin(np.abs(running - weights.sum() * (1 - ratio)))])


def allocate(kv_scores: list[np.ndarray], mlp_scores: list[np.ndarray], kv_weights: list[float],
             neuron_weight: float, ratio: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer `(kept KV groups, kept neurons)` (sorted indices) under one global threshold on
    the standardized scores (`kv_weights[i]`: a KV group's parameters in layer `i`)."""
    scores = np.concatenate([*kv_scores, *mlp_scores])
    weights = np.concatenate([np.full(s.size, w, np.float64) for s, w in zip(kv_scores, kv_weights)]
                             + [np.full(s.size, float(neuron_weight)) for s in mlp_scores])
    t = threshold(scores, weights, ratio)
    out = []
    for kv, mlp in zip(kv_scores, mlp_scores, strict=True):
        kept = np.flatnonzero(kv > t)
        if kept.size == 0:  # attention cannot be emptied here: the layer keeps its best group
            kept = np.asarray([int(np.argmax(kv))])
        out.append((kept, np.flatnonzero(mlp > t)))
    return out


def standardized_scores(model, i: int, stats, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Layer `i`'s `(KV group scores [K], neuron scores [F])`: channel metrics standardized over
    the layer's o_proj / down_proj channels, a group's the mean over its o_proj channels."""
    attn = standardize(channel_metric(model, i, "self_attn.o_proj", stats, metric))
    k = model.layers[i].self_attn.num_kv_heads
    mlp = standardize(channel_metric(model, i, "mlp.down_proj", stats, metric))
    return attn.reshape(k, -1).mean(axis=1), mlp


def compensate(linear, mean: np.ndarray, removed: np.ndarray) -> None:
    """Adds the removed input channels' mean contribution, `mean[removed] @ W[removed, :]`, to the
    bias of `linear` (kernel `[in, out]`), before they are sliced away."""
    if removed.size == 0:
        return
    kernel = np.asarray(linear.effective_kernel(), np.float32)
    add = np.asarray(mean, np.float32)[removed] @ kernel[removed]
    old = 0.0 if linear.bias is None else np.asarray(linear.bias[...], np.float32)
    linear.set_bias(old + add)


@register("flap")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FLAP(Transform):
    """Removes `ratio` of the attention and MLP weights by FLAP (module docstring)."""

    ratio: float
    metric: str = "wifv"
    structure: str = "AL-AM"
    bias: bool = True
    soft: bool = False
    batch_size: int = 8
    kind: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    @property
    def shapes_from_scores(self) -> bool:
        """True for the adaptive structure, hard edit: `check` returns the unpruned shapes then."""
        return self.structure == "AL-AM" and not self.soft

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.metric not in METRICS:
            raise UserError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.structure not in STRUCTURES:
            raise UserError(f"structure must be one of {', '.join(STRUCTURES)}, got "
                            f"{self.structure!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.structure == "AL-AM" or self.soft:
            return config  # the adaptive shapes follow the calibration scores
        shapes = []  # int(ratio * n) < n: every layer keeps a KV group
        for s in config.layers:
            kv, neurons = int(self.ratio * s.num_kv_heads), int(self.ratio * s.intermediate_size)
            per = s.num_heads // s.num_kv_heads
            shapes.append(dataclasses.replace(s, num_kv_heads=s.num_kv_heads - kv,
                                              num_heads=(s.num_kv_heads - kv) * per,
                                              intermediate_size=s.intermediate_size - neurons))
        return dataclasses.replace(config, layers=tuple(shapes))

    def plan(self, model, stats) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer `(kept KV groups, kept neurons)` from the dense model's statistics."""
        if self.structure == "UL-UM":
            from nnxprune.scoring import get_score

            score = get_score(f"flap_{self.metric}")
            out = []
            for i, layer in enumerate(model.layers):
                kv, mlp = graph.find_group(model, "kv", i), graph.find_group(model, "mlp", i)
                out.append((lowest(score(model, kv, stats), int(self.ratio * kv.size)),
                            lowest(score(model, mlp, stats), int(self.ratio * mlp.size))))
            return out
        kv_scores, mlp_scores, kv_weights = [], [], []
        hidden = model.config.hidden_size
        for i, layer in enumerate(model.layers):
            kv, mlp = standardized_scores(model, i, stats, self.metric)
            kv_scores.append(kv)
            mlp_scores.append(mlp)
            per = layer.self_attn.num_heads // layer.self_attn.num_kv_heads
            kv_weights.append((2 * per + 2) * layer.self_attn.head_dim * hidden)
        return allocate(kv_scores, mlp_scores, kv_weights, 3 * hidden, self.ratio)

    def __call__(self, model, ctx: Context):
        self.check(model.config)
        tokens = ctx.required_tokens("flap")
        stats = collect_statistics(model, tokens, (InputMoments(),), batch_size=self.batch_size,
                                   progress=ctx.progress, desc=f"flap ({self.metric})")
        self.prune(model, stats, ctx, calibration_tokens=int(np.asarray(tokens).size))
        return model

    def prune(self, model, stats, ctx: Context, calibration_tokens: int | None = None):
        """Allocates, compensates and removes from the dense model's `InputMoments` statistics
        (`{layer: {"moments": ...}}`); the statistics pass is `__call__`'s."""
        kept = {}
        for i, (kv_keep, mlp_keep) in enumerate(self.plan(model, stats)):
            layer, moments = model.layers[i], stats[i][InputMoments.name]
            kv, mlp = graph.find_group(model, "kv", i), graph.find_group(model, "mlp", i)
            if self.bias:
                width = layer.self_attn.o_proj.in_features // kv.size  # o_proj rows of a group
                gone = np.setdiff1d(np.arange(kv.size), kv_keep)
                rows = (gone[:, None] * width + np.arange(width)[None]).reshape(-1)
                compensate(layer.self_attn.o_proj, moments["self_attn.o_proj"]["mean"], rows)
                compensate(layer.mlp.down_proj, moments["mlp.down_proj"]["mean"],
                           np.setdiff1d(np.arange(mlp.size), mlp_keep))
            kept[f"layers.{i}"] = {"kv": [kv.size, int(kv_keep.size)],
                                   "mlp": [mlp.size, int(mlp_keep.size)]}
            edit(model, kv, kv_keep, self.soft)
            edit(model, mlp, mlp_keep, self.soft)
        ctx.log(self.kind, ratio=self.ratio, metric=self.metric, structure=self.structure,
                bias=self.bias, soft=self.soft, kept=kept, calibration_tokens=calibration_tokens)
        return model
