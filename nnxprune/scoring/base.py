"""The score protocol: one importance per channel of a coupled group (DESIGN.md, principle 11).

A `Score` maps a group (`nnxprune.graph.groups`) and, when it needs calibration, the statistics
its collectors gathered (`nnxprune.calibration.collectors`) to one importance per channel. It
works member by member: `member(model, m, stats)` gives one value per entry of the member's
indexed axis (or None when the member carries no signal for this score, such as a norm's scale
for an activation score); `reduce_members` sums each channel's `unit` entries and combines the
members (sum, mean, max or prod, as Torch-Pruning's and LLM-Pruner's group reductions do);
`finish` maps the result (a square root for norms). Structured transforms take any registered
score by name and ask for calibration only when `score.collectors()` is not empty.

Statistics reach a score as `{layer index: {collector name: finished statistic}}`, gathered on
the dense model in one pass of the sequential driver.

Example:
    >>> score = get_score("weight_norm")
    >>> importance = score(model, find_group(model, "mlp", 3))        # [intermediate_size]
    >>> keep = lowest(importance, count=384)                          # indices to keep
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
import numpy as np

from nnxprune.errors import UserError
from nnxprune.graph import Group, Member, node_at

Stats = dict[int, dict[str, Any]]  # layer index -> collector name -> finished statistic
REDUCTIONS = ("sum", "mean", "max", "prod")
SCORES: dict[str, "Score"] = {}


def register_score(cls):
    """Class decorator: makes a score available to structured transforms under `cls.name`."""
    if cls.name in SCORES:
        raise ValueError(f"score {cls.name!r} registered twice")
    SCORES[cls.name] = cls()
    return cls


def get_score(name: str) -> "Score":
    """The registered score `name` (UserError naming the nearest one when unknown)."""
    if name not in SCORES:
        near = difflib.get_close_matches(name, list(SCORES), n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown score {name!r}; {hint}known: {', '.join(sorted(SCORES))}")
    return SCORES[name]


def member_array(model, member: Member):
    """The array a member indexes, masks applied (`effective_kernel` of a Linear)."""
    node = node_at(model, member.path)
    value = getattr(node, "effective_kernel", None)
    return value() if value is not None else getattr(node, member.variable)[...]


def layer_of(member: Member) -> tuple[int | None, str]:
    """`(layer index, module name within the layer)` of a member; `(None, path)` outside the
    decoder layers (embedding, final norm, lm_head)."""
    path = member.path
    if len(path) >= 2 and path[0] == "layers":
        return int(path[1]), ".".join(map(str, path[2:]))
    return None, ".".join(map(str, path))


def reduce_members(group: Group, values: Sequence[Any | None], how: str = "sum") -> jnp.ndarray:
    """One value per channel `[group.size]`: each member's per-entry `values` (along its axis,
    `group.size * member.unit` long; None = the member does not take part) summed over the
    channel's `unit` entries, then combined over the members by `how`."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown reduction {how!r}; known: {', '.join(REDUCTIONS)}")
    per_member = [jnp.asarray(v, jnp.float32).reshape(group.size, m.unit).sum(axis=1)
                  for m, v in zip(group.members, values, strict=True) if v is not None]
    if not per_member:
        raise ValueError(f"no member of group {group.name} carries this score's signal")
    if how == "sum":
        total = jnp.zeros((group.size,), jnp.float32)
        for v in per_member:
            total = total + v
        return total
    stacked = jnp.stack(per_member)
    return {"mean": jnp.mean, "max": jnp.max, "prod": jnp.prod}[how](stacked, axis=0)


@dataclasses.dataclass(frozen=True)
class Score:
    """Base of every score: `score(model, group, stats) -> np.ndarray [group.size]`."""

    name: ClassVar[str] = ""
    reduction: ClassVar[str] = "sum"
    kinds: ClassVar[tuple[str, ...]] = ("embed", "mlp", "kv", "q")  # group kinds it can rank

    def collectors(self) -> tuple:
        """The collectors whose statistics this score reads (empty: no calibration)."""
        return ()

    def needs_calibration(self) -> bool:
        return bool(self.collectors())

    def member(self, model, member: Member, stats: Stats | None):
        """Per-entry values along `member.axis`, or None when the member takes no part."""
        raise NotImplementedError

    def finish(self, values: jnp.ndarray) -> jnp.ndarray:
        return values

    def check_kind(self, kind: str) -> None:
        """UserError when this score cannot rank groups of `kind` (before any work)."""
        if kind not in self.kinds:
            raise UserError(f"score {self.name!r} ranks {', '.join(self.kinds)} groups, not "
                            f"{kind!r}")

    def __call__(self, model, group: Group, stats: Stats | None = None) -> np.ndarray:
        self.check_kind(group.kind)
        if self.needs_calibration() and stats is None:
            raise ValueError(f"score {self.name!r} needs calibration statistics")
        values = [self.member(model, m, stats) for m in group.members]
        return np.asarray(self.finish(reduce_members(group, values, self.reduction)))


def other_axes_sum(array, axis: int) -> jnp.ndarray:
    """`array` summed over every axis but `axis`: `[array.shape[axis]]`."""
    moved = jnp.moveaxis(array, axis, 0)
    return jnp.sum(moved.reshape(moved.shape[0], -1), axis=1)


def lowest(scores: np.ndarray, count: int, blocks: int = 1) -> np.ndarray:
    """Indices to KEEP after removing the `count` lowest scores (per block when `blocks` > 1:
    `count` from each of `blocks` equal consecutive blocks). Stable: ties drop the earlier index."""
    scores = np.asarray(scores)
    size = scores.size // blocks
    keep = []
    for b in range(blocks):
        block = scores[b * size:(b + 1) * size]
        order = np.argsort(block, kind="stable")
        keep.extend(sorted(b * size + order[count:]))
    return np.asarray(keep, dtype=np.int64)
