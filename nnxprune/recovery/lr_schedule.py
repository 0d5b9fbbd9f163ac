"""The recovery learning-rate schedules: linear warmup, then a cosine or a linear decay.

`schedule = "cosine"` (the default) decays to `lr * min_lr_ratio` along a half cosine;
`schedule = "linear"` decays linearly, as transformers' Trainer does by default
(`lr_scheduler_type = "linear"`, `get_linear_schedule_with_warmup`: `step / warmup` during the
warmup, then `(steps - step) / (steps - warmup)`, reaching 0 at the last step). LLM-Pruner's
`post_training.py` trains LoRA with those defaults and 100 warmup steps; its recipe sets
`schedule = "linear"` and `min_lr_ratio = 0`.

Both start at 0 at step 0 (the first update is taken at lr 0, as transformers' is), and the
warmup is capped at `steps - 1` so a short run still reaches the peak.

Example:
    >>> sched = lr_schedule(RecoveryConfig(kind="lora", steps=1000, warmup_steps=100,
    ...                                    schedule="linear", min_lr_ratio=0.0))
    >>> float(sched(100)), float(sched(550)), float(sched(1000))     # lr, lr / 2, 0
"""

from __future__ import annotations

import optax


def lr_schedule(cfg) -> optax.Schedule:
    """The learning rate per step of a `RecoveryConfig` (module docstring)."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.steps, 1),
            end_value=end)
    decay = optax.linear_schedule(cfg.lr, end, max(cfg.steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
