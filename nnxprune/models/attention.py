"""Attention kernels: the functions a decoder layer's attention can call (DESIGN.md, principle 1).

Every kernel has the `AttentionFn` signature `fn(q, keys, values, q_pos, k_pos) -> out`: queries
`q [B, T, K, G, Dh]` (the G query heads that share each of the K KV heads together), keys and
values `[B, S, K, Dh]`, positions `q_pos [B, T]`, `k_pos [B, S]`; the output has the queries'
shape. `Attention.__call__` takes any such function (`attention_fn=`), as Flax's attention
modules do; without one it picks `causal_attention` for long cache-free rows and
`masked_attention` otherwise. `tree_attention` (packed trees of requests that share a context,
lm-eval's scorer) plugs in the same way, with its extra arguments bound by `functools.partial`.

Example:
    >>> out = masked_attention(q, k, v, pos, pos)         # causal by positions
    >>> fn = functools.partial(tree_attention, segment=seg, branch=br)
    >>> layer(x, positions, inv_freq, attention_fn=fn)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

ATTN_BLOCK = 64  # rows longer than this take the cache-free causal path (lm-eval: query block)
ATTN_LEAF = 128  # positions of the masked diagonal tiles of that path


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_pos: jax.Array,
               k_pos: jax.Array) -> jax.Array:
    """Masked softmax attention. `q [B, T, K, G, Dh]`, keys/values `[B, S, K, Dh]`; key `s` is
    visible to query `t` when `k_pos[s] <= q_pos[t]`. Scores and softmax in float32."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, values)


def fold_query_heads(q: jax.Array, keys: jax.Array, values: jax.Array):
    """The G query heads that share a KV head as the rows of one matmul: rows `[B, K, T*G, Dh]`
    (row `t*G + g`; scaled by 1/sqrt(Dh)), keys and values `[B, K, S, Dh]`."""
    b, t, k, g, dh = q.shape
    rows = (q * (1.0 / math.sqrt(dh))).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, dh)
    return rows, keys.astype(q.dtype).transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)


def unfold_query_heads(out: jax.Array, q_shape) -> jax.Array:
    """`out [B, K, T*G, Dh]` back to the query layout `[B, T, K, G, Dh]`."""
    b, t, k, g, dh = q_shape
    return out.reshape(b, k, t, g, dh).transpose(0, 2, 1, 3, 4)


