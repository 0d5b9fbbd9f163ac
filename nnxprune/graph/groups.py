"""Coupled channel groups, derived from the channel-space names the layers carry (no tracing).

A *group* is a set of channels that must be removed together to keep the model valid: removing
hidden channel 17 means deleting column 17 of the embedding, entry 17 of every RMSNorm, row 17 of
every projection that reads the residual stream and column 17 of every projection that writes it.
Each group lists its *members* (a variable path, the axis of that variable the group indexes,
and the unit: how many consecutive entries make one channel, e.g. `head_dim` for a head).

Groups of a Llama (DESIGN.md, principle 3):
- `embed`: one global group over the hidden size;
- `mlp[i]`: MLP neurons of layer i (gate and up outputs, down input);
- `kv[i]`: KV groups of layer i: a k and a v head, the query heads that share them, and the
  o_proj inputs of those query heads; removing one removes the whole query group (GQA);
- `q[i]`: query heads of layer i (q outputs, o_proj inputs); a keep set must keep the same
  number of heads in every KV group, so grouped-query attention stays valid;
- `layer[i]`: the whole decoder layer (depth).

The per-layer groups are read off the `Linear`s inside each decoder layer, never off module
names: `mlp` takes every kernel side in space `mlp`; `kv` takes the `kv_heads` sides (unit
`head_dim`, their unit) and the `q_heads` sides with unit `per_kv * head_dim`; `q` takes the
`q_heads` sides with unit `head_dim`. Members list output sides (kernel axis 1) before input
sides (axis 0), each in module-path order. A layer whose Linears disagree on a space's width
or unit, or whose query heads do not split evenly over its KV heads, raises ValueError.

Example:
    >>> for g in groups(model): print(g)            # every group, with its members
    >>> g = find_group(model, "kv", layer=3); g.size   # KV heads of layer 3
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from flax import nnx

from nnxprune import layers as L
from nnxprune.errors import UserError

KINDS = ("embed", "mlp", "kv", "q", "layer")


@dataclasses.dataclass(frozen=True)
class Member:
    """One variable a group indexes: channel `c` is entries `[c*unit, (c+1)*unit)` of `axis`."""

    path: tuple[str | int, ...]  # module path, e.g. ("layers", 3, "self_attn", "q_proj")
    variable: str  # "kernel", "embedding" or "scale"
    axis: int
    unit: int = 1
    unit_name: str = ""  # what one unit is, for people: "head_dim", "query group", ...

    @property
    def name(self) -> str:
        return ".".join(map(str, (*self.path, self.variable)))

    def __str__(self) -> str:
        unit = f"{self.unit} ({self.unit_name})" if self.unit_name else str(self.unit)
        return f"{self.name:<42} axis {self.axis}  unit {unit}"


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels that are removed together. `size` channels; `blocks` > 1 means a keep set must
    keep the same number of channels in each of `blocks` equal consecutive blocks (query heads
    per KV group)."""

    kind: str
    layer: int | None
    size: int
    members: tuple[Member, ...]
    blocks: int = 1
    description: str = ""

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"

    def __str__(self) -> str:
        head = f"group {self.name}: {self.size} channels"
        if self.description:
            head += f" ({self.description})"
        return "\n".join([head, *(f"  {m}" for m in self.members)])


def _path_key(path) -> tuple:
    """Sorts module paths: integer indices (layer numbers) before names, each in order."""
    return tuple((0, x) if isinstance(x, int) else (1, x) for x in path)


@dataclasses.dataclass(frozen=True)
class _Side:
    """One side of a `Linear` inside a decoder layer: its kernel `axis` (1 = output, 0 = input)
    lies in a channel space, `width` entries wide, `unit` entries per channel."""

    path: tuple[str | int, ...]
    axis: int
    width: int
    unit: int

    def member(self, unit: int, unit_name: str) -> Member:
        return Member(self.path, "kernel", self.axis, unit, unit_name)


# What one unit of each per-layer space is, for people (printed after the unit).
_UNIT_NAMES = {L.Q_HEADS: "head_dim", L.KV_HEADS: "head_dim", L.MLP: ""}


def _layer_sides(layer, base: tuple) -> dict[str, list[_Side]]:
    """The kernel sides of every `Linear` in `layer` by channel space, in member order: output
    sides (axis 1) before input sides (axis 0), each in module-path order."""
    linears = sorted(((path, node) for path, node in nnx.iter_modules(layer)
                      if isinstance(node, L.Linear)), key=lambda pn: _path_key(pn[0]))
    sides: dict[str, list[_Side]] = {}
    for axis in (1, 0):
        for path, lin in linears:
            space, unit = (lin.out_space, lin.out_unit) if axis else (lin.in_space, lin.in_unit)
            sides.setdefault(space, []).append(
                _Side((*base, *path), axis, lin.kernel.shape[axis], unit))
    return sides


