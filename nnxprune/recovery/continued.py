"""Continued pretraining of a pruned model over data domains with dynamic batch loading (Sheared
LLaMA, Xia et al., arXiv 2310.06694; the update and the sampler are in `recovery.dynamic`).

`continued_pretraining` is the recovery trainer (`trainer.train`: the same jitted step and mesh)
with a recipe's `[recovery.domains]`: it reads and tokenizes the domains, optionally measures
the reference losses on an unpruned `reference_model` (for the domains whose recipe entry has no
`reference_loss`; without one the pruned model's own losses before training are used), and
returns the `TrainResult`, whose `domains` entry has the per-domain held-out losses, excess losses
and weights at every evaluation.

Initial weights: `initial_weights` (Sheared LLaMA's pruning stage's final weights, its report's
`domains.final_weights`) when given and the run uses dynamic loading over the same domains, as the
reference's `continue_pretrain.sh` starts from the pruning stage's final proportions
(`recovery.sheared_handoff`); otherwise (no domains in the pruning stage, or `dynamic = false`
here) the recipe's `weight` per domain, normalized, as before.

Example:
    >>> cfg = RecoveryConfig.from_dict({"kind": "pretrain", "steps": 50, "batch_size": 4,
    ...     "seqlen": 128, "eval_every": 10, "eval_batches": 1,
    ...     "domains": {"news": {"source": "c4", "category": "news"},
    ...                 "other": {"source": "c4", "category": "other"}}})
    >>> result = continued_pretraining(pruned, cfg, tok, data_dir, reference_model=dense)
    >>> result.domains["history"][-1]["weights"], result.domains["final_mean_excess"]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune import data as data_lib
from nnxprune.data.domains import load_domain_windows
from nnxprune.errors import UserError
from nnxprune.recovery import sheared_handoff as handoff
from nnxprune.recovery.config import RecoveryConfig
from nnxprune.recovery.losses import forward, next_token_ce
from nnxprune.recovery.trainer import TrainResult, train


def domain_losses(model, heldout: dict[str, list[np.ndarray]], *,
                  compute_dtype: str = "float32") -> dict[str, float]:
    """Each domain's mean next-token cross-entropy of `model` over its held-out batches."""
    dtype = jnp.dtype(compute_dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, state)

    @jax.jit
    def ce(state, tokens):
        return next_token_ce(forward(nnx.merge(graphdef, state), tokens).logits, tokens)

    return {name: float(np.mean([float(ce(state, jnp.asarray(b))) for b in batches]))
            for name, batches in heldout.items()}


def continued_pretraining(model, cfg: RecoveryConfig, tokenizer, data_dir=None, *,
                          reference_model=None, teacher=None, windows=None, log_dir=None,
                          progress: bool = False, echo=None,
                          initial_weights: dict[str, float] | None = None) -> TrainResult:
    """Trains `model` in place on `cfg.domains` (see the module docstring); everything that can
    fail on bad input fails before any tokenizing or training."""
    if not cfg.domains:
        raise UserError("continued pretraining needs [recovery.domains.NAME] tables")
    cfg.check(model.config)
    cfg, seeded = handoff.seed(cfg, initial_weights, "the pruning stage")
    if reference_model is not None and reference_model.config.vocab_size != model.config.vocab_size:
        raise UserError(f"the reference model's vocabulary ({reference_model.config.vocab_size}) "
                        f"differs from the model's ({model.config.vocab_size})")
    data_dir = data_lib.resolve_data_dir(data_dir)
    if windows is None:
        windows = load_domain_windows(
            cfg.domains, tokenizer, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
            heldout_windows=cfg.eval_batches * cfg.micro_batch, data_dir=data_dir)
    measured: dict[str, float] = {}
    missing = [n for n, d in cfg.domains.items() if d.reference_loss is None]
    if reference_model is not None and missing:
        heldout = {n: data_lib.heldout_batches(windows[n].heldout, cfg.micro_batch,
                                               cfg.eval_batches) for n in missing}
        measured = domain_losses(reference_model, heldout, compute_dtype=cfg.compute_dtype)
        cfg = dataclasses.replace(cfg, domains={
            n: dataclasses.replace(d, reference_loss=measured.get(n, d.reference_loss))
            for n, d in cfg.domains.items()})
    result = train(model, cfg, tokenizer=tokenizer, windows=windows, teacher=teacher,
                   data_dir=data_dir, log_dir=log_dir, progress=progress, echo=echo)
    for name in measured:
        result.domains["reference_from"][name] = "reference model"
    if seeded:
        result.domains["initial_weights_from"] = seeded
    return result
