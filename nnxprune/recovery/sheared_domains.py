"""Dynamic batch loading in Sheared LLaMA's pruning stage (Xia, Gao, Zeng and Chen, arXiv
2310.06694, section 2.2; princeton-nlp/LLM-Shearing `llmshearing/scripts/pruning.sh` with
`callbacks/dynamic_loading_callback.py`).

The reference runs the same dynamic-loading callback while it learns the masks as during continued
pretraining: seven RedPajama domains, initial proportions `[0.67, 0.045, 0.045, 0.02, 0.045,
0.025, 0.15]`, the scaling-law `target_loss` of the target size, `update_type = doremi`, an
evaluation every `eval_interval = 50ba` followed by the weight update, `eval_first = false`, and
`eval_target_model = false`. The final proportions of the pruning stage are the initial ones of
continued pretraining (`continue_pretrain.sh`: "final proportion of pruning"; our hand-off is
`recovery.sheared_handoff`).

Nothing here re-implements the update: the pruning stage drives `recovery.dynamic.DomainLoader`
(the sampler that draws each example's domain by the current weights, `update_weights`, the
references of `recovery.scaling_law` and the recorded history), with:
- `update_every` (the reference's 50): after steps `update_every, 2 update_every, ...` each
  domain's held-out cross-entropy is measured and the weights move by its excess over the
  reference loss. The reference's 3200 steps are a multiple of 50; when `steps` is not a multiple
  of `update_every`, the last step evaluates and updates too, so the weights handed on reflect the
  end of the stage.
- the evaluated model: the weights under deterministic gates at the *current* expected sizes
  (`current_gates`), the reference's evaluation mode with `eval_target_model = false`
  (`_deterministic_z`: per row, the `round(size - sum P(z > 0))` smallest soft scores are 0, the
  others keep `sigmoid(0.8 log_alpha / beta)`), not at the target sizes.
- references: the recipe's `reference_loss`, a scaling-law fit (`[prune.reference]`), or the
  explicit `reference = "initial-loss"`: the model's own held-out losses measured before the
  first step (the weights are not updated then). Dynamic loading with a domain that has none is
  refused, as in recovery. `"reference-model"` is refused here (there is no reference model in
  the pruning stage).

Example (a recipe step):
    [[prune]]
    kind = "sheared"
    layers = 24
    update_every = 50
    [prune.domains.news]
    source = "c4"
    category = "news"
    reference_loss = 3.9
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nnxprune.algorithms import hard_concrete as hc
from nnxprune.data.domains import DomainSpec, check_domains, load_domain_windows, parse_domains
from nnxprune.errors import UserError
from nnxprune.recovery.dynamic import DomainLoader
from nnxprune.recovery.scaling_law import ReferenceConfig, parse_reference
from nnxprune.recovery.sheared_handoff import flat_steps

UPDATE_EVERY = 50  # the reference's eval_interval in pruning.sh


@dataclasses.dataclass(frozen=True, kw_only=True)
class DomainSchedule:
    """A pruning stage's data over domains; the attribute names are those `DomainLoader` reads
    from a `RecoveryConfig`."""

    domains: dict[str, DomainSpec]
    reference: ReferenceConfig | None
    dynamic: bool
    update_every: int
    eval_batches: int
    steps: int
    batch_size: int
    grad_accum: int
    seqlen: int
    seed: int

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def _relabel(message: str) -> str:
    """`recovery.scaling_law`'s messages name `recovery.`; in a prune step the keys are `prune.`."""
    return message.replace("[recovery.", "[prune.").replace("recovery.", "prune.")


