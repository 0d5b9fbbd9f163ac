"""A device mesh named in a recipe: `[recovery.mesh]`, and the `mesh` of a Sheared LLaMA step.

Both take the sizes of the logical axes of `recovery.sharding` (`data`, `fsdp`, `tensor`), the
same way:

    [recovery.mesh]                    # or, in a [[prune]] step: mesh = { fsdp = 2, tensor = 4 }
    data = -1                          # data parallel; -1 takes all remaining devices
    fsdp = 1                           # FSDP: the weights split over `embed`
    tensor = 1                         # tensor parallel: heads, MLP neurons, vocabulary

An axis left out takes the default above; at most one axis may be -1; the sizes must multiply to
the device count (with -1: divide it), and the micro-batch must split over `data x fsdp`. Every
check is a one-line UserError before any work: an unknown axis name (with the nearest one), a
size that is not a positive integer or -1, a mesh that does not fit the devices.

Example:
    >>> sizes = from_table({"fsdp": 2, "tensor": 4}, "sheared mesh")  # {"data": -1, ...}
    >>> resolve(sizes, 8, "sheared mesh")           # {"data": 1, "fsdp": 2, "tensor": 4}
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from nnxprune.errors import UserError, nearest

AXES = ("data", "fsdp", "tensor")  # recovery.sharding.AXES, without importing jax
DEFAULTS = {"data": -1, "fsdp": 1, "tensor": 1}


def describe(sizes: Mapping[str, int]) -> str:
    """`(data=-1, fsdp=2, tensor=4)`."""
    return "(" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")"


def check_sizes(sizes: Mapping[str, Any], where: str) -> None:
    """Every size a positive integer or -1, at most one -1 (UserError naming `where`)."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise UserError(f"{where}.{name} must be a positive integer or -1, got {size!r}")
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise UserError(f"{where}: at most one axis can be -1")


def from_table(table: Any, where: str) -> dict[str, int]:
    """The sizes of a recipe's mesh table, the axes it leaves out at their defaults; unknown axis
    names and bad sizes are refused."""
    if not isinstance(table, Mapping):
        raise UserError(f"{where} must be a table of axis sizes ({', '.join(AXES)}), got {table!r}")
    for key in table:
        if key not in AXES:
            raise UserError(f"{where}: " + nearest(str(key), AXES, "mesh axis"))
    sizes = {a: table.get(a, DEFAULTS[a]) for a in AXES}
    check_sizes(sizes, where)
    return sizes


def resolve(sizes: Mapping[str, int], device_count: int, where: str) -> dict[str, int]:
    """Axis sizes for `device_count` devices, -1 filled (UserError when they do not fit)."""
    sizes = dict(sizes)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if device_count % fixed:
            raise UserError(f"{where} {describe(sizes)}: the fixed axes ({fixed} devices) "
                            f"do not divide the {device_count} available devices")
        return {k: (device_count // fixed if v == -1 else v) for k, v in sizes.items()}
    if fixed != device_count:
        raise UserError(f"{where} {describe(sizes)} needs {fixed} devices but "
                        f"{device_count} are available (set one axis to -1 to fill)")
    return sizes


def resolve_for_batch(sizes: Mapping[str, int], micro_batch: int, where: str,
                      device_count: int | None = None) -> dict[str, int]:
    """`resolve` on this run's devices (`jax.device_count()`: every process's, once the
    distributed runtime is joined), and the micro-batch must split over `data x fsdp`."""
    if device_count is None:
        import jax

        device_count = jax.device_count()
    out = resolve(sizes, device_count, where)
    split = out["data"] * out["fsdp"]
    if micro_batch % split:
        raise UserError(f"{where} {describe(out)}: the micro-batch of {micro_batch} sequences is "
                        f"not divisible by the {split} devices of the (data, fsdp) axes")
    return out
