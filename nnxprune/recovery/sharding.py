"""Sharding with `jax.sharding`: a (data, fsdp, tensor) mesh and rules from channel spaces to axes.

Every array of the model has logical axes read from the modules themselves: a `Linear` kernel
`[in, out]` is `(in_space, out_space)` (the names the dependency graph uses: `embed`, `q_heads`,
`kv_heads`, `mlp`, `vocab`), its mask the same, LoRA factors `(in_space, None)` and
`(None, out_space)`, the embedding `(vocab, embed)`, norm scales `(embed,)`. `RULES` maps each
logical name to mesh axes:

    batch    -> (data, fsdp)   sequences split over data-parallel and FSDP devices
    embed    -> fsdp           parameters (and their optimizer moments) split FSDP-style
    q_heads, kv_heads, mlp, vocab -> tensor   Megatron-style tensor parallelism

A dimension that does not split evenly into whole units (a head is `head_dim` columns) over its
axes is replicated instead (after surgery, 9 heads do not split over 2 devices). Optimizer state
follows the parameter it belongs to (matched by path), so Adam moments are sharded like the
weights; scalars (step counts) are replicated. The same code runs on 1 device, on 8 simulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and across hosts after
`jax.distributed.initialize()`.

Example:
    >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    >>> specs = param_specs(model, mesh)           # {("layers", 0, "mlp", "up_proj", "kernel"): P("fsdp", "tensor"), ...}
    >>> state = jax.device_put(state, state_shardings(state, specs, mesh))
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nnxprune.layers import EMBED, Embed, Linear, RMSNorm

AXES = ("data", "fsdp", "tensor")
BATCH = "batch"
RULES: dict[str, tuple[str, ...] | str | None] = {
    BATCH: ("data", "fsdp"),
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def auto_sizes(rows: int, devices: int | None = None) -> dict[str, int]:
    """The mesh of gradient-based pruning when none is given (the Taylor pass, Sheared LLaMA's
    mask training): every device holds a share of the weights, so a model larger than one
    device fits. FSDP (`embed`) on as many devices as split a batch of `rows` sequences evenly,
    tensor parallelism (heads, MLP) on the rest; no pure data parallelism (it would replicate
    the weights). 8 devices, 4 rows: fsdp 4 x tensor 2; 1 device: (1, 1, 1)."""
    n = jax.device_count() if devices is None else int(devices)
    fsdp = math.gcd(n, max(int(rows), 1))
    return {"data": 1, "fsdp": fsdp, "tensor": n // fsdp}


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh with axes `AXES` of the given sizes (their product must be the device count)."""
    shape = tuple(int(sizes[a]) for a in AXES)
    devices = jax.devices() if devices is None else devices
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, "
                         f"have {len(devices)}")
    try:
        from jax.sharding import AxisType

        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    except (ImportError, TypeError):  # older jax: no axis types
        return Mesh(np.asarray(devices).reshape(shape), AXES)


