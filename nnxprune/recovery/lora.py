"""LoRA adapters on chosen projections, trained alone, merged into the kernels without reviving
pruned weights (Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685;
used for recovery by LLM-Pruner, arXiv 2305.11627, and Wanda, arXiv 2306.11695).

`add_lora` replaces each matching `Linear` by a `LoRALinear`: the same kernel and mask plus
`lora_a [in, r]` and `lora_b [r, out]`, both `nnx.LoRAParam`, so an optimizer built with
`wrt=nnx.LoRAParam` trains the adapters only. `lora_b` starts at zero: the model's outputs do not
change until training moves it.

Initialization is PEFT's, the LoRA that LLM-Pruner's `post_training.py` uses (its bundled
`LLMPruner/peft/tuners/lora.py`, `reset_lora_parameters`, as in huggingface/peft):
`nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))` on the `[r, in]` weight, so fan_in =
in, gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and the bound gain * sqrt(3 / fan_in) = 1/sqrt(in):
`lora_a ~ U(-1/sqrt(in), 1/sqrt(in))` (variance 1 / (3 in)), `lora_b = 0`. `init = "he_uniform"`
keeps the earlier draw (Flax's `he_uniform`, bound sqrt(6/in), sqrt(6) = 2.45x larger) for
comparison only: with `B = 0` and Adam, the first updates of `B` have a fixed size, so the
merged update `A @ B` scales with `A`, a hidden multiplier on the learning rate.

Dropout (`LoRAConfig.dropout`, PEFT's `lora_dropout`, 0.05 in LLM-Pruner) acts on the adapter's
input only, `x @ W + s * (dropout(x) @ A) @ B`, and only while the trainer's step runs
(`set_training`); evaluation and merging see no dropout.

Masks hold here too. On a masked projection the adapter's update is masked in the forward,
`y = x @ ((W + s A B) * M)`, so training sees exactly the model that merging produces and
`merge_lora` gives the same outputs as the unmerged model; a pruned weight is never revived. The
price is that the low-rank update is materialised as a dense `[in, out]` matrix in each forward of
a masked projection (cheap next to the token matmul when tokens >> rank), and that the adapters
cannot put capacity back into pruned positions. Unmasked projections use the usual cheap path
`x @ W + s (x @ A) @ B`.

Which projections get adapters is the rule of the pruning methods (`graph.targets`): `targets`
and `ignore` are regexes searched in names like `layers.3.mlp.up_proj`, by default every q, k, v,
o, gate, up and down projection; the embedding and the output head never get one.

Example:
    >>> paths = add_lora(model, LoRAConfig(targets="mlp", rank=8))
    >>> opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
    >>> ...                                  # train
    >>> merge_lora(model)                    # plain Linears again, masks kept
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.layers import Linear
from nnxprune.recovery.config import LORA_INITS, LoRAConfig
from nnxprune.variables import ProjectionInput


class DropoutKey(nnx.Variable):
    """Raw PRNG key data `uint32[2]` for adapter dropout, set by the trainer for each micro-batch
    (derived from the seed and the step, so it is never checkpointed state)."""


def init_lora_a(key: jax.Array, in_features: int, rank: int, dtype, init: str = "peft") -> jax.Array:
    """`lora_a [in, rank]`: PEFT's `kaiming_uniform_(a=sqrt(5))`, U(+-1/sqrt(in)) (`"peft"`), or
    Flax's `he_uniform`, U(+-sqrt(6/in)) (`"he_uniform"`, the earlier draw, for comparison)."""
    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; known: {', '.join(LORA_INITS)}")
    bound = (1.0 if init == "peft" else 6.0 ** 0.5) / in_features ** 0.5
    return jax.random.uniform(key, (in_features, rank), dtype, -bound, bound)


