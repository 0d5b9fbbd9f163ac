"""SparseGPT: one-shot pruning of one weight matrix by Optimal Brain Surgeon updates.

Paper: Elias Frantar and Dan Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023, arXiv:2301.00774.
Reference code: https://github.com/IST-DASLab/sparsegpt, file `sparsegpt.py`
(`SparseGPT.add_batch` and `SparseGPT.fasterprune`). This module is an independent JAX
implementation of that procedure; where the paper leaves a detail open it follows the reference
code, as listed here.

Layout: our kernels are `[in, out]` (the reference's `W` is `[out, in]`, i.e. `kernel.T`), so the
reference's "columns" (input dims) are rows of our kernel, and the code works on those rows.

Procedure (`sparsegpt_prune`), for a kernel `W [in, out]` and the layer-input Hessian `H [in, in]`:

1. Dead inputs (`H[i, i] == 0`, the input never fired) get `H[i, i] = 1` and their row of `W` is
   zeroed.
2. Damping `percdamp * mean(diag H)` is added to the diagonal; `H^-1` comes from a Cholesky
   factorization, and `U` is the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`). Row `i` of
   `U` from the diagonal on is what the OBS update of input `i` needs, given that inputs `< i`
   are already fixed; `d_i = U[i, i]`.
3. Inputs are processed in blocks of `blocksize`. The pruning mask is chosen on the current
   (already updated) weights, with score `w^2 / d^2`:
   - unstructured: once per block, the `int(block.size * sparsity)` lowest scores over the whole
     `blocksize x out` block (the reference's per-block threshold);
   - N:M: at the first input of every group of M consecutive inputs, the N lowest of the M
     scores, per output; groups are aligned to the start of the block, hence
     to multiples of M, since `blocksize % M == 0` is required.
   Both selections give exactly what `masks.unstructured_keep` / `masks.nm_keep` give on the same
   scores (stable ties), computed without sorts, which are slow in XLA on CPU.
4. Inside the block, input by input: `q` = `w` with the pruned entries zeroed, `err = (w - q) / d`,
   and the block's later inputs get `-= U[i, i:] * err` (the OBS compensation). After the block
   the remaining inputs get the lazy batch update `-= U[block, rest]^T @ Err`.
5. `info["error"]` is the reference's `sum(Losses)`: `sum((w - q)^2 / d^2) / 2` over all inputs.

Deviations from the reference, on purpose:
- The reference keeps `tmp <= sort(tmp)[int(numel * sparsity)]`, which prunes
  `int(numel * sparsity) + 1` weights per block (more on ties, and one weight per block even at
  sparsity 0). We prune exactly `int(numel * sparsity)` per block, ties broken by position (as
  `masks.unstructured_keep` does): one weight per block fewer than the reference.
- N:M ties are broken by position (stable sort) rather than by `torch.topk`'s unspecified order.
- The reference raises when a Cholesky factorization fails. We retry inside the same jit with
  `percdamp` raised tenfold (from 1e-6 when it was 0), up to `max_retries` times, and report the
  retries and the damping used in `info`; `sparsegpt_prune` raises only if all retries fail.

Hessian accumulation (`hessian_update`) reproduces `add_batch`: with `t` new samples,
`H <- H * n / (n + t)`, `n <- n + t`, `H <- H + (sqrt(2 / n) x)^T (sqrt(2 / n) x)`, in float32,
so after all batches `H = 2 / n * sum X^T X`. As in the reference, `n` counts samples (the
leading dim of a `[batch, seq, in]` input; a 2-D `[tokens, in]` input counts as one sample), not
tokens. The scale of `H` does not change the mask or the weights (damping is relative); it only
scales `info["error"]`.

Everything runs in float32. The whole per-matrix procedure (dead inputs, damping with retries,
factorizations, all blocks) is one `jax.jit`, specialised on the shapes and on
`sparsity / n / m / blocksize / max_retries`. Blocks, N:M groups and inputs are `lax.fori_loop`s
(a partial last block is padded), so compile time does not grow with the matrix: measured on
CPU, unrolling the block loop in Python compiled in 3-8 s for in = 576 / 1536 against 2-3 s for
loops, at about the same run time, though the loop form spends twice the minimal flops on the
lazy updates (see `_sparsegpt`).

Example:
    >>> H, count = hessian_init(576)
    >>> for x in batches:                      # x: [batch, seq, 576] inputs of the layer
    ...     H, count = hessian_update(H, count, x)
    >>> kernel, keep, info = sparsegpt_prune(kernel, H, sparsity=0.5)
    >>> kernel, keep, info = sparsegpt_prune(kernel, H, sparsity=None, n=2, m=4)   # 2:4
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnxprune.algorithms.masks import check_sparsity
from nnxprune.errors import UserError

__all__ = ["hessian_init", "hessian_update", "sparsegpt_prune"]


# ------------------------------------------------------------------------------------------------
# Hessian accumulation


def hessian_init(dim: int) -> tuple[jnp.ndarray, int]:
    """An empty running Hessian for `dim` inputs: `(zeros [dim, dim] float32, 0 samples)`."""
    return jnp.zeros((dim, dim), jnp.float32), 0


@jax.jit
def _hessian_step(H, x, keep, scale):
    x = scale * x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return H * keep + x.T @ x


def hessian_update(H, n: int, x, *, samples: int | None = None) -> tuple[jnp.ndarray, int]:
    """Adds a batch of layer inputs `x` (`[tokens, in]` or `[batch, seq, in]`) to the running
    Hessian `H = 2 / n * sum X^T X`; returns the new `(H, n)`.

    `n` counts samples as the reference does: `x.shape[0]` for a 3-D input, 1 for a 2-D one;
    `samples` overrides that count.
    """
    x = jnp.asarray(x)
    if x.ndim not in (2, 3) or x.shape[-1] != H.shape[0]:
        raise UserError(f"inputs must be [tokens, {H.shape[0]}] or [batch, seq, {H.shape[0]}], "
                        f"got shape {tuple(x.shape)}")
    t = (x.shape[0] if x.ndim == 3 else 1) if samples is None else int(samples)
    if t <= 0:
        raise UserError(f"a batch must count at least one sample, got {t}")
    total = n + t
    keep = np.float32(n / total)
    scale = np.float32(math.sqrt(2.0 / total))
    return _hessian_step(jnp.asarray(H, jnp.float32), x, keep, scale), total


# ------------------------------------------------------------------------------------------------
# Pruning


def _prune_smallest(scores, k):
    """Marks the `k` lowest of the non-negative `scores` (ties by flat position), as
    `~masks.unstructured_keep` does; `k` may be traced. No sort: XLA's CPU sort takes ~50 ms per
    128 x 1536 block, while a bisection on the float bits (monotone for non-negative floats)
    takes 32 counts. A score of +inf is never picked unless `k` exceeds the finite ones."""
    bits = lax.bitcast_convert_type(scores, jnp.int32)

    def halve(_, bounds):  # invariant: count(bits <= lo) < k <= count(bits <= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid) >= k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    lo, hi = jnp.int32(-1), jnp.int32(0x7F800000)  # the bits of +inf
    _, kth = lax.fori_loop(0, 32, halve, (lo, hi))  # kth = the bits of the k-th lowest score
    below = bits < kth
    ties = (bits == kth).reshape(-1)
    first_ties = (jnp.cumsum(ties) <= k - jnp.sum(below)) & ties
    return below | first_ties.reshape(scores.shape)


def _prune_n_of_m(scores, n: int):
    """Marks the `n` lowest of the `m` rows of `scores [m, out]` per column (ties by position), as
    `~masks.nm_keep` does, by pairwise rank counting (m^2 compares; cheaper than sorting)."""
    a, b = scores[:, None, :], scores[None, :, :]  # a: s_j, b: s_k
    m = scores.shape[0]
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # k < j
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=1)
    return rank < n


def _inverse_factor(H, percdamp):
    """Upper Cholesky factor `U` of `(H + damp I)^-1` (`= U^T U`) and `damp`; NaN on failure."""
    eye = jnp.eye(H.shape[0], dtype=H.dtype)
    damp = percdamp * jnp.mean(jnp.diag(H))
    lower = jnp.linalg.cholesky(H + damp * eye)
    hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
    upper = jnp.triu(jnp.linalg.cholesky(hinv).T)
    return upper, damp


def _factor_with_retries(H, percdamp, max_retries):
    """`_inverse_factor` at `percdamp`, then at tenfold damping while it fails, at most
    `max_retries` times. One factorization in the graph: the loop's first pass is the first try."""

    def cond(state):
        retries, _, upper, _ = state
        return (retries < 0) | (~jnp.all(jnp.isfinite(upper)) & (retries < max_retries))

    def body(state):
        retries, p, _, _ = state
        p = jnp.where(retries < 0, p, jnp.where(p > 0, p * 10, jnp.float32(1e-6)))
        upper, damp = _inverse_factor(H, p)
        return retries + 1, p, upper, damp

    nan = jnp.full(H.shape, jnp.nan, H.dtype)
    return lax.while_loop(cond, body, (jnp.int32(-1), percdamp, nan, jnp.float32(0.0)))


