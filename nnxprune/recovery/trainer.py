"""The recovery trainer: one jitted, sharded step for every recipe (distill, LoRA, pretrain).

Pieces, each small:

- `make_tx`: optax AdamW with linear warmup + cosine or linear decay and global-norm clipping;
  with `keep_best`, the run ends with the best held-out evaluation's weights (`best.py`).
- `nnx.Optimizer(model, tx, wrt=...)`: `nnx.Param` (full training) or `nnx.LoRAParam` (adapters
  only). `Mask` variables are not parameters, so the optimizer never sees them, and the forward
  multiplies every kernel by its mask: a pruned weight stays exactly zero.
- The step: the state is split once (trainable / dropout keys / everything else), placed on the
  mesh with the channel-space rules (`sharding.py`), and `jax.jit` runs micro-batches through a
  `lax.scan` (gradient accumulation), averages gradients and applies one optimizer update. With
  `compute_dtype = "bfloat16"` the forward and backward run on a bf16 copy of the weights while
  the optimizer updates the float32 master weights (the cast is inside the differentiated
  function, so gradients arrive in float32).
- The loss is a strategy object (`losses.py`): the step calls `compute_loss` and runs the frozen
  teacher only when the strategy asks for it.
- Around the step (`_loop`): held-out evaluation every `eval_every` steps and a tqdm bar; the
  log folder (`logdir.py`) gets metrics as JSONL, a PNG loss curve at the end, and Orbax
  checkpoints (keep-last-N) holding the model and optimizer state plus the grain iterator state,
  so a resumed run continues with exactly the batches, and therefore the losses, of an
  uninterrupted one.

Example:
    >>> cfg = RecoveryConfig(kind="distill", steps=100, batch_size=8, seqlen=512)
    >>> result = train(student, cfg, tokenizer=tok, teacher=dense, log_dir="out/train")
    >>> result.losses[-1], result.tokens_per_second
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxprune import data as data_lib
from nnxprune import interrupt, multihost
from nnxprune.data.training import instruction_windows
from nnxprune.errors import UserError
from nnxprune.recovery import lora as lora_lib
from nnxprune.recovery import sharding as sh
from nnxprune.recovery.best import BestKeeper
from nnxprune.recovery.config import RecoveryConfig
from nnxprune.recovery.dynamic import DomainLoader
from nnxprune.recovery.logdir import LogDir
from nnxprune.recovery.lr_schedule import lr_schedule
from nnxprune.recovery import pairs as pairs_lib
from nnxprune.recovery.losses import LossStrategy, next_token_ce, strategy_for


@dataclasses.dataclass
class TrainResult:
    """What a recovery run did: per-step losses, held-out evaluations, speed, where logs went."""

    steps: int
    losses: list[float]
    evals: list[dict[str, float]]
    tokens: int
    seconds: float
    compile_seconds: float
    tokens_per_second: float
    mesh: dict[str, int]
    strategy: dict[str, Any]
    data: dict[str, Any]
    resumed_from: int | None = None
    lora_paths: list[str] = dataclasses.field(default_factory=list)
    lora_merged: int = 0
    metrics_path: str | None = None
    plot_path: str | None = None
    domains: dict[str, Any] | None = None  # dynamic batch loading: `DomainLoader.report()`
    best: dict[str, Any] | None = None  # keep_best: {"step", "loss"} of the weights kept
    # where the final arrays live: {"params" | "optimizer": {path: PartitionSpec text}} (not in
    # reports: hundreds of entries)
    placement: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("placement")
        d["first_loss"] = self.losses[0] if self.losses else None
        d["final_loss"] = self.losses[-1] if self.losses else None
        return d


# -- optimizer -------------------------------------------------------------------------------------
def schedule(cfg: RecoveryConfig) -> optax.Schedule:
    """Linear warmup to `lr`, cosine or linear decay to `lr * min_lr_ratio` (`lr_schedule.py`)."""
    return lr_schedule(cfg)


def make_tx(cfg: RecoveryConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup-cosine schedule."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(cfg), b1=0.9, b2=cfg.beta2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def _cast(tree, dtype):
    def f(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(f, tree)


# host or single-device arrays onto their (possibly multi-host) shardings; `copy=True` for donated
# state (it must not alias the model's or a teacher's arrays)
_place = sh.put


# -- the step --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Parts:
    """The split model: graphdefs (train: dropout on; eval: off) and states."""

    train_gdef: Any
    eval_gdef: Any
    trainable: Any
    keys: Any
    const: Any


def _split(model, wrt) -> _Parts:
    lora_lib.set_training(model, True)
    train_gdef, trainable, keys, const = nnx.split(model, wrt, lora_lib.DropoutKey, ...)
    lora_lib.set_training(model, False)
    eval_gdef = nnx.split(model, wrt, lora_lib.DropoutKey, ...)[0]
    return _Parts(train_gdef, eval_gdef, trainable, keys, const)


def _dropout_keys(keys, seed: int, index):
    leaves, treedef = jax.tree.flatten(keys)
    base = jax.random.fold_in(jax.random.key(seed), index)
    new = [jax.random.key_data(jax.random.fold_in(base, i)).astype(jnp.uint32)
           for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, new)


def build_steps(parts: _Parts, opt_gdef, strategy: LossStrategy, teacher_gdef, *,
                compute_dtype, grad_accum: int, seed: int, sched):
    """`(train_step, eval_step)` as pure functions of the states (jitted by the caller)."""

    def outputs(gdef, trainable, keys, const, teacher_state, tokens):
        model = nnx.merge(gdef, _cast(trainable, compute_dtype), keys, _cast(const, compute_dtype))
        out = strategy.student_forward(model, tokens)
        t_out = None
        if strategy.needs_teacher:
            teacher = nnx.merge(teacher_gdef, _cast(teacher_state, compute_dtype))
            t_out = jax.lax.stop_gradient(strategy.teacher_forward(teacher, tokens))
        return out, t_out

    def loss_fn(trainable, keys, const, teacher_state, tokens):
        out, t_out = outputs(parts.train_gdef, trainable, keys, const, teacher_state, tokens)
        return strategy.compute_loss(out, t_out, tokens)

    def train_step(trainable, opt_state, const, teacher_state, batch, step):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(acc, xs):
            tokens, i = xs
            keys = _dropout_keys(parts.keys, seed, step * grad_accum + i)
            (loss, metrics), grads = grad_fn(trainable, keys, const, teacher_state, tokens)
            acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
            return acc, (loss, metrics)

        if grad_accum == 1:  # no loop: a scan of one would add a zeroed accumulator and a copy
            keys = _dropout_keys(parts.keys, seed, step)
            (losses, metrics), grads = grad_fn(trainable, keys, const, teacher_state, batch[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grads, (losses, metrics) = jax.lax.scan(micro, zeros, (batch, jnp.arange(grad_accum)))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        model = nnx.merge(parts.train_gdef, trainable, parts.keys, const)
        opt = nnx.merge(opt_gdef, opt_state)
        opt.update(model, grads)
        stats = {"loss": jnp.mean(losses), "grad_norm": optax.tree.norm(grads), "lr": sched(step)}
        stats.update({k: jnp.mean(v) for k, v in metrics.items()})
        return nnx.state(model, opt.wrt), nnx.state(opt), stats

    def eval_step(trainable, const, teacher_state, tokens):
        out, t_out = outputs(parts.eval_gdef, trainable, parts.keys, const, teacher_state, tokens)
        loss, metrics = strategy.compute_loss(out, t_out, tokens)
        return {"loss": loss, "ce": next_token_ce(out.logits, tokens), **metrics}

    return train_step, eval_step


# -- the loop --------------------------------------------------------------------------------------
def _windows(cfg: RecoveryConfig, windows, tokenizer, data_dir) -> data_lib.TokenWindows:
    if windows is None and cfg.prompt_template:
        if tokenizer is None:
            raise UserError("recovery needs a tokenizer (or pre-tokenized windows)")
        windows = instruction_windows(tokenizer, cfg.dataset, seqlen=cfg.seqlen,
                                      train_windows=cfg.steps * cfg.batch_size,
                                      heldout_windows=cfg.eval_batches * cfg.micro_batch)
    if windows is None:
        if tokenizer is None:
            raise UserError("recovery needs a tokenizer (or pre-tokenized windows)")
        windows = data_lib.load_windows(
            tokenizer, cfg.dataset, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
            heldout_windows=cfg.eval_batches * cfg.micro_batch, data_dir=data_dir)
    if windows.train.shape[1] != cfg.seqlen:
        raise UserError(f"windows have {windows.train.shape[1]} tokens, recovery.seqlen is {cfg.seqlen}")
    return windows


@dataclasses.dataclass
class _Session:
    """The state of one run placed on the mesh, and its jitted train and held-out steps."""

    state: dict[str, Any]  # {"trainable", "opt"}: donated to each step, checkpointed
    shardings: dict[str, Any]  # the same keys
    const: Any
    teacher_state: Any
    train_jit: Any
    eval_jit: Any
    batch_sh: Any
    eval_batch_sh: Any

    def step(self, batch, step: int) -> dict[str, float]:
        """One optimizer step on `batch` (already placed); returns its statistics."""
        trainable, opt, stats = self.train_jit(self.state["trainable"], self.state["opt"],
                                               self.const, self.teacher_state, batch,
                                               jnp.asarray(step, jnp.int32))
        self.state = {"trainable": trainable, "opt": opt}
        return {k: float(v) for k, v in stats.items()}

    def evaluate(self, heldout: list) -> dict[str, float]:
        """Mean held-out metrics over the batches of `heldout`."""
        sums: dict[str, float] = {}
        for tokens in heldout:
            batch = _place(jnp.asarray(tokens), self.eval_batch_sh)
            for k, v in self.eval_jit(self.state["trainable"], self.const, self.teacher_state,
                                      batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(heldout) for k, v in sums.items()}


@dataclasses.dataclass
class _Layout:
    """The split model and optimizer, and the NamedSharding of every part (`_shardings`)."""

    parts: _Parts
    opt_gdef: Any
    opt_state: Any
    trainable_sh: Any
    const_sh: Any
    opt_sh: Any
    teacher_gdef: Any = None
    teacher_state: Any = None
    teacher_sh: Any = None


def _shardings(model, optimizer, wrt, mesh, teacher=None) -> _Layout:
    """Splits `model` (trainable by `wrt` / dropout keys / the rest), `optimizer` and a frozen
    `teacher`, each sharded by the channel-space rules (optimizer state by path). The trainer and
    the memory plan without hardware (`plan_distributed`) both place the state by this."""
    parts = _split(model, wrt)
    opt_gdef, opt_state = nnx.split(optimizer)
    specs = sh.param_specs(model, mesh)
    out = _Layout(parts, opt_gdef, opt_state, *(sh.state_shardings(s, specs, mesh)
                                                for s in (parts.trainable, parts.const, opt_state)))
    if teacher is not None:
        out.teacher_gdef, out.teacher_state = nnx.split(teacher)
        out.teacher_sh = sh.state_shardings(out.teacher_state, sh.param_specs(teacher, mesh), mesh)
    return out


def _jit_steps(layout: _Layout, strategy: LossStrategy, cfg: RecoveryConfig, mesh):
    """`(train_jit, eval_jit)`: the steps of `layout` jitted with its shardings, the train step
    donating the trainable and optimizer state."""
    train_step, eval_step = build_steps(
        layout.parts, layout.opt_gdef, strategy, layout.teacher_gdef,
        compute_dtype=jnp.dtype(cfg.compute_dtype), grad_accum=cfg.grad_accum, seed=cfg.seed,
        sched=schedule(cfg))
    rep, tr, opt = sh.replicated(mesh), layout.trainable_sh, layout.opt_sh
    const, teacher = layout.const_sh, layout.teacher_sh
    train_jit = jax.jit(train_step, in_shardings=(tr, opt, const, teacher,
                                                  sh.batch_sharding(mesh, 3, leading=1), rep),
                        out_shardings=(tr, opt, rep), donate_argnums=(0, 1))
    eval_jit = jax.jit(eval_step, in_shardings=(tr, const, teacher, sh.batch_sharding(mesh, 2)),
                       out_shardings=rep)
    return train_jit, eval_jit


def _session(model, teacher, strategy: LossStrategy, cfg: RecoveryConfig, wrt, mesh) -> _Session:
    """Builds the optimizer, splits and places the state by the channel-space rules (optimizer
    state by path) and jits the steps."""
    optimizer = nnx.Optimizer(model, make_tx(cfg), wrt=wrt)
    layout = _shardings(model, optimizer, wrt, mesh, teacher if strategy.needs_teacher else None)
    parts = layout.parts
    trainable = _place(parts.trainable, layout.trainable_sh, copy=True)  # donated to the step
    opt_state = _place(layout.opt_state, layout.opt_sh, copy=True)
    const = _place(parts.const, layout.const_sh)
    parts.trainable = parts.const = None  # the steps keep only the placed copies alive
    parts.keys = _place(parts.keys, sh.state_shardings(parts.keys, {}, mesh))
    teacher_state = None
    if layout.teacher_state is not None:
        teacher_state = _place(layout.teacher_state, layout.teacher_sh)
    train_jit, eval_jit = _jit_steps(layout, strategy, cfg, mesh)
    return _Session(state={"trainable": trainable, "opt": opt_state},
                    shardings={"trainable": layout.trainable_sh, "opt": layout.opt_sh},
                    const=const, teacher_state=teacher_state,
                    train_jit=train_jit, eval_jit=eval_jit,
                    batch_sh=sh.batch_sharding(mesh, 3, leading=1),
                    eval_batch_sh=sh.batch_sharding(mesh, 2))


@dataclasses.dataclass
class _Progress:
    """What the loop measured."""

    losses: list[float] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    seconds: float = 0.0  # of the steps after the first (which compiles)


def _loop(session: _Session, cfg: RecoveryConfig, iterator, heldout, logs: LogDir, *, start: int,
          end: int, progress: bool, keeper: BestKeeper | None = None) -> _Progress:
    """Steps `start` to `end`, with held-out evaluations, metrics and checkpoints on the way."""
    from tqdm.auto import tqdm

    done = _Progress()

    def evaluate(step: int) -> None:
        if heldout:
            row = {"step": step, "split": "heldout", **(
                heldout.evaluate(session.evaluate, step) if isinstance(heldout, DomainLoader)
                else session.evaluate(heldout))}
            logs.log(row)
            done.evals.append(row)
            if keeper is not None:
                keeper.observe(row, session.state["trainable"])

    tokens_per_step = cfg.batch_size * cfg.seqlen
    if start == 0 and cfg.eval_every:
        evaluate(0)
    bar = tqdm(total=end - start, desc=f"recovery {cfg.kind}", unit="step", disable=not progress,
               leave=False)
    t_loop = time.perf_counter()
    for step in range(start, end):
        batch = _place(jnp.asarray(next(iterator)), session.batch_sh)
        t0 = time.perf_counter()
        stats = session.step(batch, step)
        dt = time.perf_counter() - t0
        if step == start:
            done.compile_seconds = dt  # the first call compiles
        else:
            done.seconds += dt
        if not np.isfinite(stats["loss"]):
            raise FloatingPointError(f"recovery loss is not finite at step {step + 1}: {stats}")
        done.losses.append(stats["loss"])
        logs.log({"step": step + 1, "split": "train", **stats, "tokens": (step + 1) * tokens_per_step,
                  "elapsed": time.perf_counter() - t_loop})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.steps:
            evaluate(step + 1)
        stopping = interrupt.requested() is not None  # a signal: checkpoint this step, then stop
        logs.save(step + 1, session.state, iterator, final=step + 1 == cfg.steps or stopping)
        interrupt.stop_if_requested()
    bar.close()
    if end == cfg.steps and (cfg.eval_every or heldout):
        evaluate(cfg.steps)
    return done


def train(model, cfg: RecoveryConfig, *, tokenizer=None, windows: data_lib.TokenWindows | None = None,
          teacher=None, data_dir=None, log_dir=None, progress: bool = True,
          stop_after: int | None = None, echo=None) -> TrainResult:
    """Trains `model` in place with `cfg`; returns a `TrainResult`.

    `windows` (packed token windows) default to `cfg.dataset` tokenized with `tokenizer`; with
    `cfg.domains`, `{domain: TokenWindows}` defaulting to the domains' sources (`recovery.dynamic`).
    `teacher` is the frozen model a distillation learns from. `log_dir` receives metrics.jsonl,
    loss.png and, with `checkpoint_every`, Orbax checkpoints; a run finding checkpoints there
    resumes from the latest. `stop_after` ends the loop early (as an interruption would) without
    changing the schedule. Everything that can fail on bad input fails before the first step.
    """
    primary = multihost.is_primary()  # a multi-process run: process 0 alone prints and shows bars
    say, progress = (echo if primary and echo else (lambda *a: None)), progress and primary
    sizes = cfg.check(model.config)
    # checks the teacher, pairs layers by source layer, attaches projections (recovery.pairs)
    strategy = pairs_lib.prepare(strategy_for(cfg), model, teacher, seed=cfg.seed)
    mesh = sh.make_mesh(sizes)
    if cfg.domains:  # dynamic batch loading: the loader is the iterator and the held-out set
        iterator = heldout = DomainLoader.build(cfg, windows, tokenizer, data_dir)
    elif cfg.stream is not None:  # documents streamed from files, each process its rows
        windows = iterator = data_lib.open_stream(cfg, tokenizer, data_dir,
                                                  sh.batch_sharding(mesh, 3, leading=1))
        heldout = iterator.heldout
    else:
        windows = _windows(cfg, windows, tokenizer, data_dir)
        iterator = data_lib.train_iterator(windows.train, batch_size=cfg.batch_size,
                                           grad_accum=cfg.grad_accum, seed=cfg.seed)
        heldout = data_lib.heldout_batches(windows.heldout, cfg.micro_batch, cfg.eval_batches)
    lora_paths: list[str] = []
    if cfg.kind == "lora":
        lora_paths = lora_lib.add_lora(model, cfg.lora, seed=cfg.seed)
    wrt = nnx.LoRAParam if cfg.kind == "lora" else nnx.Param
    session = _session(model, teacher, strategy, cfg, wrt, mesh)

    logs = LogDir(log_dir, checkpoint_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    restored, start = logs.restore(session.state, session.shardings, iterator)
    if restored is not None:
        session.state = {"trainable": restored["trainable"], "opt": restored["opt"]}
        say(f"resume    from step {start} ({logs.checkpoints})")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    keeper = BestKeeper(enabled=cfg.keep_best)
    try:
        with interrupt.handled():  # SIGINT / SIGTERM / SIGHUP: stop after a step's checkpoint
            done = _loop(session, cfg, iterator, heldout, logs, start=start, end=end,
                         progress=progress, keeper=keeper)
    finally:
        logs.close()

    trainable = session.state["trainable"]
    placement = {"params": sh.placement(trainable), "optimizer": sh.placement(session.state["opt"])}
    # the trained state back into the model object (multi-process: gathered, whole in each process)
    nnx.update(model, keeper.final(trainable, finished=end == cfg.steps))  # keep_best: the best
    pairs_lib.detach(model)  # distillation's projections are never part of the student
    lora_lib.set_training(model, False)
    merged = 0
    if cfg.lora is not None and cfg.lora.merge and end == cfg.steps:
        merged = lora_lib.merge_lora(model)
    logs.plot_losses(f"recovery ({cfg.kind})")
    domains = heldout.finish(logs.path) if cfg.domains else None
    logs.record()  # domains.json and its plot are in the folder now
    tokens_per_step = cfg.batch_size * cfg.seqlen
    timed_steps = max(end - start - 1, 0)
    return TrainResult(
        steps=end, losses=done.losses, evals=done.evals, tokens=(end - start) * tokens_per_step,
        seconds=done.seconds + done.compile_seconds, compile_seconds=done.compile_seconds,
        tokens_per_second=(timed_steps * tokens_per_step / done.seconds) if done.seconds > 0
        else float("nan"),
        mesh=sizes, strategy=strategy.describe(),
        data=(heldout if cfg.domains else windows).describe(),
        domains=domains, best=keeper.report(),
        resumed_from=start if restored is not None else None, lora_paths=lora_paths,
        lora_merged=merged, metrics_path=str(logs.metrics) if logs.metrics else None,
        plot_path=str(logs.plot) if logs.plot and logs.plot.exists() else None, placement=placement)
