"""What the post-training sparsity transforms share (Magnitude, Wanda, SparseGPT, OWL, SparseLLM).

Settings: `sparsity` (unstructured, in [0, 1)) or `pattern` ("2:4"), `targets` / `ignore`
regexes over projection names like `layers.3.mlp.down_proj` (the one rule of
`nnxprune.graph.targets`), and `layer_sparsity`, one sparsity per decoder layer (non-uniform
allocation: OWL fills it; a recipe may give it too).

Conventions: kernels are `[in, out]`; N:M prunes N of every M consecutive inputs ("2:4" = 50%,
"3:4" = 75%). Unstructured counts are `int(sparsity * count)`, so the measured sparsity is exactly
what was asked up to that rounding (the reference Magnitude code's `<=` threshold prunes ties and
one weight more; we prune exactly the count). Every transform records what it did (per-matrix
sparsity, timings, SparseGPT damping retries) in the run's report.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from nnxprune.algorithms import masks as M
from nnxprune.errors import UserError
from nnxprune.graph.targets import layer_projection_names, select_projections, split_name
from nnxprune.layers import Linear
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, Transform


def in_features(config: LlamaConfig, layer: int, name: str) -> int:
    s = config.layers[layer]
    return {"self_attn.o_proj": s.num_heads * config.head_dim,
            "mlp.down_proj": s.intermediate_size}.get(name, config.hidden_size)


def node(layer, name: str) -> Linear:
    """The module `name` (like `mlp.up_proj`) inside a decoder layer."""
    out = layer
    for part in name.split("."):
        out = getattr(out, part)
    return out


def measured(lin: Linear) -> float:
    return float(1.0 - np.asarray(lin.mask[...]).mean())


def record(ctx: Context, kind: str, per_matrix: dict[str, float], **extra) -> None:
    values = np.asarray(list(per_matrix.values()) or [0.0])
    ctx.log(kind, matrices=len(per_matrix), mean_sparsity=float(values.mean()),
            per_matrix=per_matrix, **extra)


def calibration_tokens(ctx: Context) -> np.ndarray:
    return ctx.required_tokens()


def by_layer(selected: list[tuple[int, str]]) -> dict[int, list[str]]:
    """`[(layer, name)]` -> `{layer: [names]}`."""
    out: dict[int, list[str]] = {}
    for i, name in selected:
        out.setdefault(i, []).append(name)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sparsify(Transform):
    """Shared settings and checks of the sparsity transforms (module docstring)."""

    sparsity: float | None = None
    pattern: str | None = None
    targets: str | None = None
    ignore: str | None = None
    layer_sparsity: tuple[float, ...] | None = None
    kind: ClassVar[str]

    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        try:
            return M.parse_nm(self.pattern)
        except ValueError as e:
            raise UserError(str(e)) from None

    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = self.nm()
            return n / m
        return self.sparsity

    def sparsity_of(self, layer: int) -> float:
        """The sparsity of decoder layer `layer` (`layer_sparsity` when given)."""
        if self.layer_sparsity is not None:
            return self.layer_sparsity[layer]
        return self.target_sparsity()

    def check(self, config: LlamaConfig) -> LlamaConfig:
        if self.pattern is None and self.sparsity is None:
            raise UserError("give 'sparsity' (unstructured, e.g. 0.5) or 'pattern' (N:M, e.g. \"2:4\")")
        try:
            if self.sparsity is not None:
                M.check_sparsity(self.sparsity)
            for s in self.layer_sparsity or ():
                M.check_sparsity(s)
        except ValueError as e:
            raise UserError(str(e)) from None
        nm = self.nm()
        if nm is not None and self.sparsity is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise UserError(f"sparsity {self.sparsity} contradicts pattern {self.pattern!r} "
                            f"({nm[0] / nm[1]:.4g}); give one of them")
        if self.layer_sparsity is not None:
            if nm is not None:
                raise UserError("layer_sparsity is unstructured; it does not combine with 'pattern'")
            if len(self.layer_sparsity) != config.num_layers:
                raise UserError(f"layer_sparsity has {len(self.layer_sparsity)} entries; the model "
                                f"has {config.num_layers} layers at this step")
        names = self.selected(config)
        if nm is not None:
            for i, name in names:
                width = in_features(config, i, name)
                if width % nm[1]:
                    raise UserError(f"layers.{i}.{name} has {width} inputs, not a multiple of "
                                    f"M={nm[1]} for pattern {self.pattern!r}")
        return config

    def selected(self, config: LlamaConfig) -> list[tuple[int, str]]:
        """(layer index, name within the layer) of every targeted projection."""
        names = select_projections(layer_projection_names(config.num_layers), self.targets,
                                   self.ignore)
        return [split_name(n) for n in names]

    # -- the per-layer part: the in-memory `__call__` and the streamed run
    # (`nnxprune.streamed`) both prune through these, one decoder layer at a time
    streamable: ClassVar[bool] = False  # whether prune_layer is all the method does

    def layer_collectors(self, names: dict[int, list[str]]) -> list:
        """The statistics `prune_layer` needs, for the projections `{layer: [names]}` (none:
        the weights alone)."""
        return []

    def prune_layer(self, i: int, layer, calib, names: list[str], log: dict) -> None:
        """Prunes the projections `names` of decoder layer `i` in place; `calib` is its
        `LayerCalibration` (None without calibration). What it did goes into `log`:
        `log["per_matrix"]` (full name -> measured sparsity) and method-specific entries."""
        raise NotImplementedError

    def keep_from_scores(self, scores, sparsity: float, *, per_output: bool) -> jnp.ndarray:
        nm = self.nm()
        if nm is not None:
            return M.nm_keep(scores, *nm)
        return M.unstructured_keep(scores, sparsity, per_output=per_output)
