"""Hard-concrete gates (Louizos, Welling and Kingma, arXiv 1712.01312) as Sheared LLaMA uses them.

Sheared LLaMA (Xia, Gao, Zeng and Chen, arXiv 2310.06694; code princeton-nlp/LLM-Shearing,
`llmshearing/models/l0_module.py`) learns one gate `z` per prunable unit from its `log_alpha`.
Pure `jax.numpy`, no model: the wiring lives in `nnxprune.recovery.l0`.

- Stretch `(l, r) = (-0.1, 1.1)`, temperature `beta = 2/3`, exactly the reference's
  `limit_a, limit_b` and `temperature`.
- Sample: `u ~ U(eps, 1 - eps)`, `z = clip(sigmoid((log u - log(1-u) + log_alpha) / beta)
  * (r - l) + l, 0, 1)` (`quantile_concrete` + `hardtanh`).
- `P(z > 0) = 1 - sigmoid(beta * log(-l / r) - log_alpha)`, clipped to `[eps, 1 - eps]` as the
  reference's `cdf_qz` (this is exact: `z <= 0` iff `u <= sigmoid(beta log(-l/r) - log_alpha)`).
- `log_alpha` starts at `N(5, 0.01)`: the reference computes `log(1 - 0.5) - log(0.5) = 0` from
  its `droprate_init` and then overwrites it with `mean = 5`; we follow the code, and clamp to
  `[ln 0.01, ln 100]` as its `constrain_parameters` does before every forward (so every gate
  starts at `log_alpha = ln 100`, `P(z > 0) ~ 1`).
- Deterministic gate: `sigmoid(0.8 * log_alpha / beta)` (the "magical number" 0.8), with the
  `size - keep` smallest set to exactly 0 (`_deterministic_z` with a target model). The kept
  units keep their soft value (about 0.9975 at `ln 100`), which the fold bakes into the weights.
- Lagrangian term of one mask type: `mean(lambda1 (s - t) + lambda2 (s - t)^2)` over the rows of
  its expected sparsity `s`, with the target `t` warmed up linearly from 0
  (`get_target_sparsity`, start sparsity 0).

Example:
    >>> la = init_log_alpha(jax.random.key(0), (30, 9))
    >>> z = sample(jax.random.key(1), la)              # [30, 9] in [0, 1], many exact 0s and 1s
    >>> keep = prob_nonzero(la).sum(-1)                # expected kept heads per layer
    >>> zd = deterministic(la, keep=6)                 # 6 nonzero gates per row
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LEFT, RIGHT, BETA = -0.1, 1.1, 2.0 / 3.0
EPS = 1e-6
MAGIC = 0.8  # the reference's "magical_number" in the deterministic gate
INIT_MEAN, INIT_STD = 5.0, 1e-2
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)


def init_log_alpha(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`N(5, 0.01)` as the reference's `param_init_fn` (then clamped by `constrain`)."""
    return INIT_MEAN + INIT_STD * jax.random.normal(key, shape, jnp.float32)


def constrain(log_alpha: jax.Array) -> jax.Array:
    """Clamp to `[ln 0.01, ln 100]` (the reference's `constrain_parameters`)."""
    return jnp.clip(log_alpha, LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def quantile(u: jax.Array, log_alpha: jax.Array) -> jax.Array:
    """The stretched, clipped concrete gate at uniform noise `u` (the inverse CDF)."""
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


def sample(key: jax.Array, log_alpha: jax.Array) -> jax.Array:
    """One training sample of every gate (differentiable in `log_alpha`)."""
    u = jax.random.uniform(key, log_alpha.shape, jnp.float32, EPS, 1.0 - EPS)
    return quantile(u, log_alpha)


def prob_zero(log_alpha: jax.Array) -> jax.Array:
    """`P(z = 0) = sigmoid(beta log(-l/r) - log_alpha)`, in `[eps, 1 - eps]` (`cdf_qz(0)`)."""
    return jnp.clip(jax.nn.sigmoid(BETA * math.log(-LEFT / RIGHT) - log_alpha), EPS, 1.0 - EPS)


def prob_nonzero(log_alpha: jax.Array) -> jax.Array:
    """`P(z > 0)`: the expected "score" of a unit (kept in expectation)."""
    return 1.0 - prob_zero(log_alpha)


def prob_one(log_alpha: jax.Array) -> jax.Array:
    """`P(z = 1) = 1 - sigmoid(beta log((1-l)/(r-1)) - log_alpha)` (for tests and reports)."""
    return 1.0 - jax.nn.sigmoid(BETA * math.log((1.0 - LEFT) / (RIGHT - 1.0)) - log_alpha)


def expected_sparsity(log_alpha: jax.Array) -> jax.Array:
    """`1 - sum P(z > 0) / size` over the last axis (one value per row)."""
    return 1.0 - prob_nonzero(log_alpha).sum(-1) / log_alpha.shape[-1]


def soft_score(log_alpha: jax.Array) -> jax.Array:
    """`sigmoid(0.8 log_alpha / beta)`: the ranking and the value of a kept deterministic gate."""
    return jax.nn.sigmoid(log_alpha / BETA * MAGIC)


def deterministic(log_alpha: jax.Array, keep: int) -> jax.Array:
    """Per row (last axis), the `keep` largest soft scores keep their value, the rest are 0.
    Ties go to the lower index (a stable sort), so the choice is reproducible."""
    score = soft_score(log_alpha)
    size = log_alpha.shape[-1]
    if not 0 <= keep <= size:
        raise ValueError(f"cannot keep {keep} of {size} gates")
    order = jnp.argsort(-score, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(ranks < keep, score, 0.0)


def target_at(step, target: float, warmup_steps: int):
    """The Lagrangian target sparsity at `step`: linear from 0 to `target` over `warmup_steps`."""
    if warmup_steps <= 0:
        return jnp.asarray(target, jnp.float32)
    return target * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def lagrangian(expected: jax.Array, target, lambda1: jax.Array, lambda2: jax.Array) -> jax.Array:
    """`mean(lambda1 (s - t) + lambda2 (s - t)^2)` over the rows of `expected` (`_lag_loss`)."""
    gap = expected - target
    return jnp.mean(lambda1 * gap + lambda2 * gap * gap)