def _channels(sides: list[_Side], space: str, i: int) -> tuple[int, int]:
    """`(channels, unit)` of a space in layer `i`; every side must agree on width and unit."""
    def names(attr):
        return ", ".join(f"{'.'.join(map(str, s.path))} axis {s.axis}: {getattr(s, attr)}" for s in sides)
    if len({s.unit for s in sides}) != 1:
        raise ValueError(f"layer {i}: the Linears disagree on the unit of space {space!r} ({names('unit')})")
    if len({s.width for s in sides}) != 1:
        raise ValueError(f"layer {i}: the Linears disagree on the width of space {space!r} "
                         f"({names('width')})")
    width, unit = sides[0].width, sides[0].unit
    if unit < 1 or width % unit:
        raise ValueError(f"layer {i}: space {space!r} is {width} wide, not a whole number of "
                         f"units of {unit}")
    return width // unit, unit


def _attention_groups(sides: dict[str, list[_Side]], i: int) -> list[Group]:
    """`kv[i]` and `q[i]` from the `kv_heads` and `q_heads` sides (none when no heads are left)."""
    kv_sides, q_sides = sides.get(L.KV_HEADS, []), sides.get(L.Q_HEADS, [])
    if not kv_sides and not q_sides:
        return []
    if not kv_sides or not q_sides:
        missing = L.KV_HEADS if not kv_sides else L.Q_HEADS
        raise ValueError(f"layer {i}: attention needs both {L.KV_HEADS!r} and {L.Q_HEADS!r} "
                         f"Linears; no Linear uses {missing!r}")
    k, dh = _channels(kv_sides, L.KV_HEADS, i)
    n, q_dh = _channels(q_sides, L.Q_HEADS, i)
    if q_dh != dh:
        raise ValueError(f"layer {i}: the Linears disagree on the head size: {L.KV_HEADS!r} unit "
                         f"{dh}, {L.Q_HEADS!r} unit {q_dh}")
    if k == 0 and n == 0:
        return []
    if k == 0 or n % k:
        raise ValueError(f"layer {i}: {n} query heads do not split into {k} KV groups "
                         f"(the {L.Q_HEADS!r} width is not a multiple of the KV head count)")
    per_kv = n // k
    kv_name, q_name = _UNIT_NAMES[L.KV_HEADS], _UNIT_NAMES[L.Q_HEADS]
    kv = Group("kv", i, k, (
        *(s.member(dh, kv_name) for s in kv_sides),
        *(s.member(per_kv * dh, f"{per_kv} query heads") for s in q_sides),
    ), description=f"KV heads; each takes its k and v head and its {per_kv} query heads")
    q = Group("q", i, n, tuple(s.member(dh, q_name) for s in q_sides), blocks=k,
              description=f"query heads, {per_kv} per KV group; keep the same number in each of "
                          f"the {k} KV groups")
    return [kv, q]


def _layer_groups(model, i: int) -> list[Group]:
    """`kv[i]`, `q[i]`, `mlp[i]`, `layer[i]`, derived from the channel spaces of the Linears
    inside decoder layer `i`. Members come output sides first, then input sides, each in
    module-path order (so k, v, q, o and gate, up, down)."""
    base = ("layers", i)
    sides = _layer_sides(model.layers[i], base)
    out = _attention_groups(sides, i)
    if sides.get(L.MLP):
        f, unit = _channels(sides[L.MLP], L.MLP, i)
        out.append(Group("mlp", i, f, tuple(s.member(unit, _UNIT_NAMES[L.MLP]) for s in sides[L.MLP]),
                         description="MLP neurons"))
    out.append(Group("layer", i, 1, (Member(base, "", 0),), description="the whole decoder layer"))
    return out


def _embed_group(model) -> Group:
    members = []
    for path, node in nnx.iter_modules(model):
        if isinstance(node, L.Embed):
            members.append(Member(path, "embedding", 1))
        elif isinstance(node, L.RMSNorm):
            members.append(Member(path, "scale", 0))
        elif isinstance(node, L.Linear):
            if node.in_space == L.EMBED:
                members.append(Member(path, "kernel", 0))
            if node.out_space == L.EMBED:
                members.append(Member(path, "kernel", 1))
    members.sort(key=lambda m: _path_key(m.path))
    tied = "tied output head" if model.lm_head is None else "lm_head"
    return Group("embed", None, model.embed_tokens.embedding.shape[1], tuple(members),
                 description=f"hidden channels: embedding, every norm, projection inputs and "
                             f"outputs, {tied}")


def groups(model) -> list[Group]:
    """Every coupled group of `model`: `embed`, then per layer `kv`, `q`, `mlp`, `layer`."""
    out = [_embed_group(model)]
    for i in range(len(model.layers)):
        out.extend(_layer_groups(model, i))
    return out


def iter_groups(model, kind: str) -> Iterator[Group]:
    if kind not in KINDS:
        raise UserError(f"unknown group kind {kind!r}; known: {', '.join(KINDS)}")
    return (g for g in groups(model) if g.kind == kind)


def find_group(model, kind: str, layer: int | None = None) -> Group:
    """The group of `kind` (and `layer`, for per-layer kinds)."""
    if kind not in KINDS:
        raise UserError(f"unknown group kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "embed":
        return _embed_group(model)
    n = len(model.layers)
    if layer is None or not -n <= layer < n:
        raise UserError(f"group {kind!r} needs a layer index in [0, {n}), got {layer!r}")
    layer %= n
    for g in _layer_groups(model, layer):
        if g.kind == kind:
            return g
    why = "it has no attention heads left" if kind in ("kv", "q") else f"no Linear in it uses space {kind!r}"
    raise UserError(f"layer {layer} has no {kind!r} group ({why})")
