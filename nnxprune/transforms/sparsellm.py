"""SparseLLM as a transform: SparseGPT for attention, global MLP pruning through auxiliary variables.

Bai et al., "SparseLLM: Towards Global Pruning of Pre-trained Language Models", NeurIPS 2024
(arXiv 2402.17946); code BaiTheBest/SparseLLM (`model_utils.llama_sparsellm`). The math lives in
`nnxprune.algorithms.sparsellm` (its docstring lists where we follow the code rather than the
paper); this module wires it to the model.

Per decoder layer, inside the sequential driver (`nnxprune.calibration.sequential`), whose
collectors gather from one forward of the unpruned layer (its inputs being the outputs of the
already pruned layers before it) the `X^T X` of every projection's input and the MLP's dense
input `X` itself (the input of gate_proj, the `Activations` collector; the reference takes the
same tensors from forward hooks of the same unpruned forward):

1. the MLP's dense output `Y = mlp(X)` is computed over all calibration tokens, before anything
   in the layer is pruned, by the layer's own MLP module;
2. q, k, v and o are pruned by SparseGPT with the driver's Hessians, exactly as `SparseGPT` does;
3. gate, up and down are pruned jointly by `sparsellm_mlp` against `X` and `Y`.

`fraction` prunes only the first `round(fraction * num_layers)` layers (half rounded up), the
setting of the paper's tables at 0.5; the other layers stay dense. `iterations` rounds per layer
(4, the reference's `llama_sparsellm`; 8 its earlier setting), `layer_iterations` overrides it per
layer as `[layer, rounds]` pairs, a negative layer counting from the end: the reference runs one
round in layers 1, 30 and 31 of its 32-layer LLaMA, the second and the last two, which
`layer_iterations = [[1, 1], [-2, 1], [-1, 1]]` reproduces on any depth (the recipes). `keep_best`
(our departure, off by default) keeps per layer the round with the lowest true MLP error. `targets` / `ignore` select
projections as for SparseGPT, except that a layer's gate, up and down go together (all or none).

Memory: `z, s, p` are `tokens x intermediate` float32 each for the layer being solved (module
docstring of the algorithm: ~6-7 such arrays at the peak), plus `X, Y` (`tokens x hidden`) and the
driver's hidden states (two `tokens x hidden`). The report gives, per layer, the relaxed objective before
and after every round, the pruned MLP's reconstruction error `||Y - MLP(X)||^2` (absolute and
relative to `||Y||^2`), seconds and the peak resident memory while the layer was solved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.algorithms.sparsegpt import hessian, sparsegpt_prune
from nnxprune.algorithms.sparsellm import sparsellm_mlp
from nnxprune.calibration.collectors import Activations, InputXtX
from nnxprune.calibration.sequential import run_sequential
from nnxprune.errors import UserError
from nnxprune.graph import mask_weights
from nnxprune.measure import PeakMemory
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.sparsegpt import check_solver, shared_factor
from nnxprune.transforms.sparsify import (Sparsify, by_layer, calibration_tokens, measured, node,
                                          record)

MLP_NAMES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CHUNK = 8192  # rows of X per call of the MLP forward that gives Y


@functools.partial(jax.jit, static_argnums=(0,))
def _mlp(graphdef, state, X):
    return nnx.merge(graphdef, state)(X)


def mlp_output(mlp, X: jax.Array) -> jax.Array:
    """`Y = mlp(X)` for `X [rows, hidden]`, in chunks of `CHUNK` rows, float32."""
    graphdef, state = nnx.split(mlp)
    return jnp.concatenate([_mlp(graphdef, state, X[s:s + CHUNK]).astype(jnp.float32)
                            for s in range(0, X.shape[0], CHUNK)])


def first_layers(num_layers: int, fraction: float) -> int:
    """How many leading layers `fraction` selects: `round(fraction * num_layers)`, half up, >= 1."""
    return max(1, min(num_layers, math.floor(fraction * num_layers + 0.5)))


@register("sparsellm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseLLM(Sparsify):
    """SparseGPT on attention, SparseLLM (auxiliary variables, alternating updates) on each MLP.

    Defaults are the reference code's for Llama: alpha = beta = gamma = 5, 4 rounds, 2 steps of
    size 0.01 for s, SparseGPT blocks of 128 with 1% damping; all layers (`fraction = 1`).
    `layer_iterations`: `[layer, rounds]` pairs overriding `iterations` (negative layers count
    from the end).
    """

    needs_calibration: ClassVar[bool] = True

    alpha: float = 5.0
    beta: float = 5.0
    gamma: float = 5.0
    iterations: int = 4
    layer_iterations: tuple[tuple[int, int], ...] = ()
    s_steps: int = 2
    s_lr: float = 0.01
    refit_damp: float = 0.01
    keep_best: bool = False
    fraction: float = 1.0
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    kind: ClassVar[str]

    def selected(self, config: LlamaConfig) -> list[tuple[int, str]]:
        limit = first_layers(config.num_layers, self.fraction) if config.num_layers else 0
        return [(i, name) for i, name in super().selected(config) if i < limit]

    def rounds(self, layer: int, num_layers: int) -> int:
        """SparseLLM rounds in decoder layer `layer` (`layer_iterations`, else `iterations`)."""
        for where, rounds in self.layer_iterations:
            if where % num_layers == layer:
                return rounds
        return self.iterations

    def _check_layer_iterations(self, num_layers: int) -> None:
        seen = set()
        for pair in self.layer_iterations:
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
                raise UserError(f"layer_iterations: expected [layer, rounds] integer pairs, got {pair!r}")
            where, rounds = pair
            if num_layers and not -num_layers <= where < num_layers:
                raise UserError(f"layer_iterations: layer {where} is outside the model's "
                                f"{num_layers} layers")
            if rounds < 1:
                raise UserError(f"layer_iterations: rounds must be >= 1, got {rounds} for layer {where}")
            if num_layers and where % num_layers in seen:
                raise UserError(f"layer_iterations: layer {where} is given twice")
            seen.add(where % num_layers if num_layers else where)

    def check(self, config: LlamaConfig) -> LlamaConfig:
        for name in ("alpha", "beta", "gamma", "s_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.refit_damp) and self.refit_damp >= 0):
            raise UserError(f"refit_damp must be a finite number >= 0, got {self.refit_damp}")
        if self.iterations < 1:
            raise UserError(f"iterations must be >= 1, got {self.iterations}")
        self._check_layer_iterations(config.num_layers)
        if self.s_steps < 0:
            raise UserError(f"s_steps must be >= 0, got {self.s_steps}")
        if not 0 < self.fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layer_sparsity is not None:
            raise UserError("SparseLLM prunes every chosen layer at one 'sparsity'")
        check_solver(self.blocksize, self.percdamp, self.nm())
        config = super().check(config)
        per_layer: dict[int, set[str]] = {}
        for i, name in self.selected(config):
            per_layer.setdefault(i, set()).add(name)
        for i, names in per_layer.items():
            mlp = names & set(MLP_NAMES)
            if mlp and mlp != set(MLP_NAMES):
                raise UserError(f"SparseLLM prunes a layer's gate, up and down projections together; "
                                f"layer {i} selects only {', '.join(sorted(mlp))} (check targets / "
                                "ignore)")
        return config

    # -- the per-layer protocol of `Sparsify`, shared with the streamed run (`nnxprune.streamed`)
    streamable: ClassVar[bool] = True

    def _prune_kw(self) -> dict:
        nm = self.nm()
        return dict(sparsity=None if nm else self.sparsity, n=nm[0] if nm else 0,
                    m=nm[1] if nm else 0, blocksize=self.blocksize, percdamp=self.percdamp)

    def layer_collectors(self, names):
        """X^T X of every chosen attention projection, of the MLP's input (up) and of down's
        input; the MLP's dense input X itself (gate's input, the same tensor as up's)."""
        mlp_layers = [i for i in sorted(names) if set(names[i]) & set(MLP_NAMES)]
        xtx = {i: [n for n in names[i] if n not in MLP_NAMES]
               + (["mlp.up_proj", "mlp.down_proj"] if i in mlp_layers else []) for i in sorted(names)}
        return [InputXtX.for_layers(xtx),
                Activations.for_layers({i: ["mlp.gate_proj"] for i in mlp_layers})]

    def start_log(self, config: LlamaConfig) -> dict:
        """What `prune_layer` fills (JSON-able, so a streamed run can resume from it)."""
        names, n = by_layer(self.selected(config)), config.num_layers
        return {"per_matrix": {}, "retries": {}, "errors": {}, "layers": {},
                "mlp_layers": [i for i in sorted(names) if set(names[i]) & set(MLP_NAMES)],
                "num_pruned_layers": first_layers(n, self.fraction),
                "rounds": [self.rounds(i, n) for i in range(n)],
                "solve": {"mlp_io": 0.0, "attention": 0.0, "mlp_solve": 0.0}}

    def prune_layer(self, i, layer, calib, names, log):
        X = Y = None
        timings = log["solve"]
        if set(names) & set(MLP_NAMES):  # dense MLP input/output, before anything is pruned
            t0 = time.perf_counter()
            X = calib.stats[Activations.name]["mlp.gate_proj"]
            Y = mlp_output(layer.mlp, X)
            jax.block_until_ready(Y)
            if not bool(jnp.all(jnp.isfinite(X)) & jnp.all(jnp.isfinite(Y))):
                raise UserError(f"SparseLLM: layers.{i}: the MLP's calibration inputs/outputs "
                                "contain NaN/Inf; stopping")
            timings["mlp_io"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self._attention(i, layer, calib, [n for n in names if n not in MLP_NAMES],
                        self._prune_kw(), log)
        timings["attention"] += time.perf_counter() - t0
        if X is not None:
            t0 = time.perf_counter()
            self._mlp(i, layer, calib, X, Y, self._prune_kw(), log, log["rounds"][i])
            timings["mlp_solve"] += time.perf_counter() - t0

    def finish_log(self, ctx: Context, log: dict, *, timings: dict, tokens, total: float,
                   **extra) -> None:
        """Records the run from `log` and the driver's `timings`. `timings` keeps the driver's
        meaning (every key but "visit" is a forward pass, as the runner reads it): the MLP forward
        inside `visit` is moved out of it."""
        solve = log["solve"]
        timings = {"mlp_io": solve["mlp_io"], **timings}
        timings["visit"] -= solve["mlp_io"]
        record(ctx, self.kind, log["per_matrix"], pattern=self.pattern or "unstructured",
               timings=timings, seconds={"attention": solve["attention"], "mlp": solve["mlp_solve"],
                                         "total": total},
               calibration_tokens=int(np.asarray(tokens).size), damping_retries=log["retries"],
               reconstruction_error=log["errors"],
               layers={int(k): v for k, v in log["layers"].items()}, mlp_layers=log["mlp_layers"],
               num_pruned_layers=log["num_pruned_layers"],
               hyperparameters={k: getattr(self, k) for k in (
                   "alpha", "beta", "gamma", "iterations", "layer_iterations", "s_steps", "s_lr",
                   "refit_damp", "keep_best", "fraction", "blocksize", "percdamp")}, **extra)

    def __call__(self, model, ctx: Context):
        tokens = np.asarray(calibration_tokens(ctx))
        names = by_layer(self.selected(model.config))
        log = self.start_log(model.config)

        def visit(i, layer, calib):
            self.prune_layer(i, layer, calib, names[i], log)

        t_start = time.perf_counter()
        driver = run_sequential(model, tokens, visit, self.layer_collectors(names),
                                batch_size=self.batch_size, progress=ctx.progress, desc="sparsellm")
        self.finish_log(ctx, log, timings=driver, tokens=tokens,
                        total=time.perf_counter() - t_start)
        return model

    @staticmethod
    def _set_kernel(lin, kernel, keep, full: str, result) -> None:
        if not np.isfinite(np.asarray(kernel)).all():
            raise UserError(f"SparseLLM produced non-finite weights in {full}; stopping")
        lin.kernel.set_value(jnp.asarray(kernel).astype(lin.kernel.dtype))
        mask_weights(lin, keep)
        result["per_matrix"][full] = measured(lin)

    def _attention(self, i, layer, calib, names, prune_kw, result) -> None:
        """SparseGPT on the chosen attention projections of layer `i`."""
        factors = {}
        for name in names:
            full = f"layers.{i}.{name}"
            lin = node(layer, name)
            H = hessian(calib.stats[InputXtX.name][name], calib.sequences)
            try:
                kernel, keep, info = sparsegpt_prune(
                    lin.effective_kernel(), H, factor=shared_factor(factors, name, H, self.percdamp),
                    **prune_kw)
            except ValueError as e:
                raise UserError(f"SparseLLM: {full}: {e}") from None
            self._set_kernel(lin, kernel, keep, full, result)
            result["errors"][full] = float(info["error"])
            if info.get("retries"):
                result["retries"][full] = {"retries": int(info["retries"]),
                                           "damping": float(info["damping"])}

    def _mlp(self, i, layer, calib, X, Y, prune_kw, result, iterations: int) -> None:
        """gate, up and down of layer `i` pruned jointly against the dense `X`, `Y`."""
        t0 = time.perf_counter()
        lins = {name: node(layer, name) for name in MLP_NAMES}
        xtx = calib.stats[InputXtX.name]
        rounds = []
        try:
            with PeakMemory() as memory:
                gate, up, down, keeps, info = sparsellm_mlp(
                    X, Y, lins["mlp.gate_proj"].effective_kernel(),
                    lins["mlp.up_proj"].effective_kernel(), lins["mlp.down_proj"].effective_kernel(),
                    xtx["mlp.up_proj"], calib.sequences, alpha=self.alpha, beta=self.beta,
                    gamma=self.gamma, iterations=iterations,
                    s_steps=self.s_steps,
                    s_lr=self.s_lr, refit_damp=self.refit_damp, keep_best=self.keep_best,
                    h_down=hessian(xtx["mlp.down_proj"], calib.sequences), where=f"layers.{i}.mlp",
                    log=rounds.append, **prune_kw)
        except ValueError as e:
            raise UserError(f"SparseLLM: layers.{i}.mlp: {e}") from None
        for name, kernel, key in (("mlp.gate_proj", gate, "gate"), ("mlp.up_proj", up, "up"),
                                  ("mlp.down_proj", down, "down")):
            self._set_kernel(lins[name], kernel, keeps[key], f"layers.{i}.{name}", result)
        for r in rounds:
            for k, v in r.get("retries", {}).items():
                result["retries"].setdefault(f"layers.{i}.mlp.{k}_proj", {"retries": 0})["retries"] += v
        result["layers"][i] = {
            "rounds": [{k: r[k] for k in ("round", "before", "after", "reconstruction",
                                          "relative", "seconds")} for r in rounds],
            "kept_round": info["best_round"], "y_norm": info["y_norm"],
            "seconds": time.perf_counter() - t0, "peak_memory_bytes": memory.peak,
            "aux_bytes": 3 * X.shape[0] * gate.shape[1] * 4 + 2 * X.size * 4}
