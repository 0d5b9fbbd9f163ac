"""The pruning stage of Sheared LLaMA: weights, gates and multipliers in one jitted, sharded step.

Sheared LLaMA (Xia et al., arXiv 2310.06694; princeton-nlp/LLM-Shearing `train.py`,
`scripts/pruning.sh`) trains the model and its L0 module jointly:
`loss = LM cross-entropy (under sampled gates) + the Lagrangian` (`recovery.l0`), with three
optimizer groups:
- weights (`nnx.Param`): AdamW at `lr` (reference 1e-4);
- gates (`MaskLogit`): Adam at `mask_lr` (reference `lag_lr = 1.0`), `log_alpha` clamped to
  `[ln 0.01, ln 100]` after every update (the reference clamps before every forward);
- multipliers (`LagrangeMultiplier`): the same Adam at `-lambda_lr` (reference `-lag_lr`), i.e.
  gradient *ascent* on the Lagrangian.
One warmup-cosine multiplier scales all three learning rates (composer's scheduler scales every
parameter group; the paper: 10% warmup, cosine to 0.1), betas (0.9, 0.95), no weight decay, and
one global-norm clip over all gradients (composer's gradient clipping sees every parameter). The
groups are an `optax.multi_transform` keyed by the state's variable type (`nnx.split` by type).
The Lagrangian's target sparsities warm up linearly over `target_warmup` of the steps (the
paper: 640 of 3200).

The step runs under the recovery trainer's mesh rules (`recovery.sharding`): the model's arrays
and their Adam moments are placed by their channel spaces, the gates and multipliers are
replicated, the batch is split over (data, fsdp); gradient accumulation is a `lax.scan` over
micro-batches, each with its own gate sample (as the reference's micro-batches). Without a
given mesh every device holds a share of the weights (`sharding.auto_sizes`: FSDP over `embed`
as far as the micro-batch splits, tensor parallelism over heads and MLP on the rest), so the
weights, their gradients and Adam moments spread over the devices. In a multi-process run
(`--distributed`) every process runs the same steps on the same global batch, each feeding its
devices' shards; the trained weights and gates come back whole into every process.

Every step reports the LM loss, the Lagrangian, each structure's expected size and sparsity, its
target and multipliers, and the expected total parameter count.

Over data domains (`train_masks(..., domains=PruningDomains)`, `recovery.sheared_domains`) the
batches come from recovery's dynamic batch loading: each example's domain is drawn by the current
weights, and every `update_every` steps (the reference's 50) each domain's held-out loss under the
deterministic gates at the current expected sizes moves the weights (`recovery.dynamic`).

Example:
    >>> cfg = ShearConfig(steps=300, batch_size=8, seqlen=256)
    >>> result = train_masks(model, l0, cfg, windows.train)
    >>> result.history[-1]["expected_params"], result.tokens_per_second
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxprune import interrupt, multihost
from nnxprune import data as data_lib
from nnxprune.algorithms import hard_concrete as hc
from nnxprune.errors import UserError
from nnxprune.recovery import sharding as sh
from nnxprune.recovery.l0 import L0Module
from nnxprune.recovery.losses import _logits, next_token_ce
from nnxprune.recovery.shear_model import masked_hidden
from nnxprune.variables import LagrangeMultiplier, MaskLogit


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShearConfig:
    """Training settings of the pruning stage (defaults: the reference's rates)."""

    steps: int = 3200
    batch_size: int = 32
    grad_accum: int = 1
    seqlen: int = 4096
    lr: float = 1e-4
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    warmup: float = 0.1  # fraction of steps of linear learning-rate warmup
    target_warmup: float = 0.2  # fraction of steps over which the target sparsity ramps up
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seqlen" else 1):
                raise UserError(f"sheared {name} must be a positive integer, got {v!r}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"sheared batch_size {self.batch_size} is not divisible by grad_accum "
                            f"{self.grad_accum}")
        for name in ("lr", "mask_lr", "lambda_lr", "clip_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UserError(f"sheared {name} must be a number >= 0, got {v!r}")
        for name in ("warmup", "target_warmup", "min_lr_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise UserError(f"sheared {name} must be a fraction in [0, 1], got {v!r}")

    @property
    def warmup_steps(self) -> int:
        return min(int(round(self.warmup * self.steps)), self.steps - 1)

    @property
    def target_warmup_steps(self) -> int:
        return int(round(self.target_warmup * self.steps))


@dataclasses.dataclass
class ShearResult:
    """Per-step statistics of the pruning stage and its speed (with domains, the dynamic batch
    loading report: `PruningDomains.report()`)."""

    history: list[dict[str, float]]
    tokens: int
    seconds: float
    compile_seconds: float
    tokens_per_second: float
    mesh: dict[str, int]
    domains: dict[str, Any] | None = None


def multiplier(cfg: ShearConfig) -> optax.Schedule:
    """The learning-rate multiplier of all groups: linear warmup, cosine to `min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, cfg.warmup_steps, max(cfg.steps, 1),
                                              end_value=cfg.min_lr_ratio)


def make_tx(cfg: ShearConfig) -> optax.GradientTransformation:
    """Clip all, then AdamW for weights, Adam for gates, Adam *ascent* for the multipliers."""
    mult = multiplier(cfg)

    def adam(rate: float, sign: float):
        return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                           optax.scale_by_schedule(lambda s: sign * rate * mult(s)))

    groups = {"weights": adam(cfg.lr, -1.0), "masks": adam(cfg.mask_lr, -1.0),
              "lambdas": adam(cfg.lambda_lr, +1.0)}
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.multi_transform(groups, {k: k for k in groups}))
    return optax.chain(*parts)


@dataclasses.dataclass
class _Split:
    model_gdef: Any
    l0_gdef: Any
    params: dict[str, Any]  # {"weights", "masks", "lambdas"}
    const: dict[str, Any]  # {"model", "l0"}


def _split(model, l0: L0Module) -> _Split:
    model_gdef, weights, model_rest = nnx.split(model, nnx.Param, ...)
    l0_gdef, masks, lambdas, l0_rest = nnx.split(l0, MaskLogit, LagrangeMultiplier, ...)
    return _Split(model_gdef, l0_gdef, {"weights": weights, "masks": masks, "lambdas": lambdas},
                  {"model": model_rest, "l0": l0_rest})


def build_step(parts: _Split, tx, cfg: ShearConfig) -> Callable:
    """`step(params, opt_state, const, batch [A, B/A, T], step) -> (params, opt_state, stats)`."""
    warmup = cfg.target_warmup_steps

    def loss_fn(params, const, tokens, key, step):
        model = nnx.merge(parts.model_gdef, params["weights"], const["model"])
        l0 = nnx.merge(parts.l0_gdef, params["masks"], params["lambdas"], const["l0"])
        ce = next_token_ce(_logits(model, masked_hidden(model, l0.sample(key), tokens)), tokens)
        lag, stats = l0.lagrangian(step, warmup)
        return ce + lag, {"ce": ce, "lagrangian": lag, **stats}

    def train_step(params, opt_state, const, batch, step):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        base = jax.random.fold_in(jax.random.key(cfg.seed), step)

        def micro(acc, xs):
            tokens, i = xs
            (loss, aux), grads = grad_fn(params, const, tokens, jax.random.fold_in(base, i), step)
            return jax.tree.map(jnp.add, acc, grads), (loss, aux)

        if cfg.grad_accum == 1:
            (loss, aux), grads = grad_fn(params, const, batch[0], jax.random.fold_in(base, 0), step)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (loss, aux) = jax.lax.scan(micro, zeros, (batch, jnp.arange(cfg.grad_accum)))
            grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
            loss, aux = jnp.mean(loss), jax.tree.map(jnp.mean, aux)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "masks": jax.tree.map(hc.constrain, params["masks"])}
        l0 = nnx.merge(parts.l0_gdef, params["masks"], params["lambdas"], const["l0"])
        stats = {"loss": loss, **aux, "expected_params": l0.expected_params(),
                 "grad_norm": optax.tree.norm(grads), "lr": cfg.lr * multiplier(cfg)(step)}
        stats.update({f"expected_{k}": v for k, v in l0.expected_sizes().items()})
        return params, opt_state, stats

    return train_step


def build_eval(parts: _Split) -> Callable:
    """`eval_ce(params, const, tokens [B, T]) -> next-token CE` of the model under deterministic
    gates at the current expected sizes (`sheared_domains.current_gates`, the reference's
    evaluation during pruning)."""
    from nnxprune.recovery.sheared_domains import current_gates

    def eval_ce(params, const, tokens):
        model = nnx.merge(parts.model_gdef, params["weights"], const["model"])
        l0 = nnx.merge(parts.l0_gdef, params["masks"], params["lambdas"], const["l0"])
        return next_token_ce(_logits(model, masked_hidden(model, current_gates(l0), tokens)), tokens)

    return eval_ce


def _mesh_sizes(cfg: ShearConfig, mesh: dict[str, int] | None) -> dict[str, int]:
    sizes = dict(mesh or sh.auto_sizes(cfg.batch_size // cfg.grad_accum))
    sizes = {a: int(sizes.get(a, 1)) for a in sh.AXES}
    split = sizes["data"] * sizes["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % split:
        raise UserError(f"sheared micro-batch {cfg.batch_size // cfg.grad_accum} is not divisible "
                        f"by the {split} devices of the (data, fsdp) axes")
    return sizes


@dataclasses.dataclass
class _Compiled:
    params: Any
    opt_state: Any
    const: Any
    step: Callable  # jitted build_step
    eval: Callable  # jitted build_eval
    batch_sh: Any  # [A, B/A, T] training batches
    heldout_sh: Any  # [B, T] held-out batches


def _compile(model, l0: L0Module, cfg: ShearConfig, the_mesh) -> _Compiled:
    """The state placed on the mesh by the recovery rules, and the jitted step and evaluation."""
    parts = _split(model, l0)
    tx = make_tx(cfg)
    opt_state = tx.init(parts.params)
    specs = sh.param_specs(model, the_mesh)
    p_sh = sh.state_shardings(parts.params, specs, the_mesh)
    o_sh = sh.state_shardings(opt_state, specs, the_mesh)
    c_sh = sh.state_shardings(parts.const, specs, the_mesh)
    rep = sh.replicated(the_mesh)
    batch_sh = sh.batch_sharding(the_mesh, 3, leading=1)
    heldout_sh = sh.batch_sharding(the_mesh, 2)
    step_jit = jax.jit(build_step(parts, tx, cfg), in_shardings=(p_sh, o_sh, c_sh, batch_sh, rep),
                       out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))
    eval_jit = jax.jit(build_eval(parts), in_shardings=(p_sh, c_sh, heldout_sh), out_shardings=rep)
    return _Compiled(params=sh.put(parts.params, p_sh, copy=True),
                     opt_state=sh.put(opt_state, o_sh, copy=True),
                     const=sh.put(parts.const, c_sh, copy=True), step=step_jit, eval=eval_jit,
                     batch_sh=batch_sh, heldout_sh=heldout_sh)


def train_masks(model, l0: L0Module, cfg: ShearConfig, train_windows: np.ndarray | None, *,
                mesh: dict[str, int] | None = None, progress: bool = True,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                domains=None) -> ShearResult:
    """Runs the pruning stage on `model` and `l0` in place (module docstring).

    `train_windows [N, seqlen]` are packed token windows; `mesh` the (data, fsdp, tensor) sizes
    (default `sharding.auto_sizes` of the micro-batch: the weights spread over every device).
    `on_step(step, stats)` sees every step's statistics. `domains` (a
    `sheared_domains.PruningDomains`) replaces `train_windows` with dynamic batch loading: the
    batches are drawn by its current domain weights, which it updates after its due steps from
    each domain's held-out loss (`ShearResult.domains` is its report).
    """
    from tqdm.auto import tqdm

    cfg.check()
    sizes = _mesh_sizes(cfg, mesh)
    if domains is None and train_windows.shape[1] != cfg.seqlen:
        raise UserError(f"windows have {train_windows.shape[1]} tokens, sheared seqlen is {cfg.seqlen}")
    run = _compile(model, l0, cfg, sh.make_mesh(sizes))
    params, opt_state = run.params, run.opt_state
    iterator = domains if domains is not None else data_lib.train_iterator(
        train_windows, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed)

    def evaluate(batches):  # one domain's held-out batches, the current params
        ce = float(np.mean([float(run.eval(params, run.const, sh.put(b, run.heldout_sh)))
                            for b in batches]))
        return {"ce": ce, "loss": ce}

    if domains is not None:
        domains.start(evaluate)
    history, seconds, compile_s = [], 0.0, 0.0
    bar = tqdm(total=cfg.steps, desc="sheared pruning", unit="step", leave=False,
               disable=not (progress and multihost.is_primary()))  # process 0's bar alone
    for step in range(cfg.steps):
        interrupt.stop_if_requested()  # a safe point: between steps
        batch = sh.put(next(iterator), run.batch_sh)
        t0 = time.perf_counter()
        params, opt_state, stats = run.step(params, opt_state, run.const, batch,
                                            jnp.asarray(step, jnp.int32))
        stats = {k: float(v) for k, v in stats.items()}
        dt = time.perf_counter() - t0
        compile_s, seconds = (dt, seconds) if step == 0 else (compile_s, seconds + dt)
        if not np.isfinite(stats["loss"]):
            raise FloatingPointError(f"sheared loss is not finite at step {step + 1}: {stats}")
        history.append({"step": step + 1, **stats, "seconds": dt})
        if domains is not None and domains.due(step + 1):
            domains.update(evaluate, step + 1)  # the weights of the next batches
        if on_step is not None:
            on_step(step + 1, stats)
        bar.update(1)
        bar.set_postfix(ce=f"{stats['ce']:.3f}", params=f"{stats['expected_params'] / 1e6:.1f}M")
    bar.close()
    # multi-process: gathered, whole in every process (the fold and the report read them)
    nnx.update(model, multihost.local_copy(params["weights"]))
    nnx.update(l0, *multihost.local_copy((params["masks"], params["lambdas"])))
    tokens = cfg.steps * cfg.batch_size * cfg.seqlen
    timed = (cfg.steps - 1) * cfg.batch_size * cfg.seqlen
    return ShearResult(history=history, tokens=tokens, seconds=seconds + compile_s,
                       compile_seconds=compile_s,
                       tokens_per_second=timed / seconds if seconds > 0 else float("nan"),
                       mesh=sizes, domains=domains.report() if domains is not None else None)
