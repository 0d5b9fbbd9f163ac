"""SparseGPT (nnxprune.algorithms.sparsegpt) against a float64 NumPy port of the reference code.

`reference_prune` below follows `SparseGPT.fasterprune` of github.com/IST-DASLab/sparsegpt line by
line, in its `[out, in]` layout and with explicit loops; its one intended difference from that
code is that it prunes exactly `int(numel * sparsity)` weights per block (the reference's
`tmp <= sort(tmp)[k]` prunes k + 1), as the module does and documents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxprune.algorithms.masks import nm_keep, unstructured_keep
from nnxprune.algorithms.sparsegpt import _prune_n_of_m, _prune_smallest, hessian, sparsegpt_prune


# ------------------------------------------------------------------------------------------------
# helpers


def correlated_inputs(rng, tokens, dim, mix=0.5):
    """Inputs with correlated columns (H far from diagonal) and unequal column scales."""
    z = rng.standard_normal((tokens, dim))
    a = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    scales = np.exp(rng.uniform(-1, 1, dim))
    return ((z + mix * z @ a) * scales).astype(np.float32)


def hessian_of(x):
    """H of the inputs `x [tokens, in]` fed as 4 samples (the reference's count of rows)."""
    x = jnp.asarray(x, jnp.float32)
    return hessian(jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST), 4)


def recon_error(x, w, w_new):
    return float(np.sum((np.float64(x) @ (np.float64(w) - np.float64(w_new))) ** 2))


def reference_prune(kernel, H, *, sparsity=0.0, n=0, m=0, blocksize=128, percdamp=0.01):
    """Float64 port of `fasterprune`; takes and returns `[in, out]` like the module."""
    W = np.array(kernel, np.float64).T.copy()  # [out, in], the reference's layout
    H = np.array(H, np.float64).copy()
    rows, columns = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices(columns)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)  # = cholesky_inverse(cholesky(H))
    Hinv = np.linalg.cholesky(Hinv).T  # upper factor: Hinv = U^T U
    mask = np.zeros(W.shape, bool)  # True = pruned
    losses = 0.0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = np.diag(Hinv1)
        mask1 = np.zeros(W1.shape, bool)
        if n == 0:
            tmp = W1 ** 2 / d[None, :] ** 2
            k = int(tmp.size * sparsity)
            mask1.flat[np.argsort(tmp, axis=None, kind="stable")[:k]] = True
        for i in range(count):
            w = W1[:, i].copy()
            if n != 0 and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                lowest = np.argsort(tmp, axis=1, kind="stable")[:, :n]
                for r in range(rows):
                    mask1[r, i + lowest[r]] = True
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            losses += np.sum((w - q) ** 2 / Hinv1[i, i] ** 2) / 2
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.T, ~mask.T, losses


# ------------------------------------------------------------------------------------------------
# Hessian accumulation


def test_hessian_equals_the_reference_running_average():
    """`hessian` of the driver's X^T X (summed per sequence, as `InputXtX` does) ends where the
    reference's `add_batch` running average ends, over batches of different sizes."""
    from nnxprune.calibration.collectors import InputXtX

    rng = np.random.default_rng(0)
    dim = 24
    batches = [rng.standard_normal((3, 10, dim)), rng.standard_normal((2, 10, dim)),
               rng.standard_normal((1, 10, dim))]
    ref, ref_count = np.zeros((dim, dim), np.float32), 0
    xtx = jnp.zeros((dim, dim), jnp.float32)
    for x in batches:
        for row in x:  # the driver: one calibration sequence at a time
            taps = {"p": jnp.asarray(row, jnp.float32)}
            xtx = xtx + InputXtX(names=("p",)).row(("p",), taps, None, None)["p"]
        # add_batch, literally
        inp = x.reshape(-1, dim).astype(np.float32).T
        t = x.shape[0]
        ref *= ref_count / (ref_count + t)
        ref_count += t
        inp = np.float32(np.sqrt(2 / ref_count)) * inp
        ref += inp @ inp.T
    H = hessian(xtx, ref_count)
    assert ref_count == 6 and H.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(H), ref, rtol=1e-5, atol=1e-5)


