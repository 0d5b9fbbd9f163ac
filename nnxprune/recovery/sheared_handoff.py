"""The hand-off of Sheared LLaMA's domain weights from the pruning stage to continued pretraining
(Xia, Gao, Zeng and Chen, arXiv 2310.06694; princeton-nlp/LLM-Shearing: `continue_pretrain.sh`
starts from `proportion=[0.2192, 0.0002, 0.0791, 0.0064, 0.0096, 0.001, 0.6845]`, commented
"final proportion of pruning", where `pruning.sh` started from RedPajama's proportions).

The rule, the same in one `nnxprune prune` run and from a saved checkpoint:
- when a `sheared` step ran dynamic batch loading over domains (`recovery.sheared_domains`) and
  the `[recovery]` trains over `[recovery.domains.NAME]` with dynamic loading, the recovery's
  initial weights are the sheared step's final weights (its report's `domains.final_weights`);
  the recovery's own `weight` values are then unused. Both must name the same domains (checked
  with the recipe, before any work; a checkpoint's, before the model loads).
- without domains in the pruning stage (or with `dynamic = false` there), or with
  `dynamic = false` in the recovery, the recovery starts from its own configured weights (each
  domain's `weight`, normalized; uniform by default), as without the hand-off.
- a checkpoint written by `nnxprune prune` without `[recovery]` (the pruning stage's output)
  records the final weights in its provenance (`PROVENANCE_KEY`), and `nnxprune train CKPT
  --recipe R` hands them on by the same rule. The report of a run always has them (the sheared
  step's `domains` entry), and the recovery's report names where its initial weights came from.

Example:
    >>> cfg, origin = seed_from_report(recipe.recovery, report["transforms"])
    >>> origin      # "the sheared pruning stage (final weights)" or None
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nnxprune.errors import UserError

PROVENANCE_KEY = "pruning_domain_weights"
ORIGIN = "the sheared pruning stage (final weights)"


def flat_steps(pipeline):
    """The steps of `pipeline` in order, nested pipelines flattened."""
    def flat(steps):
        for step in steps:
            inner = getattr(step, "steps", None)
            yield from (flat(inner) if isinstance(inner, tuple) else (step,))

    return flat(getattr(pipeline, "steps", ()))


def handing_step(pipeline) -> Any | None:
    """The last step of `pipeline` that runs dynamic batch loading over domains (None: none)."""
    found = None
    for step in flat_steps(pipeline):
        if getattr(step, "domains", None) and getattr(step, "dynamic", False):
            found = step
    return found


def _receives(recovery) -> bool:
    return recovery is not None and bool(recovery.domains) and bool(recovery.dynamic)


def _check_names(pruning: list[str], recovery: list[str], where: str) -> None:
    if set(pruning) != set(recovery):
        raise UserError(
            f"recovery.domains ({', '.join(recovery)}) differ from the domains of {where} "
            f"({', '.join(pruning)}): continued pretraining starts from the pruning stage's final "
            f"domain weights, so both need the same domains (or set recovery.dynamic = false)")


def check_recipe(pipeline, recovery) -> None:
    """UserError, before any work, when the hand-off applies and the domains differ."""
    step = handing_step(pipeline)
    if step is not None and _receives(recovery):
        _check_names(list(step.domains), list(recovery.domains), "the sheared step")


def final_weights(transforms: list[dict[str, Any]]) -> dict[str, float] | None:
    """The final domain weights of the last sheared step of a run's report that ran dynamic
    batch loading (None: none did)."""
    found = None
    for entry in transforms:
        domains = entry.get("domains") if isinstance(entry, dict) else None
        if isinstance(domains, dict) and domains.get("dynamic") and domains.get("final_weights"):
            found = dict(domains["final_weights"])
    return found


def seed(cfg, weights: dict[str, float] | None, where: str):
    """`cfg` (a `RecoveryConfig`) with `weights` as its domains' initial weights when the
    hand-off applies (module docstring); `(cfg, ORIGIN or None)`."""
    if weights is None or not _receives(cfg):
        return cfg, None
    _check_names(list(weights), list(cfg.domains), where)
    domains = {n: dataclasses.replace(d, weight=float(weights[n])) for n, d in cfg.domains.items()}
    return dataclasses.replace(cfg, domains=domains), ORIGIN


def seed_from_report(cfg, transforms: list[dict[str, Any]]):
    """`seed` with the final weights of this run's pruning stage."""
    return seed(cfg, final_weights(transforms), "the sheared step")


def provenance(transforms: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint provenance entry of a pruning stage's output (empty without weights)."""
    weights = final_weights(transforms)
    return {} if weights is None else {PROVENANCE_KEY: weights}


def seed_from_checkpoint(cfg, model_name: str):
    """`seed` with the final weights a checkpoint's provenance records (`nnxprune train`)."""
    from nnxprune.io.checkpoint import is_checkpoint, read_meta

    if cfg is None or not _receives(cfg) or not is_checkpoint(Path(model_name)):
        return cfg, None
    weights = read_meta(model_name).get("provenance", {}).get(PROVENANCE_KEY)
    if not isinstance(weights, dict):
        return cfg, None
    return seed(cfg, weights, f"the pruning stage that wrote {model_name}")