def _key_name(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def path_of(keypath) -> tuple:
    """A jax key path as a plain tuple of names and indices (a Variable's `.value` dropped)."""
    names = tuple(_key_name(e) for e in keypath)
    return names[:-1] if names and names[-1] == "value" else names


def logical_axes(model) -> dict[tuple, tuple[tuple[str | None, int], ...]]:
    """`{variable path: ((logical name, unit), ...)}` for every array of the model."""
    out: dict[tuple, tuple] = {}
    for path, node in nnx.iter_modules(model):
        path = tuple(path)
        if isinstance(node, Linear):
            kernel = ((node.in_space, node.in_unit), (node.out_space, node.out_unit))
            out[path + ("kernel",)] = kernel
            out[path + ("mask",)] = kernel
            if hasattr(node, "lora_a"):
                out[path + ("lora_a",)] = (kernel[0], (None, 1))
                out[path + ("lora_b",)] = ((None, 1), kernel[1])
        elif isinstance(node, Embed):
            out[path + ("embedding",)] = ((node.in_space, 1), (node.out_space, 1))
            out[path + ("mask",)] = ((node.out_space, 1),)
        elif isinstance(node, RMSNorm):
            out[path + ("scale",)] = ((EMBED, 1),)
            out[path + ("mask",)] = ((EMBED, 1),)
    return out


def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape: tuple[int, ...], logical, mesh: Mesh, rules=RULES) -> P:
    """The PartitionSpec for an array of `shape` with `logical` axes; uneven splits replicate."""
    parts = []
    used: set[str] = set()
    for size, (name, unit) in zip(shape, logical):
        axes = rules.get(name) if name is not None else None
        if axes is None:
            parts.append(None)
            continue
        flat = (axes,) if isinstance(axes, str) else tuple(axes)
        n = _axis_size(mesh, flat)
        if n == 1 or (size // unit) % n or size % unit or used & set(flat):
            parts.append(None)  # a size-1 axis adds nothing; uneven units replicate
            continue
        used |= set(flat)
        parts.append(axes)
    return P(*parts)


def param_specs(model, mesh: Mesh, rules=RULES) -> dict[tuple, P]:
    """`{variable path: PartitionSpec}` for every array the rules know."""
    state = nnx.state(model)
    shapes = {path_of(kp): leaf.shape for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    return {path: spec_for(shapes[path], axes, mesh, rules)
            for path, axes in logical_axes(model).items() if path in shapes}


def _lookup(path: tuple, shape, specs: Mapping[tuple, P]) -> P:
    """The spec of the parameter `path` ends with (optimizer state nests params under its own
    prefix, e.g. `opt_state/1/0/mu/<param path>`); replicated when none matches the shape."""
    for i in range(len(path)):
        spec = specs.get(path[i:])
        if spec is not None:
            return spec if len(spec) <= len(shape) else P()
    return P()


def state_shardings(state, specs: Mapping[tuple, P], mesh: Mesh):
    """A NamedSharding for every leaf of `state` (model, optimizer or LoRA state)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: NamedSharding(mesh, _lookup(path_of(kp), np.shape(leaf), specs)), state)


def batch_sharding(mesh: Mesh, ndim: int = 2, *, leading: int = 0) -> NamedSharding:
    """Sharding of a token batch: `leading` unsharded axes (micro-batches), then the batch axis
    over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading), RULES[BATCH], *([None] * (ndim - leading - 1))))


def put(tree, shardings, *, copy: bool = False):
    """Host or single-device arrays onto their shardings, in one process or many. In a
    multi-process run every process holds the whole value (the same program on the same data)
    and contributes the shards its devices own (an array already global, as a stream's batch,
    stays as it is). `copy` forces fresh buffers (for donation)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings, may_alias=False if copy else None)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # global already
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe_specs(state, specs: Mapping[tuple, P]) -> dict[str, str]:
    """`{"layers.0.mlp.up_proj.kernel": "P('fsdp', 'tensor')", ...}` for reports and tests."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = path_of(kp)
        out[".".join(map(str, path))] = str(_lookup(path, np.shape(leaf), specs))
    return out


def placement(state) -> dict[str, str]:
    """`{"layers.0.mlp.up_proj.kernel": "PartitionSpec('fsdp', 'tensor')", ...}`: where each array
    of a placed `state` lives ("?" for one without a NamedSharding)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        out[".".join(map(str, path_of(kp)))] = str(spec) if spec is not None else "?"
    return out


def place_model(model, mesh: Mesh) -> None:
    """Puts every array of `model` on `mesh` by the rules, in place. In a multi-process run the
    arrays become global, each process holding its shards (Orbax then saves from all of them)."""
    state = nnx.state(model)
    shardings = state_shardings(state, param_specs(model, mesh), mesh)

    def put(x, s):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x  # RNG keys (LoRA dropout) stay where they are
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    nnx.update(model, jax.tree.map(put, state, shardings))


def initialize_distributed(cluster=None, *, label: str = "nnxprune", echo=print) -> None:
    """Joins the multi-process JAX runtime (`--distributed`): `cluster` (`multihost.Cluster`:
    coordinator, process count and id, each None to leave it to the cluster environment: SLURM,
    Open MPI, TPU pod slices) is passed to `jax.distributed.initialize`, with CPU collectives over
    gloo and a bounded heartbeat (`multihost.join`). No cluster to join is a one-line UserError."""
    from nnxprune import multihost

    multihost.join(cluster or multihost.Cluster(), label=label, echo=echo)
