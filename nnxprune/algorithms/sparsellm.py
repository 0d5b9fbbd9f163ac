"""SparseLLM: global pruning of a Llama MLP through auxiliary variables, over SparseGPT.

Paper: Guangji Bai, Yijiang Li, Chen Ling, Kibaek Kim, Liang Zhao, "SparseLLM: Towards Global
Pruning of Pre-trained Language Models", NeurIPS 2024, arXiv:2402.17946.
Reference code: https://github.com/BaiTheBest/SparseLLM, file `model_utils.py`, function
`llama_sparsellm` (with `SparseGPT_LlaMA` in `pruning_utils.py`). This module is an independent
JAX implementation of the per-layer procedure of that function; nothing is copied.

Layout: kernels are `[in, out]`, activations are token-major `[tokens, features]` (the reference
stores `W [out, in]` and activations `[features, tokens]`; every formula below is the transpose of
the reference's).

The problem, for one decoder layer's SwiGLU MLP `Y = (silu(X Wg) * (X Wu)) Wd` with dense input
`X [T, d]` and dense output `Y [T, d]` (both from the unpruned layer), is to find sparse
`Wg, Wu [d, f]`, `Wd [f, d]` through auxiliary variables `s = X Wg` (gate output), `z = X Wu` (up
output) and `p = silu(s) * z` (down input), relaxed into

    L = alpha ||z - X Wu||^2 + alpha ||s - X Wg||^2 + gamma ||p - silu(s) * z||^2
        + beta ||Y - p Wd||^2                                        (`objective_terms`)

Initialisation: `z, s, p` are the dense layer's own values (`init_aux`), as in the reference.
Then `iterations` rounds (`sparsellm_mlp`) of:

1. refit (from the second round on; the first prunes the dense weights, i.e. it is SparseGPT):
   `Wu = argmin ||X Wu - z||^2`, `Wg = argmin ||X Wg - s||^2`, `Wd = argmin ||p Wd - Y||^2`
   (`refit`);
2. sparsify all three with SparseGPT (`nnxprune.algorithms.sparsegpt`), fresh masks every round:
   gate and up with the Hessian of `X` (fixed), down with the Hessian of the current `p`
   (`2 / nsamples * p^T p`, as the reference recomputes it);
3. `p`: closed form of `beta ||Y - p Wd||^2 + gamma ||p - silu(s) z||^2` with the pruned `Wd`
   (`update_p`);
4. `z`: closed form of `alpha ||z - X Wu||^2 + gamma ||p - silu(s) z||^2`, elementwise
   (`update_z`);
5. `s`: `s_steps` gradient steps of size `s_lr` on `alpha ||s - X Wg||^2 + gamma ||p - silu(s)
   z||^2` (`update_s`).

The weights the layer keeps are those of the last round's step 2. The reference also runs steps
3-5 of the last round, whose results nothing reads; we skip them (the last round's report has no
objective `after`).

Cost. A round is FLOP-bound in products over the T calibration tokens; per round they are, in
units of `P = 2 T d f`: the refit's `X^T z`, `X^T s`, `p^T Y` (1 each) and `p^T p` (`f / d` in
full, 3/4 of that computed: `gram`), then `X Wg`, `X Wu`, the pruned MLP's output (1 each), and
the p update's `a Wd` and `(Y - a Wd) K^-1 Wd^T` (1 each). Steps 3-5 and the next round's refit
statistics are one jitted program (`_round`), so the `[T, f]` variables are read while they are
hot, and the objective before the updates takes its down term from those statistics instead of a
product over T. Nothing is factorized twice: the refit's ridge solves go through SparseGPT's
Cholesky factor of the same damped Gram matrix when the dampings agree (`ridge_solver`; both
0.01 by default), so one factorization of `p^T p` per round serves the refit of down and its
pruning, and one of `X^T X` per layer serves gate and up.

Defaults are the reference's for Llama: `alpha = beta = gamma = 5.0`, 4 rounds (`opt_epochs` of
`llama_sparsellm` since the commit "initial fix for llama model", cd10130; 8 before it; the
reference runs 1 round in layers 1, 30 and 31 of its 32-layer target, which the transform's
`layer_iterations` can reproduce), 2 steps of `s` with learning rate 0.01 (`s_update_epochs`,
`s_learning_rate`), SparseGPT with `blocksize = 128` and `percdamp = 0.01`.

Where we follow the code rather than the paper, or differ from both, on purpose:
- The paper writes the weight step as a pruning-constrained least squares; the code (and we)
  solve the unconstrained least squares and then re-prune with SparseGPT, choosing fresh masks.
- The paper's z update is for general alpha, gamma; the code's `z = (m + swish * p) / (swish^2 + 1)`
  assumes `alpha == gamma`. We use the general closed form
  `z = (alpha m + gamma silu(s) p) / (alpha + gamma silu(s)^2)`, identical at the defaults.
- The code refits with `torch.pinverse` (an SVD, effectively unregularised). We solve the normal
  equations with a ridge `refit_damp * mean(diag(A^T A))` (default 0.01, SparseGPT's relative
  damping) by Cholesky: stable when `X` or `p` is rank deficient (dead channels, few tokens).
- The code inverts the `[f, f]` matrix `beta Wd Wd^T + gamma I` for p. We use the equivalent
  (Woodbury) `p = a + (Y - a Wd) K^-1 Wd^T` with `a = silu(s) z` and the `[d, d]` matrix
  `K = (gamma / beta) I + Wd^T Wd` (eigenvalues >= gamma / beta): fewer flops, no `[f, f]` inverse.
- The code's s step is a plain gradient step (chunked over tokens, which changes nothing since the
  objective is a sum over elements). We keep that step but, per element (the objective is
  separable), reject it where it would raise the element's objective, so the s step can never
  diverge: with `gamma z^2 silu'(s)^2 s_lr` large a plain step overshoots.
- The code keeps `z, s, p` in float16 and its SparseGPT calls grow the up/gate Hessian's damping
  every round (it damps `self.H` in place); we keep the auxiliary variables in float32 and damp
  the same fixed Hessian each round.
- `keep_best=True` is our departure from the paper and the code (off by default: both keep the
  last round): it keeps the round whose pruned weights reconstruct `Y` best (the true MLP error
  `||Y - MLP_pruned(X)||^2` on the calibration batch); round 1 is exactly SparseGPT, so per
  layer the result is never worse than SparseGPT on the calibration data.

Memory: `z, s, p` are `[T, f]` float32 each (T = calibration tokens), plus `X, Y [T, d]`; the
jitted updates hold a few more `[T, f]` temporaries, about 6-7 `T x f` floats at the peak (e.g.
128 x 2048 tokens and f = 1536: 1.6 GB per array, ~11 GB; 32 x 1024: ~1.4 GB).

Example:
    >>> gate, up, down, keeps, info = sparsellm_mlp(X, Y, gate, up, down, xtx, nsamples=32,
    ...                                             sparsity=0.7)
    >>> info["history"][-1]["reconstruction"]       # ||Y - MLP_pruned(X)||^2 on the calibration data
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnxprune.algorithms.sparsegpt import hessian, hessian_factor, sparsegpt_prune
from nnxprune.algorithms.sparsellm_steps import (GRAM_BLOCKS, _dot, _f32, _p_matrix, _s_steps,
                                                  _tdot, _terms, _z_closed_form, damped_cholesky,
                                                  gram, init_aux, objective_terms,
                                                  reconstruction_error, refit, ridge_solver,
                                                  update_p, update_s, update_z)

__all__ = ["init_aux", "update_p", "update_z", "update_s", "refit", "objective_terms",
           "reconstruction_error", "damped_cholesky", "gram", "ridge_solver", "sparsellm_mlp"]


ROW_CHUNK = 1024  # tokens per step of `_round`'s scan


def _row_chunk(tokens: int) -> int:
    """The largest divisor of `tokens` not above `ROW_CHUNK` (all tokens when that is small)."""
    c = max(k for k in range(1, min(tokens, ROW_CHUNK) + 1) if tokens % k == 0)
    return c if c >= 64 else tokens


@functools.partial(jax.jit, static_argnames=("s_steps", "update", "direct_before"))
def _round(X, Y, gate, up, down, z, s, p, ptp, pty, y_norm, alpha, beta, gamma, s_lr, *, s_steps,
           update=True, direct_before=False):
    """One round's work after the weights are pruned, in one program: the pruned MLP's
    reconstruction error, the objective before the auxiliary updates, and (`update`) the updates
    of p, z and s (`update_p`, `update_z`, `update_s`), the objective's terms after them and the
    next round's refit statistics `X^T z, X^T s, p^T p, p^T Y` of the updated variables; without
    `update` the terms and statistics are None and z, s, p come back unchanged.

    Everything is per token except the sums, so it runs as a scan over chunks of `_row_chunk`
    tokens: the chunk's `X Wg`, `X Wu`, updates, error terms and statistics are computed while
    its `[chunk, f]` arrays are in cache (the elementwise work of the updates, streamed over
    whole `[T, f]` arrays, took about as long as the matmuls), and the sums are accumulated.

    The objective's down term `beta ||Y - p Wd||^2` before the updates is read from the Gram
    statistics of the current `p` (`ptp = p^T p`, `pty = p^T Y`, `y_norm = ||Y||^2`, from the
    previous round) as `beta (y_norm - 2 <p^T Y, Wd> + <p^T p Wd, Wd>)`, an `[f, f] x [f, d]`
    product instead of a `[T, f] x [f, d]` one; `direct_before` (the first round, which has no
    statistics of its `p`) computes `p Wd` instead."""
    X, Y, Wd = X.astype(_f32), Y.astype(_f32), down.astype(_f32)
    Wg, Wu = gate.astype(_f32), up.astype(_f32)
    tokens = X.shape[0]
    f = Wg.shape[1]
    c = _row_chunk(tokens)
    if update:  # p's closed form: p = a + (Y - a Wd) M, p Wd = a Wd + (Y - a Wd) M Wd
        M = _p_matrix(Wd, beta, gamma)
        MW = _dot(M, Wd)

    def chunk(rows):  # the chunk's sums and (with `update`) its new z, s, p
        x, y, zc, sc, pc = rows
        mg, mu = _dot(x, Wg), _dot(x, Wu)
        sums = {"recon": jnp.sum((y - _dot(jax.nn.silu(mg) * mu, Wd)) ** 2)}
        sig = jax.nn.sigmoid(sc)
        a = sc * sig * zc  # silu(s) z
        sums.update(up=alpha * jnp.sum((zc - mu) ** 2), gate=alpha * jnp.sum((sc - mg) ** 2),
                    act=gamma * jnp.sum((pc - a) ** 2))
        if direct_before:
            sums["down"] = beta * jnp.sum((y - _dot(pc, Wd)) ** 2)
        if not update:
            return sums, None
        aw = _dot(a, Wd)
        r = y - aw
        pn = a + _dot(r, M)
        zn = _z_closed_form(mu, sc, pn, alpha, gamma)
        sn = _s_steps(mg, zn, pn, sc, alpha, gamma, s_lr, s_steps)
        after = _terms(mg, mu, aw + _dot(r, MW), y, zn, sn, pn, alpha, beta, gamma)
        sums.update({f"after_{k}": v for k, v in after.items()})
        sums.update(xtz=_tdot(x, zn), xts=_tdot(x, sn), ptp=gram(pn, GRAM_BLOCKS), pty=_tdot(pn, y))
        return sums, (zn, sn, pn)

    def step(acc, rows):
        sums, outs = chunk(rows)
        return jax.tree.map(jnp.add, acc, sums), outs

    rows = tuple(v.reshape(tokens // c, c, v.shape[1]) for v in (X, Y, z, s, p))
    shapes = jax.eval_shape(chunk, tuple(v[0] for v in rows))[0]
    sums, outs = lax.scan(step, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), rows)
    if direct_before:
        before = sums["up"] + sums["gate"] + sums["act"] + sums["down"]
    else:
        down_term = beta * (y_norm - 2 * jnp.sum(pty * Wd) + jnp.sum(_dot(ptp, Wd) * Wd))
        before = sums["up"] + sums["gate"] + sums["act"] + down_term
    if not update:
        return z, s, p, sums["recon"], before, None, None
    z, s, p = (v.reshape(tokens, f) for v in outs)
    terms = {k: sums[f"after_{k}"] for k in ("up", "gate", "act", "down", "total")}
    return z, s, p, sums["recon"], before, terms, (sums["xtz"], sums["xts"], sums["ptp"], sums["pty"])


def _finite(*arrays) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in arrays)


def _check_number(name, value, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"SparseLLM: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                        f"got {value!r}")


def _checked_inputs(X, Y, gate, up, down, xtx, where: str, *, iterations, s_steps, **numbers):
    """`sparsellm_mlp`'s arrays as float32, after every setting and shape is checked."""
    for name, v in numbers.items():
        _check_number(name, v, positive=name != "refit_damp")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"SparseLLM: iterations must be an integer >= 1, got {iterations!r}")
    if isinstance(s_steps, bool) or not isinstance(s_steps, int) or s_steps < 0:
        raise ValueError(f"SparseLLM: s_steps must be an integer >= 0, got {s_steps!r}")
    X, Y = jnp.asarray(X, _f32), jnp.asarray(Y, _f32)
    gate, up, down = (jnp.asarray(w, _f32) for w in (gate, up, down))
    xtx = jnp.asarray(xtx, _f32)
    d, f = gate.shape
    if X.ndim != 2 or Y.shape != X.shape or X.shape[1] != d or up.shape != (d, f) \
            or down.shape != (f, d) or xtx.shape != (d, d):
        raise ValueError(f"SparseLLM: {where}: shapes do not fit a SwiGLU MLP: X {X.shape}, "
                         f"Y {Y.shape}, gate {gate.shape}, up {up.shape}, down {down.shape}, "
                         f"xtx {xtx.shape}")
    if not _finite(X, Y, gate, up, down, xtx):
        raise ValueError(f"SparseLLM: {where}: non-finite values (NaN/Inf) in the layer's weights or "
                         "in its calibration inputs/outputs; stopping")
    return X, Y, gate, up, down, xtx


