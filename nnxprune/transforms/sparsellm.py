"""SparseLLM as a transform: SparseGPT for attention, global MLP pruning through auxiliary variables.

Bai et al., "SparseLLM: Towards Global Pruning of Pre-trained Language Models", NeurIPS 2024
(arXiv 2402.17946); code BaiTheBest/SparseLLM (`model_utils.llama_sparsellm`). The math lives in
`nnxprune.algorithms.sparsellm` (its docstring lists where we follow the code rather than the
paper); this module wires it to the model.

Per decoder layer, inside the sequential driver (`nnxprune.calibration.sequential`), which gives
the statistics of every projection's input from one forward of the unpruned layer (its inputs
being the outputs of the already pruned layers before it):

1. before anything is pruned, the MLP's dense input `X` (`post_attention_layernorm(x + attn(x))`)
   and dense output `Y = mlp(X)` are computed over all calibration tokens by a small jitted
   forward (the reference takes the same tensors from forward hooks of the same unpruned forward);
2. q, k, v and o are pruned by SparseGPT with the driver's Hessians, exactly as `SparseGPT` does;
3. gate, up and down are pruned jointly by `sparsellm_mlp` against `X` and `Y`.

The driver hands `visit` the layer and its statistics but not its input activations, so this
transform keeps its own copy of the hidden states: it embeds the calibration tokens once and runs
each layer (pruned by then) forward up to the layer it visits. That costs one extra layer forward
per layer, plus the X/Y forward, against the driver's two.

`fraction` prunes only the first `round(fraction * num_layers)` layers (half rounded up), the
setting of the paper's tables at 0.5; the other layers stay dense. `targets` / `ignore` select
projections as for SparseGPT, except that a layer's gate, up and down go together (all or none).

Memory: `z, s, p` are `tokens x intermediate` float32 each for the layer being solved (module
docstring of the algorithm: ~6-7 such arrays at the peak), plus `X, Y` (`tokens x hidden`) and the
hidden states (two `tokens x hidden`). The report gives, per layer, the relaxed objective before
and after every round, the pruned MLP's reconstruction error `||Y - MLP(X)||^2` (absolute and
relative to `||Y||^2`), seconds and the peak resident memory while the layer was solved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.graph import mask_weights
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.sparsity import (_calibration_tokens, _measured, _node, _record,
                                         _Sparsify, shared_factor)

MLP_NAMES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_forward(graphdef, state, x, inv_freq):
    layer = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return layer(x, positions, inv_freq)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _mlp_io(graphdef, state, x, inv_freq):
    """The layer's MLP input `X` and output `Y`, `[batch * seq, hidden]` float32 each."""
    layer = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    h, _ = layer.self_attn(layer.input_layernorm(x), positions, inv_freq)
    X = layer.post_attention_layernorm(x + h)
    Y = layer.mlp(X)
    d = x.shape[-1]
    return X.reshape(-1, d).astype(jnp.float32), Y.reshape(-1, d).astype(jnp.float32)


def _batch_size(n: int, wanted: int) -> int:
    return max(d for d in range(1, min(n, wanted) + 1) if n % d == 0)


def first_layers(num_layers: int, fraction: float) -> int:
    """How many leading layers `fraction` selects: `round(fraction * num_layers)`, half up, >= 1."""
    return max(1, min(num_layers, math.floor(fraction * num_layers + 0.5)))


