"""SparseLLM's per-layer math on small random problems: every closed-form update minimises its
sub-objective, the s step never raises its own, masks are exact, the relaxed objective falls
round after round, one round is SparseGPT, and non-finite input stops the run."""

import jax.numpy as jnp
import numpy as np
import pytest

from nnxprune.algorithms import sparsellm as S
from nnxprune.algorithms.sparsegpt import sparsegpt_prune

T, D, F = 384, 16, 32
A, B, G = 5.0, 5.0, 5.0


def problem(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((T, D)).astype(np.float32)
    gate, up = (0.3 * rng.standard_normal((D, F)).astype(np.float32) for _ in range(2))
    down = (0.3 * rng.standard_normal((F, D))).astype(np.float32)
    z, s, p = S.init_aux(X, gate, up)
    Y = np.asarray(p) @ down
    # auxiliary variables away from their optimum, weights sparsified: a mid-run state
    z = z + 0.2 * rng.standard_normal(z.shape).astype(np.float32)
    s = s + 0.2 * rng.standard_normal(s.shape).astype(np.float32)
    p = p + 0.2 * rng.standard_normal(p.shape).astype(np.float32)
    prune = lambda w: np.where(rng.random(w.shape) < 0.5, 0, w).astype(np.float32)  # noqa: E731
    return X, Y, prune(gate), prune(up), prune(down), z, s, p


def p_objective(Y, down, z, s, p):
    a = np.asarray(jnp.asarray(s) * (1 / (1 + np.exp(-np.asarray(s))))) * np.asarray(z)
    return B * np.sum((Y - np.asarray(p) @ down) ** 2) + G * np.sum((np.asarray(p) - a) ** 2)


def z_objective(X, up, s, p, z):
    sw = np.asarray(s) / (1 + np.exp(-np.asarray(s)))
    return A * np.sum((np.asarray(z) - X @ up) ** 2) + G * np.sum((np.asarray(p) - sw * np.asarray(z)) ** 2)


def s_elementwise(X, gate, z, p, s):
    s = np.asarray(s, np.float64)
    sw = s / (1 + np.exp(-s))
    return A * (s - X @ gate) ** 2 + G * (np.asarray(p) - sw * np.asarray(z)) ** 2


def test_p_update_is_the_exact_minimiser():
    X, Y, gate, up, down, z, s, p = problem()
    new = np.asarray(S.update_p(Y, down, z, s, B, G))
    # the direct [f, f] normal equations (the reference's form) give the same p
    a = np.asarray(z) * np.asarray(s) / (1 + np.exp(-np.asarray(s)))
    direct = (B * Y @ down.T + G * a) @ np.linalg.inv(B * down @ down.T + G * np.eye(F))
    np.testing.assert_allclose(new, direct, rtol=1e-3, atol=1e-4)
    before, after = p_objective(Y, down, z, s, p), p_objective(Y, down, z, s, new)
    assert after < before
    rng = np.random.default_rng(1)
    for _ in range(5):  # any perturbation is worse
        assert p_objective(Y, down, z, s, new + 1e-2 * rng.standard_normal(new.shape)) > after


def test_z_update_is_the_exact_minimiser():
    X, Y, gate, up, down, z, s, p = problem()
    new = np.asarray(S.update_z(X, up, s, p, A, G))
    after = z_objective(X, up, s, p, new)
    assert after < z_objective(X, up, s, p, z)
    rng = np.random.default_rng(2)
    for _ in range(5):
        assert z_objective(X, up, s, p, new + 1e-2 * rng.standard_normal(new.shape)) > after


@pytest.mark.parametrize("lr", [0.01, 10.0])
def test_s_steps_never_raise_any_element(lr):
    X, Y, gate, up, down, z, s, p = problem()
    new = S.update_s(X, gate, z, p, s, A, G, lr, steps=2)
    before, after = s_elementwise(X, gate, z, p, s), s_elementwise(X, gate, z, p, new)
    assert np.all(after <= before * (1 + 1e-5) + 1e-6)
    assert np.isfinite(np.asarray(new)).all()
    if lr == 0.01:  # the reference's step size makes real progress
        assert after.sum() < 0.9 * before.sum()


def test_refit_is_least_squares():
    X, Y, gate, up, down, z, s, p = problem()
    chol = S.damped_cholesky(X.T @ X, 0.0)
    g, u, d, ptp = S.refit(X, chol, Y, z, s, p, 0.0)
    np.testing.assert_allclose(np.asarray(u), np.linalg.lstsq(X, np.asarray(z), rcond=None)[0],
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g), np.linalg.lstsq(X, np.asarray(s), rcond=None)[0],
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d), np.linalg.lstsq(np.asarray(p), Y, rcond=None)[0],
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ptp), np.asarray(p).T @ np.asarray(p), rtol=1e-4, atol=1e-3)
    # the up/gate/down terms of the objective can only fall when the weights are refitted
    before = S.objective_terms(X, Y, gate, up, down, z, s, p, A, B, G)
    after = S.objective_terms(X, Y, g, u, d, z, s, p, A, B, G)
    for k in ("up", "gate", "down"):
        assert float(after[k]) <= float(before[k])


