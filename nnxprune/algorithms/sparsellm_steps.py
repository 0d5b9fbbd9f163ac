"""SparseLLM's sub-problems, each solved exactly or safely: the math `sparsellm.sparsellm_mlp` runs.

Paper: Bai et al., "SparseLLM: Towards Global Pruning of Pre-trained Language Models", NeurIPS
2024, arXiv:2402.17946 (reference code BaiTheBest/SparseLLM, `model_utils.llama_sparsellm`). The
objective, the layout (kernels `[in, out]`, activations `[tokens, features]`) and where we follow
the code or differ from it are in the docstring of `nnxprune.algorithms.sparsellm`. Here: the
dense layer's auxiliary variables (`init_aux`), the closed forms of p and z (`update_p`,
`update_z`), the guarded s steps (`update_s`), the ridge refit (`refit`, `ridge_solver`, which
shares SparseGPT's factorization), the Gram product in blocks (`gram`), and the objective's terms
and the true reconstruction error (`objective_terms`, `reconstruction_error`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnxprune.algorithms.sparsegpt import HessianFactor

__all__ = ["init_aux", "update_p", "update_z", "update_s", "refit", "objective_terms",
           "reconstruction_error", "damped_cholesky", "gram", "ridge_solver"]

_HI = lax.Precision.HIGHEST
_f32 = jnp.float32


def _dot(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _tdot(a, b):
    """`a^T @ b` over the token axis (0)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HI)


@jax.jit
def init_aux(X, gate, up):
    """The dense layer's own `(z, s, p)`: up output, gate output, down input (float32)."""
    X = X.astype(_f32)
    s = _dot(X, gate.astype(_f32))
    z = _dot(X, up.astype(_f32))
    return z, s, jax.nn.silu(s) * z


def _p_matrix(Wd, beta, gamma):
    """`M = K^-1 Wd^T [d, f]` with `K = (gamma / beta) I + Wd^T Wd`: the closed form of p is
    `p = a + (Y - a Wd) M` (Woodbury; the module docstring of `sparsellm`)."""
    K = (gamma / beta) * jnp.eye(Wd.shape[1], dtype=_f32) + _tdot(Wd, Wd)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(K), True), Wd.T)


@jax.jit
def update_p(Y, down, z, s, beta, gamma):
    """argmin_p `beta ||Y - p Wd||^2 + gamma ||p - silu(s) z||^2`, exactly (module docstring)."""
    Y, Wd = Y.astype(_f32), down.astype(_f32)
    a = jax.nn.silu(s) * z
    return a + _dot(Y - _dot(a, Wd), _p_matrix(Wd, beta, gamma))


def _z_closed_form(m, s, p, alpha, gamma):
    sw = jax.nn.silu(s)
    return (alpha * m + gamma * sw * p) / (alpha + gamma * sw * sw)


@jax.jit
def update_z(X, up, s, p, alpha, gamma):
    """argmin_z `alpha ||z - X Wu||^2 + gamma ||p - silu(s) z||^2` (elementwise closed form)."""
    return _z_closed_form(_dot(X.astype(_f32), up.astype(_f32)), s, p, alpha, gamma)


def _s_objective(s, sig, n, z, p, alpha, gamma):
    """Elementwise `alpha (s - n)^2 + gamma (p - silu(s) z)^2`, with `sig = sigmoid(s)`."""
    r = p - s * sig * z
    return alpha * (s - n) ** 2 + gamma * r * r


def _s_steps(n, z, p, s, alpha, gamma, lr, steps):
    """Each step's sigmoid and objective are carried into the next (one sigmoid per step)."""

    def step(_, carry):
        s, sig, obj = carry
        dsilu = sig * (1 + s * (1 - sig))
        grad = 2 * alpha * (s - n) - 2 * gamma * (p - s * sig * z) * z * dsilu
        new = s - lr * grad
        new_sig = jax.nn.sigmoid(new)
        new_obj = _s_objective(new, new_sig, n, z, p, alpha, gamma)
        better = new_obj <= obj
        return (jnp.where(better, new, s), jnp.where(better, new_sig, sig),
                jnp.where(better, new_obj, obj))

    sig = jax.nn.sigmoid(s)
    carry = (s, sig, _s_objective(s, sig, n, z, p, alpha, gamma))
    for _ in range(steps):  # unrolled (steps is static and small): XLA fuses the steps into one pass
        carry = step(None, carry)
    return carry[0]


@functools.partial(jax.jit, static_argnames=("steps",))
def update_s(X, gate, z, p, s, alpha, gamma, lr, *, steps):
    """`steps` gradient steps of size `lr` on `alpha ||s - X Wg||^2 + gamma ||p - silu(s) z||^2`;
    a step is kept only for the elements whose own objective it does not raise."""
    return _s_steps(_dot(X.astype(_f32), gate.astype(_f32)), z, p, s, alpha, gamma, lr, steps)