def sparsellm_mlp(X, Y, gate, up, down, xtx, nsamples: int, *, sparsity: float | None = None,
                  n: int = 0, m: int = 0, alpha: float = 5.0, beta: float = 5.0, gamma: float = 5.0,
                  iterations: int = 4, s_steps: int = 2, s_lr: float = 0.01, blocksize: int = 128,
                  percdamp: float = 0.01, refit_damp: float = 0.01, keep_best: bool = False,
                  h_down=None, where: str = "mlp", log=None):
    """Prunes one SwiGLU MLP with SparseLLM (module docstring).

    `X, Y [T, d]`: the layer's dense MLP input and output over all calibration tokens; `gate, up
    [d, f]`, `down [f, d]`: the dense kernels; `xtx = X^T X` (SparseGPT's Hessian of gate and up
    is `2 / nsamples * xtx`); `h_down`: the down projection's first-round Hessian (default
    `2 / nsamples * p^T p` of the dense `p`, which is what the calibration driver collects).
    Sparsity: `sparsity` (unstructured) or `n`, `m` (N:M), as `sparsegpt_prune`.

    Returns `(gate, up, down, keeps, info)`: float32 kernels zero where the boolean `keeps`
    (`{"gate", "up", "down"}`) are False, and `info` with `history` (per round: the pruned MLP's
    `reconstruction` error `||Y - MLP(X)||^2`, `relative` (divided by `||Y||^2`), the objective
    `L` `before` and `after` the auxiliary updates (`after` is None in the last round, which skips
    them), SparseGPT `retries`, `seconds`), `best_round` and `y_norm`. Non-finite values
    anywhere raise a ValueError naming `where`.
    `log(round_info)`, when given, is called after every round.
    """
    X, Y, gate, up, down, xtx = _checked_inputs(X, Y, gate, up, down, xtx, where, alpha=alpha,
                                                beta=beta, gamma=gamma, s_lr=s_lr,
                                                refit_damp=refit_damp, iterations=iterations,
                                                s_steps=s_steps)
    alpha, beta, gamma, s_lr, refit_damp = map(np.float32, (alpha, beta, gamma, s_lr, refit_damp))

    def prune(kernel, H, name, rnd, factor=None):
        try:
            return sparsegpt_prune(kernel, H, sparsity=sparsity, n=n, m=m, blocksize=blocksize,
                                   percdamp=percdamp, factor=factor)
        except ValueError as e:
            raise ValueError(f"SparseLLM: {where}.{name}, round {rnd}: {e}") from None

    z, s, p = init_aux(X, gate, up)
    h_x = hessian(xtx, nsamples)
    f_x = hessian_factor(h_x, percdamp=percdamp)  # gate and up, every round: X does not change
    h_p = hessian(_tdot(p, p), nsamples) if h_down is None else jnp.asarray(h_down, _f32)
    x_solve = ridge_solver(xtx, f_x, nsamples, refit_damp) if iterations > 1 else None
    y_norm = jnp.sum(Y * Y)
    y_norm_f = float(y_norm)
    history, best, stats = [], None, None
    for rnd in range(iterations):
        t0 = time.perf_counter()
        f_p = None
        if rnd > 0:  # refit to the auxiliary variables, from the statistics the last round left
            xtz, xts, ptp, pty = stats
            h_p = hessian(ptp, nsamples)
            f_p = hessian_factor(h_p, percdamp=percdamp)  # shared with down's SparseGPT below
            gate, up = x_solve(xts), x_solve(xtz)
            down = ridge_solver(ptp, f_p, nsamples, refit_damp)(pty)
        gate, keep_g, info_g = prune(gate, h_x, "gate_proj", rnd, f_x)
        up, keep_u, info_u = prune(up, h_x, "up_proj", rnd, f_x)
        down, keep_d, info_d = prune(down, h_p, "down_proj", rnd, f_p)
        last = rnd == iterations - 1  # its p, z, s updates would serve nothing: skipped
        gram_p = (stats[2], stats[3]) if stats is not None else (None, None)  # of the current p
        z, s, p, recon, before, terms, stats = _round(
            X, Y, gate, up, down, z, s, p, *gram_p, y_norm, alpha, beta, gamma, s_lr,
            s_steps=s_steps, update=not last, direct_before=rnd == 0)
        recon, before = float(recon), float(before)
        terms = None if terms is None else {k: float(v) for k, v in terms.items()}
        if not (math.isfinite(recon) and math.isfinite(before)
                and all(math.isfinite(v) for v in (terms or {}).values())):
            raise ValueError(f"SparseLLM: {where}, round {rnd}: the objective became non-finite "
                            f"(reconstruction {recon}, objective {before}); stopping. Try "
                            "smaller s_lr or larger refit_damp")
        entry = {"round": rnd, "reconstruction": recon,
                 "relative": recon / y_norm_f if y_norm_f > 0 else 0.0,
                 "before": before, "after": None if terms is None else terms["total"],
                 "terms": terms,
                 "retries": {k: i["retries"] for k, i in (("gate", info_g), ("up", info_u),
                                                           ("down", info_d)) if i["retries"]},
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        if log is not None:
            log(entry)
        if best is None or not keep_best or recon < best[0]:
            best = (recon, rnd, gate, up, down, {"gate": keep_g, "up": keep_u, "down": keep_d})
    _, best_round, gate, up, down, keeps = best
    return gate, up, down, keeps, {"history": history, "best_round": best_round, "y_norm": y_norm_f}
