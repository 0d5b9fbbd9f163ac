"""Sheared LLaMA's pruning stage as a transform: learn masks toward a named target, then fold.

Sheared LLaMA (Xia, Gao, Zeng and Chen, arXiv 2310.06694; code princeton-nlp/LLM-Shearing)
prunes to a *given* architecture: hard-concrete gates on layers, heads, MLP neurons and hidden
channels are trained jointly with the weights, Lagrange multipliers push each structure's
expected size to the target (`recovery.l0`, `recovery.shear_train`), and the deterministic gates
are folded into the weights, leaving exactly the target shapes (`recovery.shear_model.fold`).
The paper then continues pretraining the pruned model (a `[recovery]` section).

The target names any of `layers`, `heads` (query heads per layer), `kv_heads`, `intermediate`
(MLP neurons per layer) and `hidden`; a dimension left out is not pruned. Grouped-query
attention: `heads` divisible by the source's KV heads prunes query heads within every KV group;
otherwise whole KV groups go (`recovery.l0`, "Grouped-query attention"). `check` validates the
target against the config (wider than the source, heads that do not divide over the KV groups,
sizes that are not reachable: one UserError) and predicts the target config, so
`nnxprune prune RECIPE --check` prints the shapes and parameter count without loading weights.

Training text comes from `dataset` (c4, wikitext2 or a local file), packed into `seqlen`
windows; the run reports every step's LM loss, Lagrangian and expected parameter count.

Or, as the paper does, from data domains with dynamic batch loading (`recovery.sheared_domains`,
reusing recovery's `recovery.dynamic`): `[prune.domains.NAME]` tables and `reference` /
`[prune.reference]` take exactly the keys of `[recovery.domains.NAME]` and `[recovery.reference]`
(source, url / category filters, initial `weight`, `reference_loss`, a scaling-law fit; the same
refusal of dynamic loading without a reference unless `reference = "initial-loss"`); `dataset`
is then unused. The batches are drawn by the current domain weights, which move every
`update_every` steps (the reference's 50; and after the last step) by each domain's held-out
loss over `eval_batches` batches; `dynamic = false` keeps them fixed. The report's `domains`
entry has the trajectory and `final_weights`, which become the initial weights of a
`[recovery]` continued pretraining with dynamic loading over the same domains
(`recovery.sheared_handoff`); without domains here, that recovery starts from its own weights.

The mask training runs sharded over every device (`recovery.shear_train`): without `mesh`, FSDP
over as many devices as split the micro-batch and tensor parallelism on the rest
(`sharding.auto_sizes`); `mesh = { fsdp = 2, tensor = 4 }` sets the (data, fsdp, tensor) sizes
as `[recovery.mesh]` does (`recovery.mesh_config`: axes left out at data -1, fsdp 1, tensor 1;
the sizes multiply to the device count; checked before any work).

Example (a recipe step; the paper's Llama-2-7B -> 2.7B setting):
    [[prune]]
    kind = "sheared"
    layers = 32
    heads = 20
    intermediate = 6912
    hidden = 2560
    steps = 3200
    batch_size = 32
    seqlen = 4096
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from nnxprune.errors import UserError
from nnxprune.models.llama import LlamaConfig
from nnxprune.recovery import mesh_config, sheared_domains
from nnxprune.recovery.l0 import L0Module, ShearPlan, ShearTarget, gap_to_target
from nnxprune.recovery.shear_model import fold
from nnxprune.recovery.shear_train import ShearConfig, ShearResult, train_masks
from nnxprune.transforms.base import Context, Transform, register


@register("sheared")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sheared(Transform):
    """Learned structured masks toward a target shape, then the fold (module docstring)."""

    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    hidden: int | None = None
    steps: int = 3200
    batch_size: int = 32
    grad_accum: int = 1
    seqlen: int = 4096
    lr: float = 1e-4
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    warmup: float = 0.1
    target_warmup: float = 0.2
    min_lr_ratio: float = 0.1
    seed: int = 0
    dataset: str = "c4"
    mesh: dict[str, int] | None = None  # (data, fsdp, tensor) sizes; None: sharding.auto_sizes
    domains: dict[str, Any] | None = None  # [prune.domains.NAME]: dynamic batch loading
    reference: Any = None  # [prune.reference] fit or "initial-loss" (recovery.scaling_law)
    dynamic: bool | None = None  # None: true with domains
    update_every: int = sheared_domains.UPDATE_EVERY
    eval_batches: int = 2  # held-out batches (batch_size / grad_accum windows) per domain
    kind: ClassVar[str]

    def __post_init__(self):  # unknown axis names and bad sizes: refused when the recipe is read
        if self.mesh is not None:
            object.__setattr__(self, "mesh", mesh_config.from_table(self.mesh, "sheared mesh"))
        parsed = sheared_domains.validate(self.domains, self.reference, self.dynamic,
                                          self.update_every, self.eval_batches)
        for name, value in zip(("domains", "reference", "dynamic"), parsed):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.domains is not None:
            out["domains"] = {n: {k: v for k, v in dataclasses.asdict(d).items() if v is not None}
                              for n, d in self.domains.items()}
        if self.reference is not None:
            out["reference"] = (self.reference.source if self.reference.source != "scaling-law"
                                else dataclasses.asdict(self.reference))
        return out

    def schedule(self) -> sheared_domains.DomainSchedule | None:
        """The stage's data domains (None: `dataset` alone)."""
        if self.domains is None:
            return None
        return sheared_domains.DomainSchedule(
            domains=self.domains, reference=self.reference, dynamic=self.dynamic,
            update_every=self.update_every, eval_batches=self.eval_batches, steps=self.steps,
            batch_size=self.batch_size, grad_accum=self.grad_accum, seqlen=self.seqlen,
            seed=self.seed)

    def mesh_sizes(self) -> dict[str, int] | None:
        """`mesh` on this run's devices (UserError when it does not fit them or the micro-batch);
        None: the automatic mesh."""
        if self.mesh is None:
            return None
        return mesh_config.resolve_for_batch(self.mesh, self.batch_size // self.grad_accum,
                                             "sheared mesh")

    @property
    def target(self) -> ShearTarget:
        return ShearTarget(layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                           intermediate=self.intermediate, hidden=self.hidden)

    def training(self) -> ShearConfig:
        """The training settings: every `ShearConfig` field this transform also has (the recipe
        keys), the others at their defaults."""
        return ShearConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ShearConfig)
                              if f.name in _FIELDS})

    def plan(self, config: LlamaConfig) -> ShearPlan:
        return self.target.resolve(config)

    def check(self, config: LlamaConfig) -> LlamaConfig:
        plan = self.plan(config)
        self.training().check()
        if self.seqlen > config.max_position_embeddings:
            raise UserError(f"sheared seqlen {self.seqlen} is beyond the model's context of "
                            f"{config.max_position_embeddings} tokens")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise UserError(f"sheared dataset must be a name or a file, got {self.dataset!r}")
        self.mesh_sizes()  # against the devices, before any work
        return plan.target_config(config)

    def __call__(self, model, ctx: Context):
        from nnxprune import data as data_lib

        self.check(model.config)
        if ctx.tokenizer is None:
            raise UserError("sheared pruning needs a tokenizer for its training text")
        if self.domains is not None:  # dynamic batch loading over the domains
            domains = sheared_domains.PruningDomains.build(self.schedule(), ctx.tokenizer,
                                                           ctx.data_dir)
            _, record = prune_to_target(model, self.target, self.training(), None,
                                        mesh=self.mesh_sizes(), progress=ctx.progress,
                                        domains=domains)
            ctx.log(self.kind, data=domains.describe(), **record)
            return model
        data_lib.check_source(self.dataset, ctx.data_dir)
        windows = data_lib.load_windows(ctx.tokenizer, self.dataset, seqlen=self.seqlen,
                                        train_windows=self.steps * self.batch_size,
                                        heldout_windows=0, data_dir=ctx.data_dir)
        _, record = prune_to_target(model, self.target, self.training(), windows.train,
                                    mesh=self.mesh_sizes(), progress=ctx.progress)
        ctx.log(self.kind, dataset=self.dataset, source=windows.source,
                train_windows=int(len(windows.train)), **record)
        return model


