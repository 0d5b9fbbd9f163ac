"""Request trees and packed rows: how lm-eval's loglikelihood requests become the model's inputs.

The requests that share a context (the choices of a multiple-choice question, the one-token
continuations of one prompt) become one *tree* (`request_trees`): the context once, then every
choice's `continuation[:-1]` after it, each choice at the positions it has in its own long row.
Trees are packed, best fit, into rows of `PACK_TOKENS` tokens (`pack_trees`; several short
questions to a row), and a tree too long for one goes in a row of its own length (`fine_length`).
`batches` groups the rows of one length into calls of about `ROW_TOKENS * batch_size` tokens and
lays each call out as arrays (`Batch`): tokens, positions, tree segments and branches, and the
positions to score. All of it runs on the host, in numpy.

Example:
    >>> requests = [(None, [1, 5, 6], [7]), (None, [1, 5, 6], [8, 9])]  # (key, context, cont.)
    >>> (batch,) = batches(requests, max_length=512, batch_size=8)
    >>> batch.tokens.shape                # (1, 512): one packed row, both choices in one tree
    >>> batch.targets, batch.owner        # [7, 8, 9], [0, 1, 1]
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

from nnxprune.errors import UserError

ROW_TOKENS = 256  # tokens per unit of `batch_size` in one call (see `batches`)
PACK_TOKENS = 512  # tokens of a packed row of trees (see `pack_trees`)
TREE_TOKENS = 1024  # a tree of one context grows to at most this many tokens (see `request_trees`)


def bucket_length(n: int, max_length: int | None = None) -> int:
    """The padded length for `n` tokens: 1, 2, 4, 8, 16, then powers of two and 1.5 times them
    (24, 32, 48, 64, 96, 128, ...), so padding wastes at most a third (a sixth on average) while a
    whole task compiles a handful of shapes; at most `max_length` (when given and >= n)."""
    b = 1
    while b < n:
        b = b * 2 if b < 16 else b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16, 24, 32, 48
    return b if max_length is None or n > max_length else min(b, max_length)


def fine_length(n: int) -> int:
    """The padded length of a row longer than `PACK_TOKENS` (a long tree, a rolling window):
    powers of two up to 16, then four steps per octave (20, 24, 28, 32, 40, 48, 56, 64, 80, ...),
    so padding wastes at most a fifth (about a ninth on average). Each length is one more
    compilation (of a single decoder layer, ~0.2 s)."""
    if n <= 16:
        return bucket_length(n)
    step = _pow2_floor(n - 1) // 4
    return -(-n // step) * step


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@dataclasses.dataclass
class Tree:
    """A context and the choices after it, as tokens of one packed row: `positions` (in each
    request's own row), `branch` (0: the context; 1, 2, ...: a choice's `continuation[:-1]`) and
    the scored entries `(index in the tree, target token, request)`."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]
    scored: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


