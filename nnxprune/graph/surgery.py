"""Soft and hard edits of a model, expressed on coupled groups (DESIGN.md, principle 4).

Soft edits set `Mask` values and keep every shape: `mask_group` zeroes whole channels of a group,
`mask_weights` zeroes individual weights of one projection (unstructured or N:M patterns come
from `nnxprune.algorithms.masks`). Hard edits change shapes: `take` slices every member of a
group, `drop_layers` deletes decoder layers, `fold_masks` bakes masks into the weights and
removes them. For every group, `take(model, g, keep)` gives the same outputs as
`mask_group(model, g, keep)`; the tests hold that.

Masking hidden (`embed`) channels also masks the embedding and every RMSNorm, whose mean then
runs over the kept channels only, so even that soft edit equals its hard slice exactly. A layer's
soft removal masks the Linears that write the residual stream (o_proj and down_proj) entirely: the
residual passes through unchanged.

All edits work in place and return the model, so they chain and fit `Transform.__call__`.

Example:
    >>> g = find_group(model, "mlp", layer=2)
    >>> take(model, g, keep=range(0, g.size, 2))      # layer 2 keeps every other neuron
    >>> drop_layers(model, [5, 7])
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune import layers as L
from nnxprune.errors import UserError
from nnxprune.graph.groups import Group, Member, find_group


def node_at(model, path: Sequence[str | int]):
    """The module at `path` (e.g. `("layers", 3, "mlp", "up_proj")`)."""
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def check_keep(group: Group, keep: Iterable[int]) -> np.ndarray:
    """`keep` as sorted unique int indices, validated against the group (UserError otherwise)."""
    keep = np.asarray(sorted(set(int(i) for i in keep)), dtype=np.int64)
    if keep.size and (keep[0] < 0 or keep[-1] >= group.size):
        raise UserError(f"{group.name}: keep indices must lie in [0, {group.size}), got "
                        f"{keep[0]}..{keep[-1]}")
    minimum = {"embed": 1, "kv": 1, "q": group.blocks, "mlp": 0, "layer": 0}[group.kind]
    if keep.size < minimum:
        hint = "; to remove attention or a layer entirely, drop the layer" if group.kind in ("kv", "q") else ""
        raise UserError(f"{group.name}: must keep at least {minimum} of {group.size} channels, "
                        f"got {keep.size}{hint}")
    if group.blocks > 1:
        per_block = np.bincount(keep // (group.size // group.blocks), minlength=group.blocks)
        if len(set(per_block.tolist())) != 1:
            raise UserError(f"{group.name}: keep the same number of query heads in every KV group "
                            f"(grouped-query attention), got {per_block.tolist()} per group")
    return keep


def _entries(member: Member, keep: np.ndarray) -> np.ndarray:
    """Indices along `member.axis` of the kept channels' entries."""
    return (keep[:, None] * member.unit + np.arange(member.unit)[None, :]).reshape(-1)


def _channel_vector(member: Member, keep: np.ndarray, length: int) -> np.ndarray:
    vec = np.zeros(length, dtype=bool)
    vec[_entries(member, keep)] = True
    return vec


# -- soft edits ------------------------------------------------------------------------------------
def residual_writers(layer) -> list:
    """The Linears of a decoder layer that write the residual stream (output space `embed`: o_proj
    and down_proj of a Llama layer): masking them all removes the layer exactly."""
    return [node for _, node in nnx.iter_modules(layer)
            if isinstance(node, L.Linear) and node.out_space == L.EMBED]


def mask_group(model, group: Group, keep: Iterable[int]):
    """Soft edit: masks every channel of `group` not in `keep` (ANDed with existing masks)."""
    keep = check_keep(group, keep)
    if group.kind == "layer":
        if keep.size == 0:
            for lin in residual_writers(node_at(model, group.members[0].path)):
                mask_weights(lin, np.zeros(lin.kernel.shape, bool))
        return model
    for member in group.members:
        node = node_at(model, member.path)
        if isinstance(node, L.Linear):
            length = node.kernel.shape[member.axis]
            vec = _channel_vector(member, keep, length)
            shape = [1, 1]
            shape[member.axis] = length
            mask_weights(node, np.broadcast_to(vec.reshape(shape), node.kernel.shape))
        else:  # Embed / RMSNorm: a mask over their hidden channels
            length = getattr(node, member.variable).shape[member.axis]
            vec = _channel_vector(member, keep, length)
            old = np.ones(length, bool) if node.mask is None else np.asarray(node.mask[...])
            node.set_mask(old & vec)
    return model