def validate(domains: Any, reference: Any, dynamic: Any, update_every: Any, eval_batches: Any
             ) -> tuple[dict[str, DomainSpec] | None, ReferenceConfig | None, bool | None]:
    """A sheared step's `domains`, `reference`, `dynamic` (UserError before any work, with
    recovery's rules); returns them parsed (`dynamic` None without domains)."""
    for name, value in (("update_every", update_every), ("eval_batches", eval_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"sheared {name} must be a positive integer, got {value!r}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise UserError(f"sheared dynamic must be true or false, got {dynamic!r}")
    if domains is None:
        if dynamic is not None or reference is not None:
            raise UserError(f"sheared {'dynamic' if dynamic is not None else 'reference'} needs "
                            f"[prune.domains.NAME] tables")
        return None, None, None
    specs = parse_domains(domains, where="prune.domains")
    dynamic = True if dynamic is None else dynamic
    try:
        ref = parse_reference(reference, specs, dynamic)
    except UserError as e:
        raise UserError("sheared step: " + _relabel(str(e))) from None
    if ref is not None and ref.source == "reference-model":
        raise UserError("sheared reference = \"reference-model\" is measured by continued "
                        "pretraining; the pruning stage takes reference_loss, a "
                        "[prune.reference] fit or reference = \"initial-loss\"")
    return specs, ref, dynamic


def current_gates(l0) -> dict[str, jax.Array]:
    """Deterministic gates at the current expected sizes (the reference's evaluation with
    `eval_target_model = false`): per row of each mask, `round(size - sum P(z > 0))` gates with
    the smallest soft scores are 0 (half to even, as Python's `round`), the rest keep their soft
    score. Jit-friendly: the kept count is an array."""
    out = {}
    for name in l0.plan.types:
        la = l0.log_alpha(name)
        size = la.shape[-1]
        keep = size - jnp.round(size - hc.prob_nonzero(la).sum(-1, keepdims=True))
        score = hc.soft_score(la)
        order = jnp.argsort(-score, axis=-1, stable=True)
        ranks = jnp.argsort(order, axis=-1, stable=True)
        out[name] = jnp.where(ranks < keep, score, 0.0)
    return l0._expand(out)


def check_data(pipeline, data_dir) -> None:
    """Fails fast (UserError, before the model loads) when a step's domains could not be read:
    unknown sources, missing files, an unreachable hub, filters that keep no document
    (`data.domains.check_domains`; tokenizes nothing)."""
    for step in flat_steps(pipeline):
        if getattr(step, "kind", "") == "sheared" and step.domains:
            try:
                check_domains(step.domains, data_dir)
            except UserError as e:
                raise UserError(_relabel(str(e))) from None


class PruningDomains:
    """The pruning stage's batches and weight updates over domains: a `DomainLoader` driven every
    `update_every` steps (module docstring). Iterate it for `[grad_accum, micro, seqlen]`
    batches."""

    def __init__(self, schedule: DomainSchedule, windows: dict):
        self.schedule = schedule
        try:
            self.loader = DomainLoader(schedule, windows)
        except UserError as e:
            raise UserError(_relabel(str(e))) from None

    @classmethod
    def build(cls, schedule: DomainSchedule, tokenizer, data_dir, windows=None) -> "PruningDomains":
        """From pre-tokenized `windows` ({domain: TokenWindows}) or the domains' sources (checked
        first: unknown sources, missing files and empty filters fail before tokenizing)."""
        if windows is None:
            if tokenizer is None:
                raise UserError("sheared pruning over domains needs a tokenizer")
            try:
                windows = load_domain_windows(
                    schedule.domains, tokenizer, seqlen=schedule.seqlen,
                    train_windows=schedule.steps * schedule.batch_size,
                    heldout_windows=schedule.eval_batches * schedule.micro_batch,
                    data_dir=data_dir)
            except UserError as e:
                raise UserError(_relabel(str(e))) from None
        return cls(schedule, windows)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)

    def due(self, step: int) -> bool:
        """Whether the weights update after `step` (1-based): every `update_every`, and the last."""
        return step % self.schedule.update_every == 0 or step == self.schedule.steps

    def start(self, evaluate_fn: Callable[[list], dict[str, float]]) -> None:
        """Before the first step: the missing references ("initial-loss") from the model's own
        held-out losses; the weights stay."""
        self.loader.fill_references(evaluate_fn)

    def update(self, evaluate_fn: Callable[[list], dict[str, float]], step: int) -> dict:
        """Per-domain held-out losses after `step`, then the weight update (`DomainLoader`)."""
        return self.loader.evaluate(evaluate_fn, step)

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.loader.names, map(float, self.loader.sampler.weights)))

    def describe(self) -> dict[str, Any]:
        return self.loader.describe()

    def report(self) -> dict[str, Any]:
        """`DomainLoader.report()` with the interval and `final_weights` (the hand-off)."""
        return {**self.loader.report(), "update_every": self.schedule.update_every,
                "eval_batches": self.schedule.eval_batches,
                "evaluation": "deterministic gates at the current expected sizes",
                "final_weights": self.weights}
