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


def _layer_groups(model, i: int) -> list[Group]:
    layer = model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    base = ("layers", i)
    dh = attn.head_dim
    n, k = attn.num_heads, attn.num_kv_heads
    per_kv = n // k if k else 0
    out: list[Group] = []
    if k:
        q_unit = per_kv * dh
        out.append(Group("kv", i, k, (
            Member((*base, "self_attn", "k_proj"), "kernel", 1, dh, "head_dim"),
            Member((*base, "self_attn", "v_proj"), "kernel", 1, dh, "head_dim"),
            Member((*base, "self_attn", "q_proj"), "kernel", 1, q_unit, f"{per_kv} query heads"),
            Member((*base, "self_attn", "o_proj"), "kernel", 0, q_unit, f"{per_kv} query heads"),
        ), description=f"KV heads; each takes its k and v head and its {per_kv} query heads"))
        out.append(Group("q", i, n, (
            Member((*base, "self_attn", "q_proj"), "kernel", 1, dh, "head_dim"),
            Member((*base, "self_attn", "o_proj"), "kernel", 0, dh, "head_dim"),
        ), blocks=k, description=f"query heads, {per_kv} per KV group; keep the same number in "
                                 f"each of the {k} KV groups"))
    out.append(Group("mlp", i, mlp.intermediate_size, tuple(
        Member((*base, "mlp", name), "kernel", axis)
        for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0))),
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
    members.sort(key=lambda m: tuple((0, x) if isinstance(x, int) else (1, x) for x in m.path))
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
    raise UserError(f"layer {layer} has no {kind!r} group (it has no attention heads left)")