def mask_weights(linear: L.Linear, keep) -> L.Linear:
    """Soft edit of single weights: ANDs the boolean `keep [in, out]` into the Linear's mask."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != linear.kernel.shape:
        raise ValueError(f"keep shape {keep.shape} != kernel shape {linear.kernel.shape}")
    if linear.mask is not None:
        keep = keep & np.asarray(linear.mask[...])
    linear.set_mask(keep)
    return linear


# -- hard edits ------------------------------------------------------------------------------------
def _slice_variable(var: nnx.Variable, idx: np.ndarray, axis: int) -> None:
    var.set_value(jnp.take(var[...], jnp.asarray(idx), axis=axis))


def take(model, group: Group, keep: Iterable[int]):
    """Hard edit: keeps only the `keep` channels of `group` in every member; shapes shrink."""
    keep = check_keep(group, keep)
    if group.kind == "layer":
        if keep.size == 0:
            drop_layers(model, [group.layer])
        return model
    for member in group.members:
        node = node_at(model, member.path)
        idx = _entries(member, keep)
        _slice_variable(getattr(node, member.variable), idx, member.axis)
        if node.mask is not None:  # Linear masks share the kernel's axes; channel masks have one
            _slice_variable(node.mask, idx, member.axis if isinstance(node, L.Linear) else 0)
        if isinstance(node, L.Linear) and member.axis == 1 and node.bias is not None:
            _slice_variable(node.bias, idx, 0)  # a bias follows its output channels
    return model


def drop_layers(model, indices: Iterable[int]):
    """Hard edit: deletes decoder layers (indices into the current `model.layers`)."""
    n = len(model.layers)
    indices = sorted(set(int(i) for i in indices))
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserError(f"layer indices {bad} out of range: the model has {n} layers")
    origin = getattr(model, "source_layers", None) or tuple(range(n))
    for i in reversed(indices):
        del model.layers[i]
    # which source layer each remaining layer was (saved in checkpoints; distillation pairs by it)
    model.source_layers = tuple(int(o) for i, o in enumerate(origin) if i not in set(indices))
    return model


def _dead_channels(model, group: Group) -> np.ndarray:
    """Channels of `group` whose every entry in every Linear member is masked (bool `[size]`)."""
    dead = np.ones(group.size, dtype=bool)
    for member in group.members:
        node = node_at(model, member.path)
        if not isinstance(node, L.Linear):
            continue
        if node.mask is None:
            return np.zeros(group.size, dtype=bool)
        keep = np.moveaxis(np.asarray(node.mask[...]), member.axis, 0)
        alive = keep.reshape(group.size, -1).any(axis=1)
        dead &= ~alive
    return dead


def compact(model):
    """Turns structured masks into real slices: layers whose o_proj and down_proj are fully
    masked are dropped, and KV groups, query heads (when balanced across KV groups) and MLP
    neurons whose weights are all masked in every member are taken out. Exact: the removed
    channels contributed nothing."""
    dead_layers = [i for i, layer in enumerate(model.layers)
                   if all(lin.mask is not None and not np.asarray(lin.mask[...]).any()
                          for lin in residual_writers(layer))]
    drop_layers(model, dead_layers)
    for i in range(len(model.layers)):
        for kind in ("kv", "q", "mlp"):
            group = find_group(model, kind, i)
            dead = _dead_channels(model, group)
            if not dead.any():
                continue
            try:
                take(model, group, np.flatnonzero(~dead))
            except UserError:  # unbalanced query heads or nothing left: keep them as masks
                continue
    return model


def fold_masks(model, *, compact_structured: bool = True):
    """Bakes every mask into its weights and removes it (for export and fast inference).

    With `compact_structured` (the default), structured masks are first made real slices by
    `compact`, so a soft-pruned model comes out with the shapes a hard edit gives.

    Linear masks become exact zeros in the kernel. Hidden-channel masks (embedding and norms)
    cannot be folded into values (they change the norms' means), so they are applied by slicing
    the `embed` group, which is exact; they must agree across the embedding and every norm.
    """
    if compact_structured:
        compact(model)
    channel_masks = {m.name: np.asarray(node_at(model, m.path).mask[...])
                     for m in find_group(model, "embed").members
                     if not isinstance(node_at(model, m.path), L.Linear)
                     and node_at(model, m.path).mask is not None}
    if channel_masks:
        first = next(iter(channel_masks.values()))
        group = find_group(model, "embed")
        n_holders = sum(not isinstance(node_at(model, m.path), L.Linear) for m in group.members)
        if len(channel_masks) != n_holders or any((v != first).any() for v in channel_masks.values()):
            raise UserError("hidden-channel masks differ between the embedding and the norms; "
                            "mask the whole embed group (mask_group) before folding")
        take(model, group, np.flatnonzero(first))
        for m in group.members:
            node = node_at(model, m.path)
            if not isinstance(node, L.Linear):
                node.mask = None
    for _, node in nnx.iter_modules(model):
        if isinstance(node, L.Linear) and node.mask is not None:
            if node.bias is not None:  # wholly masked output channels emit no bias (Linear)
                node.bias.set_value(node.effective_bias())
            node.kernel.set_value(node.effective_kernel())
            node.mask = None
    return model