def test_hessian_rejects_no_sequences():
    with pytest.raises(ValueError):
        hessian(jnp.zeros((8, 8)), 0)


# ------------------------------------------------------------------------------------------------
# mask selection helpers agree with masks.py (ties included)


def test_selection_helpers_agree_with_masks_module():
    rng = np.random.default_rng(1)
    prune_smallest = jax.jit(_prune_smallest)
    prune_n_of_m = jax.jit(_prune_n_of_m, static_argnums=1)
    for trial in range(6):
        scores = rng.random((64, 24)).astype(np.float32)
        if trial % 2:
            scores = np.round(scores * 4) / 4  # many ties
        scores[rng.random(scores.shape) < 0.1] = 0
        for sparsity in (0.0, 0.1, 0.5, 0.77, 0.99):
            got = prune_smallest(jnp.asarray(scores), int(scores.size * sparsity))
            want = ~np.asarray(unstructured_keep(scores, sparsity))
            np.testing.assert_array_equal(np.asarray(got), want)
        for n, m in ((2, 4), (4, 8), (3, 4)):
            got = np.concatenate([np.asarray(prune_n_of_m(jnp.asarray(scores[g:g + m]), n))
                                  for g in range(0, 64, m)])
            np.testing.assert_array_equal(got, ~np.asarray(nm_keep(scores, n, m)))


# ------------------------------------------------------------------------------------------------
# exact sparsity


@pytest.mark.parametrize("dim,blocksize", [(200, 64), (128, 128), (96, 256)])
def test_unstructured_prunes_exactly_int_numel_sparsity_per_block(dim, blocksize):
    rng = np.random.default_rng(2)
    out, sparsity = 48, 0.3
    x = correlated_inputs(rng, 512, dim)
    w = rng.standard_normal((dim, out)).astype(np.float32)
    kernel, keep, info = sparsegpt_prune(w, hessian_of(x), sparsity=sparsity, blocksize=blocksize)
    kernel, keep = np.asarray(kernel), np.asarray(keep)
    assert kernel.shape == keep.shape == (dim, out) and kernel.dtype == np.float32
    assert keep.dtype == bool and info["retries"] == 0
    for start in range(0, dim, blocksize):
        block = keep[start:start + blocksize]
        assert (~block).sum() == int(block.size * sparsity)
    assert np.all(kernel[~keep] == 0)
    assert np.all(kernel[keep] != 0)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 4)])