def softmax_piece(rows: jax.Array, keys_t: jax.Array, values_t: jax.Array,
                   visible: jax.Array | None = None):
    """Unnormalised attention of folded query `rows [B, K, R, Dh]` over `keys_t`, `values_t
    [B, K, S, Dh]` (`visible [B, R, S]`, or all visible): the row max `[B, K, R, 1]`, the row sum of
    exponentials below it, and the unnormalised output `[B, K, R, Dh]`; scores in float32. Every
    row must see at least one key."""
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, keys_t, preferred_element_type=jnp.float32)
    if visible is not None:
        scores = jnp.where(visible[:, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    out = jnp.einsum("bkrs,bksd->bkrd", e.astype(values_t.dtype), values_t,
                     preferred_element_type=jnp.float32)
    return top, jnp.sum(e, axis=-1, keepdims=True), out


def causal_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
                     key_positions: jax.Array | None = None) -> jax.Array:
    """Causal self-attention without a cache, fast on CPU. Exact, not an approximation.

    `positions [B, T]` must increase along T (as they do for whole rows); key `s` is visible to
    query `t` when `positions[s] <= positions[t]`. The keys are the queries' own positions, so
    `key_positions` (the `AttentionFn` signature) is not read.

    - The G query heads that share a KV head are folded into the rows of one matmul per KV head
      (`[T*G, Dh] x [Dh, S]`), so the matmuls are tall instead of G small ones.
    - The causal triangle is cut recursively: the queries of the second half against the keys of
      the first half are one dense rectangle, with no mask (every key there is visible); each
      half recurses, down to diagonal tiles of `ATTN_LEAF` positions, the only ones masked. The
      upper triangle is never computed, and most of the work is in a few large matmuls
      (`[T/2*G, Dh] x [Dh, T/2]` at the top) instead of one small one per query block.
    - The pieces of a query row combine as in an online softmax: each keeps its max, its sum of
      exponentials and its unnormalised `[R, Dh]` output, rescaled to the larger max when two
      meet; the output is divided by the row sum once at the end.
    At T=1024 (SmolLM2 shapes, two cores) this is about 15% faster than query blocks of 64
    positions against all keys before them (7.7-8.3 vs 9.4-9.9 ms per layer).
    """
    g = q.shape[3]
    rows, keys_t, values_t = fold_query_heads(q, keys, values)
    row_pos = jnp.repeat(positions, g, axis=1)  # [B, T*G]: the position of every row

    def piece(q_lo, q_hi, k_lo, k_hi, masked):
        visible = (positions[:, None, k_lo:k_hi] <= row_pos[:, q_lo * g:q_hi * g, None]
                   if masked else None)  # a row sees its own key
        return softmax_piece(rows[:, :, q_lo * g:q_hi * g], keys_t[:, :, k_lo:k_hi],
                              values_t[:, :, k_lo:k_hi], visible)

    def merge(x, y):  # two pieces of the same query rows
        top = jnp.maximum(x[0], y[0])
        fx, fy = jnp.exp(x[0] - top), jnp.exp(y[0] - top)
        return top, x[1] * fx + y[1] * fy, x[2] * fx + y[2] * fy

    def triangle(lo, hi):  # queries lo..hi against keys lo..hi
        if hi - lo <= ATTN_LEAF:
            return piece(lo, hi, lo, hi, True)
        mid = lo + max(ATTN_LEAF, (hi - lo) // 2 // ATTN_LEAF * ATTN_LEAF)
        first, second = triangle(lo, mid), triangle(mid, hi)
        second = merge(second, piece(mid, hi, lo, mid, False))
        return tuple(jnp.concatenate([x, y], axis=2) for x, y in zip(first, second, strict=True))

    _, total, out = triangle(0, q.shape[1])
    return unfold_query_heads((out / total).astype(values.dtype), q.shape)


def tree_attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_pos: jax.Array,
                   k_pos: jax.Array, *, segment: jax.Array, branch: jax.Array) -> jax.Array:
    """Attention within packed trees of requests. `segment [B, T]` numbers the trees of a row
    (padding: 0) and `branch [B, T]` the choices of a tree (its shared context: 0). Key `j` is
    visible to query `i` when `j <= i` in the row, both are in one tree, and the key is in the
    context or in the query's own choice. Positions (each token's position in its own request)
    only matter to RoPE, already applied, so `q_pos` and `k_pos` are not read.

    The G query heads of a KV head are folded into the rows of one matmul; query blocks of
    `ATTN_BLOCK` positions go against the keys up to the block's end (every block masked), and
    the `[R, Dh]` output is divided by the row sums."""
    t, g = q.shape[1], q.shape[3]
    rows, keys_t, values_t = fold_query_heads(q, keys, values)
    index = jnp.arange(t)
    outs = []
    for start in range(0, t, ATTN_BLOCK):
        stop = min(start + ATTN_BLOCK, t)
        q_branch = branch[:, start:stop, None]
        k_branch = branch[:, None, :stop]
        visible = ((index[None, :stop] <= index[start:stop, None])[None]
                   & (segment[:, None, :stop] == segment[:, start:stop, None])
                   & ((k_branch == 0) | (k_branch == q_branch)))  # [B, Tq, S]
        visible = jnp.repeat(visible, g, axis=1)  # [B, Tq*G, S]: a query row per head
        _, total, out = softmax_piece(  # a query always sees itself
            rows[:, :, start * g:stop * g], keys_t[:, :, :stop], values_t[:, :, :stop], visible)
        outs.append((out / total).astype(values.dtype))
    return unfold_query_heads(jnp.concatenate(outs, axis=2), q.shape)