def _terms(mg, mu, pd, Y, z, s, p, alpha, beta, gamma):
    """The objective's terms from `mg = X Wg`, `mu = X Wu`, `pd = p Wd`."""
    terms = {"up": alpha * jnp.sum((z - mu) ** 2), "gate": alpha * jnp.sum((s - mg) ** 2),
             "act": gamma * jnp.sum((p - jax.nn.silu(s) * z) ** 2)}
    if pd is None:  # the caller has the down term another way
        return terms
    terms["down"] = beta * jnp.sum((Y - pd) ** 2)
    terms["total"] = terms["up"] + terms["gate"] + terms["act"] + terms["down"]
    return terms


def gram(a, blocks: int = 2):
    """`a^T a` over the token axis, computing only the blocks on and above the diagonal of a
    `blocks x blocks` split of the features and mirroring the rest: `(blocks + 1) / (2 blocks)` of
    the full product's FLOPs (3/4 at 2 blocks)."""
    f = a.shape[1]
    if blocks <= 1 or f < 2 * blocks:
        return _tdot(a, a)
    edges = [f * i // blocks for i in range(blocks + 1)]
    parts = [a[:, lo:hi] for lo, hi in zip(edges, edges[1:])]
    rows = []
    for i in range(blocks):
        rows.append([None] * blocks)
        for j in range(i, blocks):
            rows[i][j] = _tdot(parts[i], parts[j])
    for i in range(blocks):
        for j in range(i):
            rows[i][j] = rows[j][i].T
    return jnp.block(rows)


GRAM_BLOCKS = 2  # p^T p in 2 x 2 blocks (3/4 of the FLOPs); see `gram`


@jax.jit
def damped_cholesky(gram, damp):
    """Lower Cholesky factor of `gram + damp * mean(diag(gram)) I` (a tiny absolute floor keeps an
    all-zero gram factorizable)."""
    gram = gram.astype(_f32)
    lam = jnp.maximum(damp * jnp.mean(jnp.diag(gram)), 1e-8)
    return jnp.linalg.cholesky(gram + lam * jnp.eye(gram.shape[0], dtype=_f32))


@jax.jit
def refit(X, x_chol, Y, z, s, p, damp):
    """Ridge least squares to the auxiliary variables: `Wg = (X^T X + l)^-1 X^T s`, `Wu` likewise
    from `z` (`x_chol` = `damped_cholesky(X^T X, damp)`), `Wd = (p^T p + l)^-1 p^T Y`.
    Returns `(gate, up, down, p^T p)`."""
    X = X.astype(_f32)
    up = jax.scipy.linalg.cho_solve((x_chol, True), _tdot(X, z))
    gate = jax.scipy.linalg.cho_solve((x_chol, True), _tdot(X, s))
    ptp = _tdot(p, p)
    down = jax.scipy.linalg.cho_solve((damped_cholesky(ptp, damp), True), _tdot(p, Y.astype(_f32)))
    return gate, up, down, ptp


@jax.jit
def _factor_solve(upper, rhs, scale):
    """`scale * U^T U rhs`: the solve through SparseGPT's factor (`U^T U = (H + damp I)^-1`)."""
    return scale * _dot(upper.T, _dot(upper, rhs.astype(_f32)))


@jax.jit
def _cholesky_solve(lower, rhs):
    return jax.scipy.linalg.cho_solve((lower, True), rhs.astype(_f32))


def ridge_solver(gram_, factor: HessianFactor | None, nsamples: int, refit_damp: float):
    """`rhs -> (gram + refit_damp * mean(diag gram) I)^-1 rhs`, the ridge solve of `refit`.

    SparseGPT prunes with `H = 2 / nsamples * gram` damped by `percdamp * mean(diag H)`, i.e. the
    same matrix times `2 / nsamples` when `percdamp == refit_damp` (both default to 0.01). Then
    the solve goes through SparseGPT's factor of it (`factor`, which the pruning step needs
    anyway): `(gram + l I)^-1 = 2 / nsamples * U^T U`, two matmuls and no factorization of its
    own. Otherwise (other damping, dead inputs, a factorization that needed retries, no factor)
    it factorizes the damped gram itself (`damped_cholesky`)."""
    if (factor is not None and factor.retries == 0
            and np.float32(factor.percdamp) == np.float32(refit_damp)
            and not bool(jnp.any(factor.dead))):
        scale = np.float32(2.0 / nsamples)
        return lambda rhs: _factor_solve(factor.upper, rhs, scale)
    lower = damped_cholesky(gram_, np.float32(refit_damp))
    return lambda rhs: _cholesky_solve(lower, rhs)


@jax.jit
def reconstruction_error(X, Y, gate, up, down):
    """`||Y - (silu(X Wg) * (X Wu)) Wd||^2` (sum over tokens and features)."""
    X = X.astype(_f32)
    out = _dot(jax.nn.silu(_dot(X, gate.astype(_f32))) * _dot(X, up.astype(_f32)),
               down.astype(_f32))
    return jnp.sum((Y.astype(_f32) - out) ** 2)


@jax.jit
def objective_terms(X, Y, gate, up, down, z, s, p, alpha, beta, gamma):
    """The four terms of the relaxed objective `L` (module docstring) and their sum."""
    X = X.astype(_f32)
    return _terms(_dot(X, gate.astype(_f32)), _dot(X, up.astype(_f32)),
                  _dot(p, down.astype(_f32)), Y.astype(_f32), z, s, p, alpha, beta, gamma)