def request_trees(requests, max_length: int, cap: int) -> list[Tree]:
    """The trees of `requests` (`(key, context_ids, continuation_ids)`): the requests of one
    context, truncated as lm-eval's `hf` model truncates (the last `max_length + 1` tokens of
    context + continuation), share a tree while it stays within `cap` tokens (a longer one starts
    another tree of the same context; a single choice may exceed `cap`). Equal continuations of a
    context share a branch."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for i, (_, ctx, cont) in enumerate(requests):
        if not cont:
            raise UserError("lm-eval request with an empty continuation")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        n = min(len(cont), len(whole) - 1)  # scored tokens: each needs a token before it
        if n < 1:
            raise UserError("lm-eval request with an empty context and a one-token continuation")
        groups[tuple(whole[:-n])].append((i, tuple(whole[-n:])))
    trees = []
    for ctx, members in groups.items():
        tree, starts = None, {}
        for i, cont in members:
            if tree is None or (cont not in starts and starts
                                and len(tree.tokens) + len(cont) - 1 > cap):
                tree, starts = Tree(list(ctx), list(range(len(ctx))), [0] * len(ctx)), {}
                trees.append(tree)
            if cont not in starts:
                starts[cont] = len(tree.tokens)
                tree.tokens += cont[:-1]
                tree.positions += range(len(ctx), len(ctx) + len(cont) - 1)
                tree.branch += [len(starts)] * (len(cont) - 1)
            start = starts[cont]  # the first token is predicted at the context's last position
            tree.scored.append((len(ctx) - 1, cont[0], i))
            tree.scored += [(start + j, cont[j + 1], i) for j in range(len(cont) - 1)]
    return trees


def pack_trees(trees: list[Tree], size: int) -> list[list[Tree]]:
    """Rows of trees: those of at most `size` tokens best fit (longest first) into rows of `size`
    tokens, each longer one in a row of its own."""
    rows: list[list[Tree]] = []
    free: dict[int, list[int]] = defaultdict(list)  # tokens left -> rows with that many
    for tree in sorted(trees, key=lambda t: -len(t.tokens)):
        n = len(tree.tokens)
        if n > size:
            rows.append([tree])
            continue
        for left in range(n, size + 1):  # the fullest row it fits in
            if free[left]:
                r = free[left].pop()
                break
        else:
            r, left = len(rows), size
            rows.append([])
        rows[r].append(tree)
        free[left - n].append(r)
    return rows


@dataclasses.dataclass
class Batch:
    """One call's packed rows, `[B, T]` each: `tokens`, `positions` (each token's position in its
    own request's row), `segment` (1, 2, ...: the tree of a row; 0: padding) and `branch` (see
    `Tree`); and the scored entries, `[M]` each: the target token `targets[k]` follows position
    `pos[k]` of row `row[k]`, and belongs to request `owner[k]`."""

    tokens: np.ndarray
    positions: np.ndarray
    segment: np.ndarray
    branch: np.ndarray
    row: np.ndarray
    pos: np.ndarray
    targets: np.ndarray
    owner: np.ndarray


def batches(requests: Sequence, max_length: int, batch_size: int) -> Iterator[Batch]:
    """The calls that score `requests` (`(key, context_ids, continuation_ids)`): trees packed
    into rows (`PACK_TOKENS`, or `fine_length` for a longer one); a call takes rows of one length,
    about `ROW_TOKENS * batch_size` tokens (longest rows first: the worst memory up front), its
    row count a power of two."""
    rows = pack_trees(request_trees(requests, max_length, TREE_TOKENS), PACK_TOKENS)
    by_length: dict[int, list[list[Tree]]] = defaultdict(list)
    for trees in rows:
        n = sum(len(t.tokens) for t in trees)
        by_length[PACK_TOKENS if n <= PACK_TOKENS else fine_length(n)].append(trees)
    for T in sorted(by_length, reverse=True):
        group = by_length[T]
        most = max(1, ROW_TOKENS * batch_size // T)
        for start in range(0, len(group), most):
            chunk = group[start:start + most]
            yield layout(chunk, T, min(most, _pow2_ceil(len(chunk))))


def layout(rows: list[list[Tree]], T: int, B: int) -> Batch:
    """`rows` (at most `B`, each of at most `T` tokens) as one `Batch` of `B` rows of `T`."""
    tokens = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    segment = np.zeros((B, T), np.int32)  # padding: segment 0
    branch = np.zeros((B, T), np.int32)
    row, pos, targets, owner = [], [], [], []
    for b, trees in enumerate(rows):
        offset = 0
        for seg, tree in enumerate(trees, start=1):
            end = offset + len(tree.tokens)
            tokens[b, offset:end] = tree.tokens
            positions[b, offset:end] = tree.positions
            segment[b, offset:end] = seg
            branch[b, offset:end] = tree.branch
            for index, target, i in tree.scored:
                row.append(b)
                pos.append(offset + index)
                targets.append(target)
                owner.append(i)
            offset = end
    return Batch(tokens, positions, segment, branch, np.array(row), np.array(pos),
                 np.array(targets, np.int32), np.array(owner))