_FIELDS = {f.name for f in dataclasses.fields(Sheared)}


def prune_to_target(model, target: ShearTarget, cfg: ShearConfig, train_windows, *,
                    mesh: dict[str, int] | None = None, progress: bool = True, on_step=None,
                    domains=None) -> tuple[ShearResult, dict]:
    """Learns the masks of `target` on `model` with `cfg` over `train_windows` (or the batches of
    `domains`, a `sheared_domains.PruningDomains`), folds them, and returns `(the training
    result, a JSON-friendly record)`; `model` ends at the target shapes."""
    plan = target.resolve(model.config)
    l0 = L0Module(plan, rngs=nnx.Rngs(cfg.seed))
    result = train_masks(model, l0, cfg, train_windows, mesh=mesh, progress=progress,
                         on_step=on_step, domains=domains)
    last = result.history[-1]
    sizes = {n: last[f"expected_{n}"] for n in plan.types}
    zs = l0.deterministic()
    fold(model, zs, plan)
    record = {
        "target": dataclasses.asdict(plan.target), "head_mode": plan.head_mode,
        "masked": list(plan.types), "target_params": plan.params(),
        "expected_params": last["expected_params"], "expected_sizes": sizes,
        "expected_gap": gap_to_target(plan, sizes),
        "expected_params_per_step": [h["expected_params"] for h in result.history],
        "ce_per_step": [h["ce"] for h in result.history],
        "steps": cfg.steps, "tokens": result.tokens, "seconds": result.seconds,
        "compile_seconds": result.compile_seconds, "tokens_per_second": result.tokens_per_second,
        "mesh": result.mesh,
    }
    if result.domains is not None:  # the weight trajectory and the final weights (the hand-off)
        record["domains"] = result.domains
    return result, record