def test_nm_prunes_exactly_n_of_every_m_inputs(n, m):
    rng = np.random.default_rng(3)
    dim, out = 160, 40
    x = correlated_inputs(rng, 512, dim)
    w = rng.standard_normal((dim, out)).astype(np.float32)
    kernel, keep, info = sparsegpt_prune(w, hessian_of(x), sparsity=None, n=n, m=m, blocksize=32)
    kernel, keep = np.asarray(kernel), np.asarray(keep)
    pruned_per_group = (~keep).reshape(dim // m, m, out).sum(axis=1)
    assert np.all(pruned_per_group == n)
    assert np.all(kernel[~keep] == 0)
    assert np.all(kernel[keep] != 0)
    assert np.isfinite(info["error"]) and info["error"] > 0


# ------------------------------------------------------------------------------------------------
# agreement with the NumPy port of the reference


@pytest.mark.parametrize("kw", [
    dict(sparsity=0.5, blocksize=32),
    dict(sparsity=0.6, blocksize=48),  # 100 = 2 * 48 + 4: a partial last block
    dict(sparsity=None, n=2, m=4, blocksize=32),
    dict(sparsity=None, n=4, m=8, blocksize=64),
])
def test_matches_numpy_reference(kw):
    rng = np.random.default_rng(4)
    dim, out = (100 if kw["blocksize"] == 48 else 96), 40
    x = correlated_inputs(rng, 1024, dim, mix=0.3)
    w = rng.standard_normal((dim, out)).astype(np.float32)
    H = hessian_of(x)
    kernel, keep, info = sparsegpt_prune(w, H, **kw)
    ref_kw = dict(kw, sparsity=kw["sparsity"] or 0.0)
    ref_kernel, ref_keep, ref_losses = reference_prune(w, np.asarray(H), **ref_kw)
    np.testing.assert_array_equal(np.asarray(keep), ref_keep)
    scale = np.abs(ref_kernel).max()
    np.testing.assert_allclose(np.asarray(kernel), ref_kernel, rtol=1e-4, atol=1e-4 * scale)
    assert info["error"] == pytest.approx(ref_losses, rel=1e-4)
    assert info["retries"] == 0 and info["percdamp"] == pytest.approx(0.01)
    assert info["damping"] == pytest.approx(0.01 * np.mean(np.diag(np.asarray(H))), rel=1e-5)


def test_error_is_the_damped_quadratic_loss_of_the_change():
    """OBS steps are exact on a quadratic: sum(Losses) = tr(dW^T (H + damp I) dW) / 2."""
    rng = np.random.default_rng(5)
    dim, out = 64, 32
    x = correlated_inputs(rng, 1024, dim)
    w = rng.standard_normal((dim, out)).astype(np.float32)
    H = hessian_of(x)
    kernel, _, info = sparsegpt_prune(w, H, sparsity=0.5, blocksize=32)
    dw = np.float64(w) - np.float64(kernel)
    damped = np.float64(H) + info["damping"] * np.eye(dim)
    assert info["error"] == pytest.approx(np.einsum("io,ij,jo->", dw, damped, dw) / 2, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# quality: the updates matter


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=None, n=2, m=4)])
def test_reconstruction_beats_magnitude_and_mask_without_updates(kw):
    rng = np.random.default_rng(6)
    dim, out = 256, 96
    x = correlated_inputs(rng, 2048, dim, mix=2.0)
    w = rng.standard_normal((dim, out)).astype(np.float32)
    kernel, keep, _ = sparsegpt_prune(w, hessian_of(x), blocksize=64, **kw)
    keep = np.asarray(keep)
    if kw["sparsity"]:
        magnitude_keep = np.asarray(unstructured_keep(np.abs(w), kw["sparsity"]))
    else:
        magnitude_keep = np.asarray(nm_keep(np.abs(w), kw["n"], kw["m"]))
    assert magnitude_keep.sum() == keep.sum()
    ours = recon_error(x, w, kernel)
    magnitude = recon_error(x, w, w * magnitude_keep)
    mask_only = recon_error(x, w, w * keep)
    # measured: 0.31 (50%) and 0.37 (2:4) of magnitude; 0.64 and 0.63 of the mask alone (its
    # scores w^2 / d^2 already weigh inputs by scale, so the gap to it is the OBS updates' share)
    assert ours < 0.5 * magnitude
    assert ours < 0.8 * mask_only


# ------------------------------------------------------------------------------------------------
# numerics


def test_dead_inputs_are_zeroed_without_nans():
    rng = np.random.default_rng(7)
    dim, out = 64, 32
    x = correlated_inputs(rng, 512, dim)
    dead = [5, 17, 63]
    x[:, dead] = 0
    w = rng.standard_normal((dim, out)).astype(np.float32)
    H = hessian_of(x)
    assert np.all(np.diag(np.asarray(H))[dead] == 0)
    for kw in (dict(sparsity=0.5, blocksize=32), dict(sparsity=None, n=2, m=4, blocksize=32)):
        kernel, keep, info = sparsegpt_prune(w, H, **kw)
        kernel = np.asarray(kernel)
        assert np.all(np.isfinite(kernel)) and np.isfinite(info["error"])
        assert np.all(kernel[dead] == 0)
        assert info["retries"] == 0
        live = np.setdiff1d(np.arange(dim), dead)
        # the dead rows do not feed the output, so the live rows still beat plain masking
        assert recon_error(x, w, kernel) < recon_error(x, w, w * np.asarray(keep))
        assert np.all(kernel[live][np.asarray(keep)[live]] != 0)


