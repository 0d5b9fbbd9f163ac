"""Post-training sparsity: Magnitude, Wanda, SparseGPT, and OWL's non-uniform allocation.

- Magnitude: |W|, one threshold per weight matrix (unstructured) or the N smallest of every M
  inputs (N:M). No calibration.
- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695; code locuslab/wanda): score |W_ij| * ||X_j||_2, compared per output channel
  (each output keeps the same number of inputs), or N:M along the inputs. Statistics come from
  the sequential driver (`nnxprune.calibration.sequential`): all projections of a layer from one
  forward of the unpruned layer, the pruned layer's outputs feeding the next layer.
- SparseGPT (Frantar & Alistarh, arXiv 2301.00774; code IST-DASLab/sparsegpt): OBS pruning with
  weight updates from H = 2/n X^T X (`nnxprune.algorithms.sparsegpt`), same driver.
- OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175; code luuyin/OWL): a
  first dense pass measures each layer's outlier ratio, the share of its Wanda scores above M
  times their mean (over all its projections together); ratios are min-max scaled to
  [0, 2*lambda], centred, and each layer gets sparsity `target - (scaled_ratio - mean)`, so
  layers with more outliers are pruned less and the mean stays at the target. Then Wanda or
  Magnitude prunes each layer at its own sparsity.

Conventions: kernels are `[in, out]`; N:M prunes N of every M consecutive inputs ("2:4" = 50%,
"3:4" = 75%). Unstructured counts are `int(sparsity * count)`, so the measured sparsity is exactly
what was asked up to that rounding (the reference Magnitude code's `<=` threshold prunes ties and
one weight more; we prune exactly the count). Every transform records what it did (per-matrix
sparsity, timings, SparseGPT damping retries) in the run's report.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from nnxprune.algorithms import masks as M
from nnxprune.errors import UserError
from nnxprune.graph import mask_weights
from nnxprune.graph.targets import select_projections
from nnxprune.layers import Linear
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, Transform, register

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# Projections that read the same tensor (so the same Hessian): SparseGPT factors it once.
SHARED_INPUT = {"self_attn.q_proj": "self_attn.input", "self_attn.k_proj": "self_attn.input",
                "self_attn.v_proj": "self_attn.input", "mlp.gate_proj": "mlp.input",
                "mlp.up_proj": "mlp.input"}


def shared_factor(cache: dict, name: str, stats, percdamp: float):
    """SparseGPT's Hessian factor for projection `name` of one layer (its `ProjectionStats`),
    computed once per input tensor: `cache` maps each input (`SHARED_INPUT`) to its factor."""
    from nnxprune.algorithms.sparsegpt import hessian_factor

    key = SHARED_INPUT.get(name, name)
    if key not in cache:
        cache[key] = hessian_factor(stats.hessian(), percdamp=percdamp)
    return cache[key]


def _in_features(config: LlamaConfig, layer: int, name: str) -> int:
    s = config.layers[layer]
    return {"self_attn.o_proj": s.num_heads * config.head_dim,
            "mlp.down_proj": s.intermediate_size}.get(name, config.hidden_size)


def _node(layer, name: str) -> Linear:
    node = layer
    for part in name.split("."):
        node = getattr(node, part)
    return node


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Sparsify(Transform):
    """Shared settings: `sparsity` (unstructured, in [0, 1)) or `pattern` ("2:4"), and the
    `targets` / `ignore` regexes over projection names like `layers.3.mlp.down_proj`."""

    sparsity: float | None = None
    pattern: str | None = None
    targets: str | None = None
    ignore: str | None = None
    kind: ClassVar[str]

    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else M.parse_nm(self.pattern)

    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = self.nm()
            return n / m
        return self.sparsity

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.pattern is None and self.sparsity is None:
            raise UserError("give 'sparsity' (unstructured, e.g. 0.5) or 'pattern' (N:M, e.g. \"2:4\")")
        if self.sparsity is not None:
            M.check_sparsity(self.sparsity)
        nm = self.nm()
        if nm is not None and self.sparsity is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise UserError(f"sparsity {self.sparsity} contradicts pattern {self.pattern!r} "
                            f"({nm[0] / nm[1]:.4g}); give one of them")
        names = self.selected(config)
        if nm is not None:
            for i, name in names:
                width = _in_features(config, i, name)
                if width % nm[1]:
                    raise UserError(f"layers.{i}.{name} has {width} inputs, not a multiple of "
                                    f"M={nm[1]} for pattern {self.pattern!r}")
        return config

    def selected(self, config: LlamaConfig) -> list[tuple[int, str]]:
        """(layer index, name within the layer) of every targeted projection."""
        all_names = [f"layers.{i}.{p}" for i in range(config.num_layers) for p in PROJECTIONS]
        out = []
        for full in select_projections(all_names, self.targets, self.ignore):
            _, index, rest = full.split(".", 2)
            out.append((int(index), rest))
        return out

    def keep_from_scores(self, scores, sparsity: float, *, per_output: bool) -> jnp.ndarray:
        nm = self.nm()
        if nm is not None:
            return M.nm_keep(scores, *nm)
        return M.unstructured_keep(scores, sparsity, per_output=per_output)


def _record(ctx: Context, kind: str, per_matrix: dict[str, float], **extra) -> None:
    values = np.asarray(list(per_matrix.values()) or [0.0])
    ctx.log(kind, matrices=len(per_matrix), mean_sparsity=float(values.mean()),
            per_matrix=per_matrix, **extra)


def _measured(lin: Linear) -> float:
    return float(1.0 - np.asarray(lin.mask[...]).mean())


@register("magnitude")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Magnitude(_Sparsify):
    """|W| with one threshold per weight matrix (or N:M along the inputs)."""

    kind: ClassVar[str]

    def __call__(self, model, ctx: Context, layer_sparsity: dict[int, float] | None = None):
        per_matrix = {}
        t0 = time.perf_counter()
        for i, name in self.selected(model.config):
            lin = _node(model.layers[i], name)
            sparsity = (layer_sparsity or {}).get(i, self.target_sparsity())
            keep = self.keep_from_scores(jnp.abs(lin.effective_kernel()), sparsity, per_output=False)
            mask_weights(lin, keep)
            per_matrix[f"layers.{i}.{name}"] = _measured(lin)
        _record(ctx, self.kind, per_matrix, pattern=self.pattern or "unstructured",
                seconds=time.perf_counter() - t0)
        return model


def _calibration_tokens(ctx: Context) -> np.ndarray:
    tokens = ctx.calibration_tokens()
    if tokens is None:
        raise UserError("this method needs calibration data: add a [calibration] section")
    return tokens


def _wanda_scores(lin: Linear, sumsq) -> jnp.ndarray:
    return jnp.abs(lin.effective_kernel()) * jnp.sqrt(sumsq)[:, None]


@register("wanda")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Wanda(_Sparsify):
    """|W| * ||X_j||, per output channel (or N:M), sequential calibration."""

    needs_calibration: ClassVar[bool] = True

    batch_size: int = 8
    kind: ClassVar[str]

    def __call__(self, model, ctx: Context, layer_sparsity: dict[int, float] | None = None):
        from nnxprune.calibration.sequential import run_sequential

        tokens = _calibration_tokens(ctx)
        per_matrix = {}
        selected = {(i, n) for i, n in self.selected(model.config)}

        def visit(i, layer, stats):
            sparsity = (layer_sparsity or {}).get(i, self.target_sparsity())
            for name, s in stats.items():
                if (i, name) not in selected:
                    continue
                lin = _node(layer, name)
                keep = self.keep_from_scores(_wanda_scores(lin, s.sumsq), sparsity, per_output=True)
                mask_weights(lin, keep)
                per_matrix[f"layers.{i}.{name}"] = _measured(lin)

        timings = run_sequential(model, tokens, visit, targets=self.targets, ignore=self.ignore,
                                 batch_size=self.batch_size, progress=ctx.progress, desc="wanda")
        _record(ctx, self.kind, per_matrix, pattern=self.pattern or "unstructured", timings=timings,
                calibration_tokens=int(tokens.size))
        return model


@register("sparsegpt")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPT(_Sparsify):
    """OBS pruning with weight updates (blocked, lazy batch updates), sequential calibration."""

    needs_calibration: ClassVar[bool] = True

    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.blocksize < 1:
            raise UserError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise UserError(f"percdamp must be in (0, 1), got {self.percdamp}")
        nm = self.nm()
        if nm is not None and self.blocksize % nm[1]:
            raise UserError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")
        return super().check(config)

    def __call__(self, model, ctx: Context):
        from nnxprune.algorithms.sparsegpt import sparsegpt_prune
        from nnxprune.calibration.sequential import run_sequential

        tokens = _calibration_tokens(ctx)
        nm = self.nm()
        per_matrix, retries, errors = {}, {}, {}
        selected = {(i, n) for i, n in self.selected(model.config)}

        def visit(i, layer, stats):
            factors = {}
            for name, s in stats.items():
                if (i, name) not in selected:
                    continue
                lin = _node(layer, name)
                kernel, keep, info = sparsegpt_prune(
                    lin.effective_kernel(), s.hessian(),
                    factor=shared_factor(factors, name, s, self.percdamp),
                    sparsity=None if nm else self.sparsity, n=nm[0] if nm else 0,
                    m=nm[1] if nm else 0, blocksize=self.blocksize)
                full = f"layers.{i}.{name}"
                if not np.isfinite(np.asarray(kernel)).all():
                    raise FloatingPointError(f"SparseGPT produced non-finite weights in {full}")
                lin.kernel.set_value(kernel.astype(lin.kernel.dtype))
                mask_weights(lin, keep)
                per_matrix[full] = _measured(lin)
                errors[full] = float(info.get("error", float("nan")))
                if info.get("retries"):
                    retries[full] = {"retries": int(info["retries"]), "damping": float(info["damping"])}

        timings = run_sequential(model, tokens, visit, targets=self.targets, ignore=self.ignore,
                                 want_xtx=True, batch_size=self.batch_size, progress=ctx.progress,
                                 desc="sparsegpt")
        _record(ctx, self.kind, per_matrix, pattern=self.pattern or "unstructured", timings=timings,
                calibration_tokens=int(tokens.size), damping_retries=retries,
                reconstruction_error=errors)
        return model


def owl_allocation(outlier_ratios, target: float, lam: float) -> np.ndarray:
    """Per-layer sparsities from outlier ratios (OWL): min-max scale to [0, 2*lam], centre, and
    subtract from the target, so the mean is the target and the range is target +- lam."""
    r = np.asarray(outlier_ratios, dtype=np.float64)
    spread = r.max() - r.min()
    scaled = np.zeros_like(r) if spread == 0 else (r - r.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1 - target)
    return 1 - density


@register("owl")
@dataclasses.dataclass(frozen=True, kw_only=True)
class OWL(_Sparsify):
    """Outlier-weighed layerwise sparsity feeding Wanda (default) or Magnitude."""

    needs_calibration: ClassVar[bool] = True

    method: str = "wanda"
    outlier_m: float = 5.0
    lam: float = 0.08
    batch_size: int = 8
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.method not in ("wanda", "magnitude"):
            raise UserError(f"owl.method must be 'wanda' or 'magnitude', got {self.method!r}")
        if self.pattern is not None:
            raise UserError("OWL allocates unstructured sparsity per layer; 'pattern' is not supported")
        if self.outlier_m <= 0:
            raise UserError(f"outlier_m must be > 0, got {self.outlier_m}")
        config = super().check(config)
        if not 0 <= self.lam <= min(self.sparsity, 1 - self.sparsity):
            raise UserError(f"lam must be in [0, {min(self.sparsity, 1 - self.sparsity):.4g}] so every "
                            f"layer's sparsity stays in [0, 1], got {self.lam}")
        return config

    def outlier_ratios(self, model, ctx: Context) -> tuple[np.ndarray, list[int]]:
        """Each layer's share of Wanda scores above `outlier_m` x their mean (dense pass)."""
        from nnxprune.calibration.sequential import run_sequential

        ratios = {}
        selected = {(i, n) for i, n in self.selected(model.config)}

        def visit(i, layer, stats):
            scores = [_wanda_scores(_node(layer, name), s.sumsq).reshape(-1)
                      for name, s in stats.items() if (i, name) in selected]
            flat = jnp.concatenate(scores)
            ratios[i] = float(jnp.mean(flat > self.outlier_m * jnp.mean(flat)))

        run_sequential(model, _calibration_tokens(ctx), visit, targets=self.targets,
                       ignore=self.ignore, batch_size=self.batch_size, progress=ctx.progress,
                       desc="owl outliers")
        return np.asarray([ratios[i] for i in sorted(ratios)]), sorted(ratios)

    def __call__(self, model, ctx: Context):
        ratios, layers = self.outlier_ratios(model, ctx)
        sparsities = owl_allocation(ratios, self.sparsity, self.lam)
        per_layer = {i: float(s) for i, s in zip(layers, sparsities)}
        ctx.log(self.kind, outlier_ratios=[float(r) for r in ratios],
                layer_sparsity=[float(s) for s in sparsities], outlier_m=self.outlier_m, lam=self.lam)
        inner_cls = Wanda if self.method == "wanda" else Magnitude
        kwargs = dict(sparsity=self.sparsity, targets=self.targets, ignore=self.ignore)
        if inner_cls is Wanda:
            kwargs["batch_size"] = self.batch_size
        return inner_cls(**kwargs)(model, ctx, layer_sparsity=per_layer)