@register("sparsellm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseLLM(_Sparsify):
    """SparseGPT on attention, SparseLLM (auxiliary variables, alternating updates) on each MLP.

    Defaults are the reference code's for Llama: alpha = beta = gamma = 5, 8 rounds, 2 steps of
    size 0.01 for s, SparseGPT blocks of 128 with 1% damping; all layers (`fraction = 1`).
    """

    needs_calibration: ClassVar[bool] = True

    alpha: float = 5.0
    beta: float = 5.0
    gamma: float = 5.0
    iterations: int = 8
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

    def check(self, config: LlamaConfig) -> LlamaConfig:
        for name in ("alpha", "beta", "gamma", "s_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.refit_damp) and self.refit_damp >= 0):
            raise UserError(f"refit_damp must be a finite number >= 0, got {self.refit_damp}")
        if self.iterations < 1:
            raise UserError(f"iterations must be >= 1, got {self.iterations}")
        if self.s_steps < 0:
            raise UserError(f"s_steps must be >= 0, got {self.s_steps}")
        if not 0 < self.fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.blocksize < 1:
            raise UserError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise UserError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        nm = self.nm()
        if nm is not None and self.blocksize % nm[1]:
            raise UserError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")
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

    def __call__(self, model, ctx: Context):
        from nnxprune.algorithms.sparsegpt import sparsegpt_prune
        from nnxprune.algorithms.sparsellm import sparsellm_mlp
        from nnxprune.calibration.sequential import embed_inputs, run_sequential
        from nnxprune.measure import PeakMemory

        tokens = np.asarray(_calibration_tokens(ctx))
        n_seq, seqlen = tokens.shape
        bs = _batch_size(n_seq, self.batch_size)
        nm = self.nm()
        prune_kw = dict(sparsity=None if nm else self.sparsity, n=nm[0] if nm else 0,
                        m=nm[1] if nm else 0, blocksize=self.blocksize, percdamp=self.percdamp)
        selected = self.selected(model.config)
        chosen = {(i, n) for i, n in selected}
        mlp_layers = sorted({i for i, n in selected if n in MLP_NAMES})
        # the driver gets exactly the chosen projections (fraction included) as one regex
        only = "^(?:" + "|".join(re.escape(f"layers.{i}.{n}") for i, n in selected) + ")$"
        per_matrix, retries, errors, layers_report = {}, {}, {}, {}
        inv_freq = model.inv_freq
        hidden = {"x": None, "at": 0}  # our copy of the calibration hidden states: input of layer `at`
        timings = {"hidden_forward": 0.0, "mlp_io": 0.0, "attention": 0.0, "mlp_solve": 0.0}

        def layer_input(i):
            t0 = time.perf_counter()
            if hidden["x"] is None:
                hidden["x"] = embed_inputs(model, tokens, bs)
            while hidden["at"] < i:
                graphdef, state = nnx.split(model.layers[hidden["at"]])
                x = hidden["x"]
                hidden["x"] = jnp.concatenate([_layer_forward(graphdef, state, x[s:s + bs], inv_freq)
                                               for s in range(0, n_seq, bs)])
                hidden["at"] += 1
            jax.block_until_ready(hidden["x"])
            timings["hidden_forward"] += time.perf_counter() - t0
            return hidden["x"]

        def set_kernel(lin, kernel, keep, full):
            if not np.isfinite(np.asarray(kernel)).all():
                raise UserError(f"SparseLLM produced non-finite weights in {full}; stopping")
            lin.kernel.set_value(jnp.asarray(kernel).astype(lin.kernel.dtype))
            mask_weights(lin, keep)
            per_matrix[full] = _measured(lin)

        def visit(i, layer, stats):
            X = Y = None
            if i in mlp_layers:  # dense MLP input/output, before anything in the layer is pruned
                t0 = time.perf_counter()
                x = layer_input(i)
                graphdef, state = nnx.split(layer)
                io = [_mlp_io(graphdef, state, x[s:s + bs], inv_freq) for s in range(0, n_seq, bs)]
                X = jnp.concatenate([a for a, _ in io])
                Y = jnp.concatenate([b for _, b in io])
                del io
                jax.block_until_ready((X, Y))
                if not bool(jnp.all(jnp.isfinite(X)) & jnp.all(jnp.isfinite(Y))):
                    raise UserError(f"SparseLLM: layers.{i}: the MLP's calibration inputs/outputs "
                                    "contain NaN/Inf; stopping")
                timings["mlp_io"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            factors = {}
            for name, s in stats.items():
                if (i, name) not in chosen or name in MLP_NAMES:
                    continue
                full = f"layers.{i}.{name}"
                lin = _node(layer, name)
                try:
                    kernel, keep, info = sparsegpt_prune(
                        lin.effective_kernel(), s.hessian(),
                        factor=shared_factor(factors, name, s, self.percdamp), **prune_kw)
                except ValueError as e:
                    raise UserError(f"SparseLLM: {full}: {e}") from None
                set_kernel(lin, kernel, keep, full)
                errors[full] = float(info["error"])
                if info.get("retries"):
                    retries[full] = {"retries": int(info["retries"]), "damping": float(info["damping"])}
            timings["attention"] += time.perf_counter() - t0
            if X is None:
                return
            t0 = time.perf_counter()
            lins = {name: _node(layer, name) for name in MLP_NAMES}
            rounds = []
            with PeakMemory() as memory:
                gate, up, down, keeps, info = sparsellm_mlp(
                    X, Y, lins["mlp.gate_proj"].effective_kernel(),
                    lins["mlp.up_proj"].effective_kernel(), lins["mlp.down_proj"].effective_kernel(),
                    stats["mlp.up_proj"].xtx, n_seq, alpha=self.alpha, beta=self.beta,
                    gamma=self.gamma, iterations=self.iterations, s_steps=self.s_steps,
                    s_lr=self.s_lr, refit_damp=self.refit_damp, keep_best=self.keep_best,
                    h_down=stats["mlp.down_proj"].hessian(), where=f"layers.{i}.mlp",
                    log=rounds.append, **prune_kw)
            for name, kernel, key in (("mlp.gate_proj", gate, "gate"), ("mlp.up_proj", up, "up"),
                                      ("mlp.down_proj", down, "down")):
                set_kernel(lins[name], kernel, keeps[key], f"layers.{i}.{name}")
            seconds = time.perf_counter() - t0
            timings["mlp_solve"] += seconds
            for r in rounds:
                for k, v in r.get("retries", {}).items():
                    retries.setdefault(f"layers.{i}.mlp.{k}_proj", {"retries": 0})["retries"] += v
            layers_report[i] = {
                "rounds": [{k: r[k] for k in ("round", "before", "after", "reconstruction",
                                              "relative", "seconds")} for r in rounds],
                "kept_round": info["best_round"], "y_norm": info["y_norm"], "seconds": seconds,
                "peak_memory_bytes": memory.peak,
                "aux_bytes": 3 * X.shape[0] * gate.shape[1] * 4 + 2 * X.size * 4}
            del X, Y

        t_start = time.perf_counter()
        driver = run_sequential(model, tokens, visit, targets=only, want_xtx=True,
                                batch_size=self.batch_size, progress=ctx.progress, desc="sparsellm")
        # `timings` keeps the driver's meaning (every key but "visit" is a forward pass, as the
        # runner reads it): our own forwards inside `visit` are moved out of it.
        solve = {"attention": timings.pop("attention"), "mlp": timings.pop("mlp_solve"),
                 "total": time.perf_counter() - t_start}
        timings.update(driver)
        timings["visit"] -= timings["hidden_forward"] + timings["mlp_io"]
        _record(ctx, self.kind, per_matrix, pattern=self.pattern or "unstructured", timings=timings,
                seconds=solve,
                calibration_tokens=int(tokens.size), damping_retries=retries,
                reconstruction_error=errors, layers=layers_report,
                mlp_layers=mlp_layers, num_pruned_layers=first_layers(model.config.num_layers, self.fraction),
                hyperparameters={k: getattr(self, k) for k in (
                    "alpha", "beta", "gamma", "iterations", "s_steps", "s_lr", "refit_damp",
                    "keep_best", "fraction", "blocksize", "percdamp")})
        return model