def test_refit_is_stable_on_rank_deficient_inputs():
    X, Y, gate, up, down, z, s, p = problem()
    X = X.copy()
    X[:, 3] = 0.0  # a dead input channel
    X[:, 5] = X[:, 4]  # and two identical ones
    g, u, d, _ = S.refit(X, S.damped_cholesky(X.T @ X, 0.01), Y, z, s, p, 0.01)
    assert all(np.isfinite(np.asarray(w)).all() for w in (g, u, d))


def run(sparsity=0.5, **kw):
    """SparseLLM on a dense random MLP; returns (its X, Y and dense weights), the result."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((T, D)).astype(np.float32)
    gate, up = (0.3 * rng.standard_normal((D, F)).astype(np.float32) for _ in range(2))
    down = (0.3 * rng.standard_normal((F, D))).astype(np.float32)
    Y = np.asarray(S.init_aux(X, gate, up)[2]) @ down
    kw.setdefault("blocksize", 16)
    out = S.sparsellm_mlp(X, Y, gate, up, down, X.T @ X, nsamples=4, sparsity=sparsity, **kw)
    return (X, Y, gate, up, down), out


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_unstructured_masks_are_exact(sparsity):
    _, (g, u, d, keeps, info) = run(sparsity)
    for name, w in (("gate", g), ("up", u), ("down", d)):
        keep = np.asarray(keeps[name])
        blocks = [keep[i:i + 16] for i in range(0, keep.shape[0], 16)]  # SparseGPT's count per block
        assert all((~b).sum() == int(b.size * sparsity) for b in blocks)
        assert (np.asarray(w)[~keep] == 0).all()


@pytest.mark.parametrize("pattern", [(2, 4), (3, 4)])
def test_nm_masks_are_exact(pattern):
    n, m = pattern
    _, (g, u, d, keeps, info) = run(None, n=n, m=m)
    for name in ("gate", "up", "down"):
        keep = np.asarray(keeps[name])
        zeros = (~keep).reshape(keep.shape[0] // m, m, keep.shape[1]).sum(axis=1)
        assert (zeros == n).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_objective_and_reconstruction_fall_across_rounds(sparsity):
    _, (*_, info) = run(sparsity, iterations=6)
    h = info["history"]
    after = [r["after"] for r in h[:-1]]
    assert all(b < a for a, b in zip(after, after[1:]))  # the relaxed objective, round after round
    assert all(r["after"] < r["before"] for r in h[:-1])  # the auxiliary updates lower it
    assert h[-1]["after"] is None and h[-1]["terms"] is None  # the last round skips them
    assert h[-1]["reconstruction"] < h[0]["reconstruction"]  # better than round 1 (= SparseGPT)


def test_default_is_the_reference_four_rounds():
    _, (*_, info) = run(0.5)
    assert len(info["history"]) == 4 and info["best_round"] == 3


def test_one_round_is_sparsegpt_and_keep_best_never_loses_to_it():
    (X, Y, gate, up, down), (g, u, d, keeps, info) = run(0.7, iterations=1)
    H = X.T @ X * (2 / 4)
    ref = sparsegpt_prune(gate, H, sparsity=0.7, blocksize=16)[0]
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)
    first = info["history"][0]["reconstruction"]
    np.testing.assert_allclose(float(S.reconstruction_error(X, Y, g, u, d)), first, rtol=1e-5)
    _, (g, u, d, keeps, info) = run(0.9, iterations=6, keep_best=True)
    best = min(r["reconstruction"] for r in info["history"])
    assert info["history"][info["best_round"]]["reconstruction"] == best
    np.testing.assert_allclose(float(S.reconstruction_error(X, Y, g, u, d)), best, rtol=1e-4)
    assert best <= info["history"][0]["reconstruction"]


def test_non_finite_inputs_stop_with_the_layer_named():
    X, Y, gate, up, down, *_ = problem()
    X = X.copy()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"layers\.7\.mlp.*non-finite"):
        S.sparsellm_mlp(X, Y, gate, up, down, np.nan_to_num(X).T @ np.nan_to_num(X), 4,
                        sparsity=0.5, blocksize=16, where="layers.7.mlp")
    X = np.nan_to_num(X)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp.*non-finite"):  # overflow mid-run
        S.sparsellm_mlp(X, Y * 1e30, gate, up, down, X.T @ X, 4, sparsity=0.5, blocksize=16,
                        beta=1e10, where="layers.2.mlp")
    with pytest.raises(ValueError, match="iterations"):
        S.sparsellm_mlp(X, Y, gate, up, down, X.T @ X, 4, sparsity=0.5, iterations=0)
    with pytest.raises(ValueError, match="gamma"):
        S.sparsellm_mlp(X, Y, gate, up, down, X.T @ X, 4, sparsity=0.5, gamma=float("nan"))


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_gram_computes_the_full_symmetric_product(blocks):
    a = np.random.default_rng(3).standard_normal((T, 37)).astype(np.float32)  # 37: uneven blocks
    g = np.asarray(S.gram(jnp.asarray(a), blocks))
    np.testing.assert_allclose(g, a.T @ a, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(g, g.T, rtol=1e-6, atol=1e-4)


def test_ridge_solves_through_sparsegpt_factor_equal_their_own_cholesky():
    from nnxprune.algorithms.sparsegpt import hessian, hessian_factor

    X, Y, gate, up, down, z, s, p = problem()
    p = np.asarray(p)
    for gram_, rhs in ((X.T @ X, X.T @ np.asarray(z)), (p.T @ p, p.T @ Y)):
        own = np.linalg.solve(gram_ + 0.01 * np.mean(np.diag(gram_)) * np.eye(len(gram_)), rhs)
        factor = hessian_factor(hessian(gram_, 4), percdamp=0.01)
        shared = np.asarray(S.ridge_solver(gram_, factor, 4, 0.01)(rhs))
        np.testing.assert_allclose(shared, own, rtol=2e-3, atol=2e-4)
        other = np.asarray(S.ridge_solver(gram_, factor, 4, 0.1)(rhs))  # other damping: own factor
        ridge = np.linalg.solve(gram_ + 0.1 * np.mean(np.diag(gram_)) * np.eye(len(gram_)), rhs)
        np.testing.assert_allclose(other, ridge, rtol=2e-3, atol=2e-4)
    # the refit as `sparsellm_mlp` runs it equals `refit`
    g, u, d, ptp = S.refit(X, S.damped_cholesky(X.T @ X, 0.01), Y, z, s, p, 0.01)
    fx = hessian_factor(hessian(X.T @ X, 4))
    fp = hessian_factor(hessian(ptp, 4))
    np.testing.assert_allclose(np.asarray(S.ridge_solver(X.T @ X, fx, 4, 0.01)(X.T @ np.asarray(s))),
                               np.asarray(g), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(np.asarray(S.ridge_solver(ptp, fp, 4, 0.01)(p.T @ Y)), np.asarray(d),
                               rtol=2e-3, atol=2e-4)


def test_objective_from_statistics_equals_the_direct_one():
    X, Y, gate, up, down, z, s, p = problem()
    p = np.asarray(p)
    args = (X, Y, gate, up, down, z, s, p, p.T @ p, p.T @ Y, np.sum(Y * Y), A, B, G, 0.01)
    direct = S._round(*args, s_steps=2, direct_before=True)
    stats = S._round(*args, s_steps=2)
    np.testing.assert_allclose(float(stats[4]), float(direct[4]), rtol=1e-4)
    terms = S.objective_terms(X, Y, gate, up, down, z, s, p, A, B, G)
    np.testing.assert_allclose(float(direct[4]), float(terms["total"]), rtol=1e-5)
    # the statistics it hands the next round are those of the updated variables
    z2, s2, p2 = (np.asarray(v) for v in direct[:3])
    for got, want in zip(direct[6], (X.T @ z2, X.T @ s2, p2.T @ p2, p2.T @ Y)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-2)