class LoRALinear(Linear):
    """A `Linear` plus a low-rank update `scale * lora_a @ lora_b` (masked where the kernel is)."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float, key: jax.Array,
                 init: str = "peft"):
        super().__init__(base.in_features, base.out_features, in_space=base.in_space,
                         out_space=base.out_space, in_unit=base.in_unit, out_unit=base.out_unit,
                         param_dtype=base.kernel.dtype, kernel_init=nnx.initializers.zeros,
                         rngs=nnx.Rngs(0))
        self.kernel = nnx.Param(base.kernel[...])
        if base.mask is not None:
            self.mask = type(base.mask)(base.mask[...])
        if base.bias is not None:  # an optional bias (FLAP) is kept; `Linear.__call__` adds it
            self.bias = nnx.Param(base.bias[...])
        dtype = base.kernel.dtype
        self.lora_a = nnx.LoRAParam(init_lora_a(key, base.in_features, rank, dtype, init))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), dtype))
        self.scale = float(alpha) / rank
        self.dropout_rate = float(dropout)
        self.dropout_key = DropoutKey(jnp.zeros((2,), jnp.uint32))
        self.training = False  # static: dropout only while the trainer's step runs

    def delta(self) -> jax.Array:
        """The low-rank update `scale * A @ B` `[in, out]`, masked like the kernel."""
        d = (self.lora_a[...] @ self.lora_b[...]) * self.scale
        if self.mask is not None:
            d = jnp.where(self.mask[...], d, jnp.zeros((), d.dtype))
        return d

    def effective_kernel(self) -> jax.Array:
        kernel = self.kernel[...] + self.delta()
        if self.mask is not None:
            kernel = jnp.where(self.mask[...], kernel, jnp.zeros((), kernel.dtype))
        return kernel

    def _dropout(self, x: jax.Array) -> jax.Array:
        key = jax.random.wrap_key_data(self.dropout_key[...])
        keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), jnp.zeros((), x.dtype))

    def product(self, x: jax.Array) -> jax.Array:
        if self.record_inputs:
            self.sow(ProjectionInput, "inputs", x)
        dtype = self.kernel.dtype
        x = x.astype(dtype)
        dropout = self.training and self.dropout_rate > 0
        if self.mask is not None:
            if not dropout:  # one matmul with the merged, masked kernel
                return jnp.dot(x, self.effective_kernel())
            base = jnp.dot(x, Linear.effective_kernel(self))
            return base + jnp.dot(self._dropout(x), self.delta())
        base = jnp.dot(x, self.kernel[...])
        xa = self._dropout(x) if dropout else x
        return base + jnp.dot(jnp.dot(xa, self.lora_a[...]), self.lora_b[...]) * self.scale


def _parent_and_name(model, path: tuple):
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    return parent, path[-1]


def _set(model, path: tuple, module) -> None:
    parent, name = _parent_and_name(model, path)
    if isinstance(name, int):
        parent[name] = module
    else:
        setattr(parent, name, module)


def add_lora(model, cfg: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Wraps every decoder-layer `Linear` that `cfg.targets` / `cfg.ignore` select (and that has
    no adapter yet); returns their names.

    A regex that matches nothing is a `UserError` (a typo must not train nothing).
    """
    plain = {".".join(map(str, path)): (path, node) for path, node in nnx.iter_modules(model)
             if isinstance(node, Linear) and not isinstance(node, LoRALinear)
             and path and path[0] == "layers"}
    names = cfg.select(list(plain))
    key = jax.random.key(seed)
    for i, name in enumerate(names):
        path, node = plain[name]
        _set(model, path, LoRALinear(node, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                                     key=jax.random.fold_in(key, i), init=cfg.init))
    return names


def lora_modules(model) -> list[tuple[tuple, LoRALinear]]:
    return [(p, n) for p, n in nnx.iter_modules(model) if isinstance(n, LoRALinear)]


def set_training(model, training: bool) -> None:
    """Switches adapter dropout on or off (a static attribute: a new graphdef, a new trace)."""
    for _, node in lora_modules(model):
        node.training = training


def merge_lora(model) -> int:
    """Folds every adapter into its kernel (masked) and puts a plain `Linear` back; returns how
    many were merged. Outputs are unchanged up to float rounding; masks stay."""
    merged = lora_modules(model)
    for path, node in merged:
        plain = Linear(node.in_features, node.out_features, in_space=node.in_space,
                       out_space=node.out_space, in_unit=node.in_unit, out_unit=node.out_unit,
                       param_dtype=node.kernel.dtype, kernel_init=nnx.initializers.zeros,
                       rngs=nnx.Rngs(0))
        plain.kernel = nnx.Param(node.kernel[...] + node.delta())
        if node.mask is not None:
            plain.mask = type(node.mask)(node.mask[...])
        if node.bias is not None:
            plain.bias = nnx.Param(node.bias[...])
        _set(model, path, plain)
    return len(merged)
