"""Collectors: the statistics the sequential driver gathers for a method (DESIGN.md, principle 10).

A collector is a small frozen (hashable) dataclass that says, for decoder layer `i`, which
activations inside the layer it reads (`taps`: module names within the layer; a `Linear` gives
its input, an `RMSNorm` its output), and how one calibration sequence turns into a statistic
(`row`, traced inside the driver's jitted statistics forward, so captured activations never leave
the device). The driver sums the rows' statistics over all sequences (`combine = "sum"`) or stacks
them (`"stack"`), then `finish` turns the total into what the method reads. The method that needs
a statistic asks for its collector; the driver knows none of them by name.

The collectors here are the ones the methods of the field use:

- `InputSumSq`: per input column, the sum over tokens of `x_j^2` (Wanda's `||X_j||^2`).
- `InputXtX`: `X^T X` of a projection's input (SparseGPT's `H = 2 / nsamples * X^T X` is built
  from it by `algorithms.sparsegpt.hessian`, the one Hessian builder; SparseLLM reads it too).
- `ChannelMeanAbs`: Minitron's activation importance (ModelOpt's aggregation): per channel
  `sqrt(sum over sequences of (mean over tokens of |x|)^2)`.
- `BlockInfluence`: ShortGPT's `1 - mean over tokens of cos(h_in, h_out)` of the whole layer.
- `Activations`: the tapped activations themselves, `[sequences * tokens, channels]`
  (SparseLLM's MLP input).

Example:
    >>> run_sequential(model, tokens, visit, collectors=[InputSumSq(names=("mlp.down_proj",))])
    >>> def visit(i, layer, calib): calib.stats["sumsq"]["mlp.down_proj"]   # [in]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Rows = dict[str, jax.Array]  # tap name -> that activation over one sequence, [tokens, channels]


@dataclasses.dataclass(frozen=True)
class Collector:
    """Base: one statistic of one decoder layer, gathered by the driver's statistics forward.

    Subclasses set `name` (the key in `LayerCalibration.stats`) and implement `row`. A collector
    active for no layer costs nothing: the driver skips the statistics forward of layers for
    which no collector has taps and none needs the layer's input and output.
    """

    name: ClassVar[str] = ""
    combine: ClassVar[str] = "sum"  # "sum" over sequences, or "stack" them
    needs_output: ClassVar[bool] = False  # whether `row` reads the layer's output

    def taps(self, index: int) -> tuple[str, ...]:
        """Module names within layer `index` whose activation `row` reads."""
        return ()

    def active(self, index: int) -> bool:
        return bool(self.taps(index)) or self.needs_output

    def row(self, names: tuple[str, ...], taps: Rows, x_in: jax.Array, x_out: jax.Array) -> Any:
        """The statistic of one sequence: `names` are this layer's `taps(index)`, `taps` every
        captured activation as `[tokens, channels]` float32, `x_in`, `x_out [tokens, hidden]` the
        layer's input and output (read `x_out` only when `needs_output`)."""
        raise NotImplementedError

    def finish(self, total: Any, sequences: int, tokens: int) -> Any:
        """What the method reads, from the sum (or stack) over all `sequences` (`tokens` rows in
        all)."""
        return total


def _layer_filter(layers: tuple[int, ...] | None, index: int) -> bool:
    return layers is None or index in layers


@dataclasses.dataclass(frozen=True)
class _PerTap(Collector):
    """A collector over named modules of every layer (or of `layers` only)."""

    names: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    per_layer: tuple[tuple[int, tuple[str, ...]], ...] | None = None  # overrides `names`

    def taps(self, index: int) -> tuple[str, ...]:
        if self.per_layer is not None:
            return dict(self.per_layer).get(index, ())
        return self.names if _layer_filter(self.layers, index) else ()

    @classmethod
    def for_layers(cls, names_by_layer: dict[int, list[str]], **kw) -> "_PerTap":
        """The collector of different modules in different layers (`{layer: [names]}`)."""
        return cls(per_layer=tuple((i, tuple(n)) for i, n in sorted(names_by_layer.items())), **kw)


@dataclasses.dataclass(frozen=True)
class InputSumSq(_PerTap):
    """`{name: [in]}`: the sum over tokens of `x_j^2` for every input column `j`."""

    name: ClassVar[str] = "sumsq"

    def row(self, names, taps, x_in, x_out):
        return {n: jnp.sum(taps[n] * taps[n], axis=0) for n in names}


@dataclasses.dataclass(frozen=True)
class InputXtX(_PerTap):
    """`{name: [in, in]}`: `X^T X` of the projection's input over all calibration tokens, summed
    in float32 at full precision (SparseGPT's Hessian is `algorithms.sparsegpt.hessian` of it)."""

    name: ClassVar[str] = "xtx"

    def row(self, names, taps, x_in, x_out):
        return {n: jnp.dot(taps[n].T, taps[n], precision=jax.lax.Precision.HIGHEST)
                for n in names}


@dataclasses.dataclass(frozen=True)
class ChannelMeanAbs(_PerTap):
    """`{name: [channels]}`: `sqrt(sum over sequences of (mean over tokens of |x_c|)^2)`, the
    activation importance of Minitron as NVIDIA ModelOpt aggregates it (one calibration sequence
    per sample)."""

    name: ClassVar[str] = "mean_abs"

    def row(self, names, taps, x_in, x_out):
        return {n: jnp.square(jnp.mean(jnp.abs(taps[n]), axis=0)) for n in names}

    def finish(self, total, sequences, tokens):
        return {n: jnp.sqrt(v) for n, v in total.items()}


@dataclasses.dataclass(frozen=True)
class BlockInfluence(Collector):
    """ShortGPT's block influence of the layer: `1 - mean over all tokens of cos(h_in, h_out)`,
    float32 (`layers` restricts it to some layers)."""

    layers: tuple[int, ...] | None = None
    name: ClassVar[str] = "block_influence"
    needs_output: ClassVar[bool] = True

    def active(self, index: int) -> bool:
        return _layer_filter(self.layers, index)

    def row(self, names, taps, x_in, x_out):
        a, b = x_in.astype(jnp.float32), x_out.astype(jnp.float32)
        cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
        return jnp.sum(cos)

    def finish(self, total, sequences, tokens):
        return 1.0 - float(total) / tokens


@dataclasses.dataclass(frozen=True)
class Activations(_PerTap):
    """`{name: [sequences * tokens, channels]}`: the tapped activations themselves, float32."""

    name: ClassVar[str] = "activations"
    combine: ClassVar[str] = "stack"

    def row(self, names, taps, x_in, x_out):
        return {n: taps[n] for n in names}

    def finish(self, total, sequences, tokens):
        return {n: v.reshape(-1, v.shape[-1]) for n, v in total.items()}
