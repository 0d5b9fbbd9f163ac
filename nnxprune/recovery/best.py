"""Keep the best held-out checkpoint: the weights of the evaluation with the lowest loss.

LLM-Pruner's LoRA recovery (`post_training.py`, transformers' Trainer with
`load_best_model_at_end=True`, `metric_for_best_model="<data>_loss"`, so lower is better) ends
with the checkpoint whose validation loss was lowest, not with the last step's weights. With
`recovery.keep_best = true` the trainer does the same: at every held-out evaluation after
training began (every `eval_every` steps and at the end; the step-0 evaluation of the untrained
model is not a candidate, as the reference never evaluates before training) the trainable state
is copied to the host when its `loss` is the lowest so far, and the run ends with that copy.

Differences from the reference, on purpose: the reference can only return to a step it saved
(`save_steps = 200`, evaluations every 100), here every evaluation is a candidate; the copy is
held in memory, not written, so a run resumed from a checkpoint chooses among the evaluations
after the resume. The copy is of the trainable state only (the adapters, for LoRA).

Example:
    >>> keeper = BestKeeper(enabled=cfg.keep_best)
    >>> keeper.observe({"step": 50, "loss": 2.1}, session.state["trainable"])
    >>> trainable = keeper.final(session.state["trainable"])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from nnxprune import multihost


@dataclasses.dataclass
class BestKeeper:
    """Tracks the held-out evaluation with the lowest loss and a host copy of its state."""

    enabled: bool = False
    step: int | None = None
    loss: float = math.inf
    state: Any = None

    def observe(self, row: dict[str, Any], trainable) -> bool:
        """Takes a held-out row (`step`, `loss`) and the trainable state at that step; returns
        whether it is the best so far (and was copied)."""
        if not self.enabled or row.get("step", 0) < 1:
            return False
        loss = float(row["loss"])
        if not loss < self.loss:  # ties keep the earlier step; NaN never wins
            return False
        self.step, self.loss = int(row["step"]), loss
        self.state = jax.tree.map(np.asarray, multihost.local_copy(trainable))
        return True

    def final(self, trainable, *, finished: bool = True):
        """The state the run ends with: the best copy when there is one and the run `finished`
        (an interrupted run keeps its last step, which its checkpoint resumes from), else
        `trainable` (gathered whole into this process)."""
        if finished and self.state is not None:
            return self.state
        return multihost.local_copy(trainable)

    def report(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return {"step": self.step, "loss": None if self.step is None else self.loss}
