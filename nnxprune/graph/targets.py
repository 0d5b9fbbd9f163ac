"""Which projections a method acts on: one rule for every method (pruning, calibration, LoRA).

A projection is named by its dotted module path, like `layers.3.self_attn.q_proj` or
`layers.3.mlp.down_proj`. The candidates are the seven projections of every decoder layer (the
embedding and the output head are never targets). `targets` and `ignore` are regular expressions
*searched* in the full name (`re.search`), so `mlp` picks every MLP projection, `layers\\.(0|1)\\.`
the first two layers and `down_proj$` one projection kind; anchor them (`^...$`) for an exact
match. A pattern that selects nothing is a `UserError`, never a silent no-op.

Example:
    >>> select_projections(["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"], targets="mlp")
    ['layers.0.mlp.up_proj']
"""

from __future__ import annotations

import re

from flax import nnx

from nnxprune.errors import UserError
from nnxprune.layers import Linear

# The projections of one decoder layer, in the order methods visit them.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# q, k, v, o, gate, up and down of every layer; embeddings and lm_head are never targets.
DEFAULT_TARGETS = r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$"


def check_regex(label: str, pattern: str | None) -> None:
    """A `UserError` naming `label` when `pattern` is not a valid regular expression."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"{label} regex {pattern!r} is invalid: {e}") from None


def select_projections(names: list[str], targets: str | None = None,
                       ignore: str | None = None, *, where: str = "") -> list[str]:
    """The names (like `layers.3.self_attn.q_proj`) a method acts on, in the given order.

    `targets` / `ignore` are regexes searched in the full name; by default q, k, v, o, gate, up
    and down of every layer are targets. A regex that matches nothing is a UserError; `where`
    prefixes the option names in its message (`"recovery.lora."` -> `recovery.lora.targets`).
    """
    check_regex(f"{where}targets", targets)
    check_regex(f"{where}ignore", ignore)
    chosen = [n for n in names if re.search(DEFAULT_TARGETS, n)
              and (targets is None or re.search(targets, n))]
    if targets is not None and not chosen:
        raise UserError(f"{where}targets regex {targets!r} matches no projection (names look like "
                        f"'layers.0.self_attn.q_proj', 'layers.0.mlp.down_proj')")
    if ignore is not None:
        kept = [n for n in chosen if not re.search(ignore, n)]
        if len(kept) == len(chosen):
            raise UserError(f"{where}ignore regex {ignore!r} matches no targeted projection")
        chosen = kept
    if not chosen:
        raise UserError(f"no projection left after {where}targets / {where}ignore")
    return chosen


def layer_projection_names(num_layers: int) -> list[str]:
    """Every candidate name of a model with `num_layers` decoder layers (no model needed)."""
    return [f"layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS]


def projection_names(model, targets: str | None = None, ignore: str | None = None) -> list[str]:
    """`select_projections` over the model's decoder-layer Linears."""
    names = [".".join(map(str, path)) for path, node in nnx.iter_modules(model)
             if isinstance(node, Linear) and path and path[0] == "layers"]
    return select_projections(names, targets, ignore)


def split_name(name: str) -> tuple[int, str]:
    """`"layers.3.mlp.up_proj"` -> `(3, "mlp.up_proj")`."""
    _, index, rest = name.split(".", 2)
    return int(index), rest
