"""Sheared LLaMA's L0 module: learned masks toward a target architecture, and their Lagrangian.

Sheared LLaMA (Xia et al., arXiv 2310.06694; princeton-nlp/LLM-Shearing,
`llmshearing/models/l0_module.py`) learns hard-concrete gates (`algorithms.hard_concrete`) on
four structures of a Llama and drives their expected sizes to a *given* target shape:

- `layer [L]`: scales both the attention and the MLP output of a decoder layer (the reference
  names it `layer` and hands it to the blocks as `head_layer_z` and `mlp_z`);
- `head [L, H]`: each query head's output before `o_proj`;
- `intermediate [L, F]`: each MLP neuron (the output of `up_proj`);
- `hidden [D]`: hidden channels of the embedding output, every block output and every norm
  output, with RMSNorm's mean over the kept channels only.

Only the structures the target names get a mask (the reference's `pruning_modules`); a named
structure whose target equals the source still gets one (target sparsity 0), as the reference's
2.7B run does for its 32 layers.

Grouped-query attention (the reference is multi-head only). A target names query heads per layer
(`heads`) and optionally KV heads (`kv_heads`; source KV heads `K`, group size `G = H / K`):
- *query* mode, `kv_heads = K`: one gate per query head `[L, H]`; the fold keeps the same number
  `heads / K` in every KV group (the `q` group of `nnxprune.graph`), KV heads all stay;
- *group* mode, `heads / kv_heads = G`: one gate per KV group `[L, K]` scaling its `G` query heads;
  the fold removes whole KV groups (k, v and their query heads: the `kv` group). Multi-head
  attention (`G = 1`, Llama-2) is this mode, and it is the reference's per-head mask there.
Without `kv_heads`, query mode is used when `heads` divides over the `K` groups, else group mode
when `heads` is a multiple of `G`; a target that is neither (or that shrinks both the group
count and the group size) is one UserError.

Expected sizes. `P(z > 0)` of each gate is its expected "kept" score; the expected parameter
count multiplies the scores of coupled structures (layer x head, layer x neuron, hidden x
everything) as the reference's `get_expected_num_params`, but counts every parameter of our
Llama (q, k, v, o with GQA, gate/up/down, norms, the embedding and an untied head), so at the
target it equals the folded model's parameter count exactly. The reference counts only the
attention and MLP matrices ("prunable model size").

The Lagrangian (the reference with a target model): for each mask type `m`,
`mean_rows(lambda1_m (s_m - t_m) + lambda2_m (s_m - t_m)^2)` with `s_m` the expected sparsity
per row (per layer for heads and neurons) and `t_m` warmed up linearly from 0; the multipliers
start at 0 and are trained by gradient ascent (`LagrangeMultiplier`).

Example:
    >>> plan = ShearTarget(layers=22, heads=6, intermediate=1024, hidden=448).resolve(model.config)
    >>> l0 = L0Module(plan, rngs=nnx.Rngs(0))
    >>> zs = l0.sample(jax.random.key(1))            # {"layer": [L], "head": [L, H], ...}
    >>> loss, stats = l0.lagrangian(step=10, warmup_steps=60)
    >>> l0.expected_params()                         # float, every step's report
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.algorithms import hard_concrete as hc
from nnxprune.errors import UserError
from nnxprune.models.llama import LayerShape, LlamaConfig
from nnxprune.variables import LagrangeMultiplier, MaskLogit

MASK_TYPES = ("layer", "head", "intermediate", "hidden")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dims:
    """The prunable sizes of a uniform Llama."""

    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    hidden: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShearPlan:
    """A resolved target: source and target sizes, the head mode, the masked structures."""

    source: Dims
    target: Dims
    head_mode: str | None  # "query" | "group" | None (heads not pruned)
    types: tuple[str, ...]  # the masked structures, in MASK_TYPES order
    head_dim: int
    vocab: int
    tied: bool

    @property
    def group_size(self) -> int:
        return self.source.heads // self.source.kv_heads

    def mask_shape(self, name: str) -> tuple[int, ...]:
        s = self.source
        return {"layer": (s.layers,), "intermediate": (s.layers, s.intermediate),
                "hidden": (s.hidden,),
                "head": (s.layers, s.heads if self.head_mode == "query" else s.kv_heads)}[name]

    def keep(self, name: str) -> int:
        """Gates kept per row of mask `name` (per KV group for query-mode heads)."""
        t = self.target
        if name == "head":
            return t.heads // t.kv_heads if self.head_mode == "query" else t.kv_heads
        return {"layer": t.layers, "intermediate": t.intermediate, "hidden": t.hidden}[name]

    def target_sparsity(self, name: str) -> float:
        size = self.mask_shape(name)[-1]
        kept = self.target.heads if name == "head" and self.head_mode == "query" else self.keep(name)
        return 1.0 - kept / size

    def target_config(self, config: LlamaConfig) -> LlamaConfig:
        t = self.target
        shape = LayerShape(num_heads=t.heads, num_kv_heads=t.kv_heads, intermediate_size=t.intermediate)
        return dataclasses.replace(config, hidden_size=t.hidden, layers=(shape,) * t.layers)

    def params(self, dims: Dims | None = None) -> int:
        """Exact parameter count of a uniform Llama of `dims` (default: the target)."""
        d = dims or self.target
        per_layer = 2 * d.hidden + d.hidden * self.head_dim * 2 * (d.heads + d.kv_heads) \
            + 3 * d.hidden * d.intermediate
        return self.vocab * d.hidden * (1 if self.tied else 2) + d.hidden + d.layers * per_layer


def _check_size(name: str, value: int | None, source: int, minimum: int = 1) -> int:
    if value is None:
        return source
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"sheared target {name} must be an integer, got {value!r}")
    if value > source:
        raise UserError(f"sheared target {name} = {value} is wider than the source's {source}")
    if value < minimum:
        raise UserError(f"sheared target {name} = {value} must be at least {minimum}")
    return value


def _head_mode(heads: int, kv: int | None, src: Dims) -> tuple[str, int]:
    """`(mode, target kv heads)` for `heads` query heads (module docstring, GQA)."""
    g = src.heads // src.kv_heads
    if kv is None:
        if heads % src.kv_heads == 0:
            kv = src.kv_heads
        elif heads % g == 0:
            kv = heads // g
        else:
            raise UserError(
                f"sheared target heads = {heads} is not reachable: the source has {src.heads} "
                f"query heads in {src.kv_heads} KV groups of {g}; keep a multiple of {src.kv_heads} "
                f"(query heads pruned within every group) or of {g} (whole KV groups pruned)")
    if heads % kv:
        raise UserError(f"sheared target heads = {heads} do not divide over kv_heads = {kv} KV groups")
    if kv == src.kv_heads:
        return "query", kv
    if heads // kv == g:
        return "group", kv
    raise UserError(f"sheared target heads = {heads}, kv_heads = {kv}: either keep all {src.kv_heads} "
                    f"KV heads (prune query heads within groups) or keep {g} query heads per KV "
                    f"head (prune whole groups); shrinking both is not supported")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShearTarget:
    """The target architecture a recipe names; None leaves that dimension unpruned."""

    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    hidden: int | None = None

    def resolve(self, config: LlamaConfig) -> ShearPlan:
        """Validates against the source `config` (UserError) and returns the plan."""
        if not config.layers:
            raise UserError("sheared pruning needs a model with decoder layers")
        if not config.is_uniform:
            raise UserError("sheared pruning needs a model whose layers all have one shape "
                            "(put the sheared step first)")
        s0 = config.layers[0]
        src = Dims(layers=config.num_layers, heads=s0.num_heads, kv_heads=s0.num_kv_heads,
                   intermediate=s0.intermediate_size, hidden=config.hidden_size)
        fields = {"layer": "layers", "head": "heads", "intermediate": "intermediate", "hidden": "hidden"}
        names = [n for n in MASK_TYPES if getattr(self, fields[n]) is not None]
        if self.kv_heads is not None and self.heads is None:
            raise UserError("sheared target kv_heads needs heads (query heads per layer)")
        if not names:
            raise UserError("sheared target names nothing: give layers, heads, intermediate "
                            "and/or hidden")
        layers = _check_size("layers", self.layers, src.layers)
        heads = _check_size("heads", self.heads, src.heads)
        inter = _check_size("intermediate", self.intermediate, src.intermediate)
        hidden = _check_size("hidden", self.hidden, src.hidden)
        mode, kv = None, src.kv_heads
        if self.heads is not None:
            kv = _check_size("kv_heads", self.kv_heads, src.kv_heads)
            mode, kv = _head_mode(heads, self.kv_heads, src)
        target = Dims(layers=layers, heads=heads, kv_heads=kv, intermediate=inter, hidden=hidden)
        return ShearPlan(source=src, target=target, head_mode=mode, types=tuple(names),
                         head_dim=config.head_dim, vocab=config.vocab_size,
                         tied=config.tie_word_embeddings)


class L0Module(nnx.Module):
    """The gates' `log_alpha` (`MaskLogit`) and multipliers (`LagrangeMultiplier`, `[2]` per
    type: lambda1, lambda2) of a `ShearPlan`. Kept apart from the model, which stays a Llama."""

    def __init__(self, plan: ShearPlan, *, rngs: nnx.Rngs):
        self.plan = plan
        for name in plan.types:
            la = hc.constrain(hc.init_log_alpha(rngs.params(), plan.mask_shape(name)))
            setattr(self, f"{name}_log_alpha", MaskLogit(la))
            setattr(self, f"{name}_lambda", LagrangeMultiplier(jnp.zeros((2,), jnp.float32)))

    def log_alpha(self, name: str) -> jax.Array:
        return getattr(self, f"{name}_log_alpha")[...]

    def constrain(self) -> None:
        """Clamps every `log_alpha` in place (the reference does it before every forward)."""
        for name in self.plan.types:
            var = getattr(self, f"{name}_log_alpha")
            var[...] = hc.constrain(var[...])

    def _expand(self, zs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Group-mode head gates `[L, K]` -> one per query head `[L, H]`."""
        if "head" in zs and self.plan.head_mode == "group":
            zs = {**zs, "head": jnp.repeat(zs["head"], self.plan.group_size, axis=-1)}
        return zs

    def sample(self, key: jax.Array) -> dict[str, jax.Array]:
        """Training gates: one hard-concrete sample per gate (shared by the whole batch)."""
        keys = jax.random.split(key, len(self.plan.types))
        return self._expand({n: hc.sample(k, self.log_alpha(n)) for n, k in zip(self.plan.types, keys)})

    def deterministic(self) -> dict[str, jax.Array]:
        """The final gates: the target number of largest soft scores per row, the rest 0
        (query-mode heads: per KV group, so every group keeps the same count)."""
        out = {}
        for name in self.plan.types:
            la = self.log_alpha(name)
            if name == "head" and self.plan.head_mode == "query":
                k = self.plan.source.kv_heads
                z = hc.deterministic(la.reshape(la.shape[0], k, -1), self.plan.keep(name))
                out[name] = z.reshape(la.shape)
            else:
                out[name] = hc.deterministic(la, self.plan.keep(name))
        return self._expand(out)

    def scores(self) -> dict[str, jax.Array]:
        """`P(z > 0)` of every gate."""
        return {n: hc.prob_nonzero(self.log_alpha(n)) for n in self.plan.types}

    def expected_sizes(self) -> dict[str, float | jax.Array]:
        """Expected kept units: layers, heads per layer (mean), neurons per layer (mean), hidden."""
        p, out = self.scores(), {}
        for name in self.plan.types:
            kept = p[name].sum(-1)
            if name == "head" and self.plan.head_mode == "group":
                kept = kept * self.plan.group_size  # query heads
            out[name] = jnp.mean(kept)
        return out

    def expected_params(self) -> jax.Array:
        """The expected parameter count of the model under the gates (module docstring)."""
        return expected_params(self.plan, self.scores())

    def lagrangian(self, step, warmup_steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(sum of the types' Lagrangian terms, {expected / target sparsity, lambdas})`."""
        total, stats = jnp.zeros((), jnp.float32), {}
        for name in self.plan.types:
            s = hc.expected_sparsity(self.log_alpha(name))
            t = hc.target_at(step, self.plan.target_sparsity(name), warmup_steps)
            lam = getattr(self, f"{name}_lambda")[...]
            total = total + hc.lagrangian(s, t, lam[0], lam[1])
            stats.update({f"expected_{name}_sparsity": jnp.mean(s), f"target_{name}_sparsity": t,
                          f"lambda1_{name}": lam[0], f"lambda2_{name}": lam[1]})
        return total, stats


def expected_params(plan: ShearPlan, p: dict[str, Any]) -> jax.Array:
    """Expected parameters from the gates' `P(z > 0)` `p` (missing types count as kept)."""
    src, dh = plan.source, plan.head_dim
    hidden = p["hidden"].sum() if "hidden" in p else jnp.float32(src.hidden)
    layer = p["layer"] if "layer" in p else jnp.ones((src.layers,), jnp.float32)
    if "head" in p and plan.head_mode == "group":
        attn = p["head"].sum(-1) * dh * (2 * plan.group_size + 2)
    elif "head" in p:
        attn = (2 * p["head"].sum(-1) + 2 * src.kv_heads) * dh
    else:
        attn = jnp.full((src.layers,), float((2 * src.heads + 2 * src.kv_heads) * dh))
    neurons = p["intermediate"].sum(-1) if "intermediate" in p else jnp.full((src.layers,),
                                                                            float(src.intermediate))
    per_layer = 2.0 + attn + 3.0 * neurons  # times the hidden width
    return hidden * (plan.vocab * (1 if plan.tied else 2) + 1 + jnp.sum(layer * per_layer))


def gap_to_target(plan: ShearPlan, sizes: dict[str, float]) -> dict[str, float]:
    """Relative gap `expected / target - 1` of each masked structure's expected size."""
    target = {"layer": plan.target.layers, "head": plan.target.heads,
              "intermediate": plan.target.intermediate, "hidden": plan.target.hidden}
    return {n: float(sizes[n]) / target[n] - 1.0 for n in plan.types if target[n] > 0
            and not math.isnan(float(sizes[n]))}