def _prune_inputs(B, U1, prune, E, err, start, stop):
    """OBS steps for the block's inputs `start..stop-1`: returns the updated `(B, E, err)`."""

    def step(i, carry):
        B, E, err = carry
        w = B[i]
        q = jnp.where(prune[i], 0.0, w)
        e = (w - q) / U1[i, i]
        B = B - U1[i][:, None] * e[None, :]  # U1 is upper triangular: only inputs >= i move
        return B.at[i].set(q), E.at[i].set(e), err + jnp.sum(e * e)

    return lax.fori_loop(start, stop, step, (B, E, err))


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "blocksize", "max_retries"))
def _sparsegpt(kernel, H, percdamp, *, sparsity, n, m, blocksize, max_retries):
    W = kernel.astype(jnp.float32)
    H = H.astype(jnp.float32)
    dim, out = W.shape

    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(jnp.float32))
    W = jnp.where(dead[:, None], 0.0, W)

    retries, percdamp, U, damp = _factor_with_retries(H, percdamp, max_retries)

    # Pad the inputs to whole blocks: zero weights, identity in U (no coupling), +inf scores (never
    # picked by the unstructured selection; N:M needs no padding since blocksize % m == 0 and
    # dim % m == 0 make padded groups all-padding, whose zeros stay zero whatever is picked).
    blocks = -(-dim // blocksize)
    size = blocks * blocksize
    W = jnp.pad(W, ((0, size - dim), (0, 0)))
    U = jnp.pad(U, ((0, size - dim), (0, size - dim)))
    U = U + jnp.diag((jnp.arange(size) >= dim).astype(jnp.float32))
    real = (jnp.arange(size) < dim)[:, None]
    to_prune = jnp.array([int(min(blocksize, dim - start) * out * sparsity)
                          for start in range(0, dim, blocksize)], jnp.int32)
    inputs = jnp.arange(size)

    def block(b, carry):
        W, keep, err = carry
        start = b * blocksize
        B = lax.dynamic_slice_in_dim(W, start, blocksize, 0)
        rows = lax.dynamic_slice_in_dim(U, start, blocksize, 0)  # U[block, :]
        U1 = lax.dynamic_slice_in_dim(rows, start, blocksize, 1)  # U[block, block]
        d = jnp.diag(U1)[:, None]
        E = jnp.zeros_like(B)
        if n == 0:
            scores = B * B / (d * d)
            scores = jnp.where(lax.dynamic_slice_in_dim(real, start, blocksize, 0), scores, jnp.inf)
            prune = _prune_smallest(scores, to_prune[b])
            B, E, err = _prune_inputs(B, U1, prune, E, err, 0, blocksize)
        else:
            def group(g, carry):
                B, E, prune, err = carry
                first = g * m
                Bg = lax.dynamic_slice_in_dim(B, first, m, 0)
                dg = lax.dynamic_slice_in_dim(d, first, m, 0)
                picked = _prune_n_of_m(Bg * Bg / (dg * dg), n)
                prune = lax.dynamic_update_slice_in_dim(prune, picked, first, 0)
                B, E, err = _prune_inputs(B, U1, prune, E, err, first, first + m)
                return B, E, prune, err

            prune = jnp.zeros(B.shape, bool)
            B, E, prune, err = lax.fori_loop(0, blocksize // m, group, (B, E, prune, err))
        # Lazy batch update of the later inputs. Shapes are static, so it runs over all inputs
        # with U's entries for this block and the earlier ones zeroed (twice the minimal flops).
        later = jnp.where(inputs[None, :] >= start + blocksize, rows, 0.0)
        W = W - later.T @ E
        W = lax.dynamic_update_slice_in_dim(W, B, start, 0)
        keep = lax.dynamic_update_slice_in_dim(keep, ~prune, start, 0)
        return W, keep, err

    keep = jnp.ones(W.shape, bool)
    W, keep, err = lax.fori_loop(0, blocks, block, (W, keep, jnp.float32(0.0)))
    return W[:dim], keep[:dim], damp, percdamp, retries, err / 2


def sparsegpt_prune(kernel, H, *, sparsity: float | None, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01, max_retries: int = 8):
    """Prunes `kernel [in, out]` given its inputs' Hessian `H [in, in]` (see `hessian_update`).

    Give either `sparsity` (unstructured, that fraction of every block of `blocksize` inputs) or
    `n` and `m` (N:M: prune N of every M consecutive inputs, per output; `sparsity` must then be
    None or N/M). Returns `(new_kernel [in, out] float32, keep_mask [in, out] bool, info)` where
    `new_kernel` is zero wherever `keep_mask` is False, and `info` has `damping` (the absolute value
    added to the diagonal of H), `percdamp` (the relative damping finally used), `retries` (how many
    times a failed Cholesky factorization made the damping grow tenfold) and `error` (the
    reference's `sum(Losses)`, the OBS estimate of the reconstruction error).
    """
    kernel = jnp.asarray(kernel, jnp.float32)  # cast outside the jit: one compile per shape
    H = jnp.asarray(H, jnp.float32)
    if kernel.ndim != 2 or H.shape != (kernel.shape[0], kernel.shape[0]):
        raise UserError(f"need kernel [in, out] and H [in, in], got {tuple(kernel.shape)} and "
                        f"{tuple(H.shape)}")
    dim = kernel.shape[0]
    n, m, blocksize, max_retries = int(n), int(m), int(blocksize), int(max_retries)
    if blocksize <= 0:
        raise UserError(f"blocksize must be positive, got {blocksize}")
    if max_retries < 0:
        raise UserError(f"max_retries must be >= 0, got {max_retries}")
    if not (isinstance(percdamp, (int, float)) and not isinstance(percdamp, bool)
            and math.isfinite(percdamp) and percdamp >= 0):
        raise UserError(f"percdamp must be a number >= 0, got {percdamp!r}")
    if n or m:
        if not 0 < n < m:
            raise UserError(f"N:M needs 0 < N < M, got {n}:{m}")
        if sparsity is not None and not math.isclose(float(sparsity), n / m):
            raise UserError(f"sparsity {sparsity} contradicts the {n}:{m} pattern (use None)")
        if dim % m or blocksize % m:
            raise UserError(f"N:M with M={m} needs the input dimension ({dim}) and the blocksize "
                            f"({blocksize}) to be multiples of M")
        sparsity = 0.0
    else:
        if sparsity is None:
            raise UserError("give a sparsity or an N:M pattern")
        sparsity = check_sparsity(sparsity)
    blocksize = min(blocksize, dim)  # one block either way; saves padding (dim % m == 0 for N:M)
    new_kernel, keep, damp, p, retries, err = _sparsegpt(
        kernel, H, jnp.float32(percdamp), sparsity=sparsity, n=n, m=m, blocksize=blocksize,
        max_retries=max_retries)
    info = {"damping": float(damp), "percdamp": float(p), "retries": int(retries),
            "error": float(err)}
    if not (math.isfinite(info["error"]) and bool(jnp.all(jnp.isfinite(new_kernel)))):
        raise ValueError(f"SparseGPT: the damped Hessian could not be factorized, even after "
                         f"{max_retries} retries with percdamp raised to {info['percdamp']:g}; "
                         "is H finite?")
    return new_kernel, keep, info