def test_ill_conditioned_hessian_retries_with_more_damping():
    rng = np.random.default_rng(8)
    dim, out = 64, 32
    x = (rng.standard_normal((512, 8)) @ rng.standard_normal((8, dim))).astype(np.float32)  # rank 8
    w = rng.standard_normal((dim, out)).astype(np.float32)
    H = hessian_of(x)
    kernel, keep, info = sparsegpt_prune(w, H, sparsity=0.5, percdamp=1e-10, blocksize=32)
    assert info["retries"] > 0
    assert info["percdamp"] == pytest.approx(1e-10 * 10 ** info["retries"], rel=1e-3)
    mean_diag = np.mean(np.diag(np.asarray(H)))
    assert info["damping"] == pytest.approx(info["percdamp"] * mean_diag, rel=1e-4)
    kernel = np.asarray(kernel)
    assert np.all(np.isfinite(kernel)) and np.isfinite(info["error"])
    for start in range(0, dim, 32):
        assert (~np.asarray(keep)[start:start + 32]).sum() == int(32 * out * 0.5)
    with pytest.raises(ValueError, match="could not be factorized"):
        sparsegpt_prune(w, H, sparsity=0.5, percdamp=1e-10, max_retries=0)
    _, _, info = sparsegpt_prune(w, H, sparsity=0.5, percdamp=0.0, blocksize=32)  # 0 -> 1e-6 -> ...
    assert info["retries"] > 0 and info["percdamp"] > 0


def test_half_precision_kernel_is_computed_in_float32():
    rng = np.random.default_rng(9)
    x = correlated_inputs(rng, 256, 64)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    kernel, keep, _ = sparsegpt_prune(w, hessian_of(x), sparsity=None, n=2, m=4, blocksize=32)
    assert kernel.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(kernel)))
    assert (~np.asarray(keep)).sum() == 64 * 32 // 2


def test_rejects_bad_arguments():
    w, H = jnp.ones((16, 8)), jnp.eye(16)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=None)  # neither sparsity nor N:M
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=1.0)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=0.3, n=2, m=4)  # contradicts 2:4
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=None, n=4, m=4)
    with pytest.raises(ValueError):
        sparsegpt_prune(jnp.ones((18, 8)), jnp.eye(18), sparsity=None, n=2, m=4)  # 18 % 4
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=None, n=2, m=4, blocksize=6)  # 6 % 4
    with pytest.raises(ValueError):
        sparsegpt_prune(w, jnp.eye(8), sparsity=0.5)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, sparsity=0.5, percdamp=-1.0)
    # sparsity equal to N/M is accepted, as the reference passes both
    w, H = jnp.arange(1.0, 64 * 32 + 1).reshape(64, 32), jnp.eye(64)
    _, keep, _ = sparsegpt_prune(w, H, sparsity=0.5, n=2, m=4, blocksize=32)
    assert (~np.asarray(keep)).sum() == 64 * 32 // 2


def test_device_and_host_factorizations_agree():
    """The jitted factorization (used on GPU/TPU) and the host LAPACK one (used on CPU) give the
    same factor, dead inputs and retries; and `U^T U` is the damped inverse."""
    from nnxprune.algorithms.sparsegpt import _device_factor, hessian_factor

    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, 512, 48)
    x[:, 7] = 0
    H = np.asarray(hessian_of(x))
    low_rank = np.asarray(hessian_of((rng.standard_normal((256, 4)) @ rng.standard_normal((4, 48)))
                                     .astype(np.float32)))
    for h, percdamp in ((H, 0.01), (low_rank, 1e-10)):
        host = hessian_factor(h, percdamp=percdamp)
        U, dead, damp, p, retries = _device_factor(jnp.asarray(h), jnp.float32(percdamp), max_retries=8)
        assert int(retries) == host.retries and float(p) == pytest.approx(host.percdamp, rel=1e-5)
        np.testing.assert_array_equal(np.asarray(dead), np.asarray(host.dead))
        scale = np.abs(np.asarray(host.upper)).max()
        np.testing.assert_allclose(np.asarray(U), np.asarray(host.upper), atol=2e-4 * scale)
        u = np.float64(np.asarray(host.upper))
        assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    host = hessian_factor(H)  # well conditioned: U^T U is the damped inverse
    assert host.retries == 0 and host.dead.tolist() == [i == 7 for i in range(48)]
    inv = np.linalg.inv(np.float64(H) + np.diag(np.asarray(host.dead, np.float64))
                        + host.damping * np.eye(48))
    u = np.float64(np.asarray(host.upper))
    np.testing.assert_allclose(u.T @ u, inv, atol=1e-4 * np.abs(inv).max())
