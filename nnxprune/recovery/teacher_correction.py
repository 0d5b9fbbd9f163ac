"""Teacher correction before distillation (Sreenivas et al., LLM Pruning and Distillation in
Practice: The Minitron Approach, arXiv 2408.11796, section 2): without the teacher's original
pretraining data, the unpruned teacher is first fine-tuned briefly on the distillation dataset
(their Llama 3.1 8B teacher on ~127B tokens before distilling), so its outputs fit the text the
student then learns from.

`correct_teacher` is that fine-tune: next-token cross-entropy on the recovery's own `dataset`
(the same windows, from the first), `teacher_correction_steps` optimizer steps of the recovery's
batch, sequence length, optimizer and schedule at `teacher_correction_lr` (0: the recovery's
`lr`). It trains a copy, so the caller's teacher object is unchanged, and returns the corrected
copy with a report entry (its losses; no log folder or checkpoints of its own: a killed run
corrects again on resume).

Example:
    >>> teacher, entry = correct_teacher(dense, cfg, tokenizer=tok, windows=windows)
    >>> entry["steps"], entry["first_loss"], entry["final_loss"]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from nnxprune import data as data_lib
from nnxprune.recovery.trainer import train


def correction_config(cfg):
    """The `RecoveryConfig` of the correction: `kind = "pretrain"` for the distillation's steps."""
    d = cfg.distill
    steps = d.teacher_correction_steps
    return dataclasses.replace(
        cfg, kind="pretrain", distill=None, steps=steps, lr=d.teacher_correction_lr or cfg.lr,
        warmup_steps=min(cfg.warmup_steps, steps - 1), eval_every=0, eval_batches=0,
        keep_best=False, checkpoint_every=0)


def correct_teacher(teacher, cfg, *, tokenizer=None, windows=None, data_dir=None,
                    progress: bool = False, echo=None) -> tuple[Any, dict[str, Any] | None]:
    """`(corrected copy of teacher, report entry)`, or `(teacher, None)` when the recipe asks for
    no correction. `windows` (the distillation's) are reused when they hold enough training
    windows; otherwise `cfg.dataset` is read again."""
    if cfg.distill is None or not cfg.distill.teacher_correction_steps:
        return teacher, None
    fix = correction_config(cfg)
    if windows is not None and len(windows.train) >= fix.steps * fix.batch_size:
        windows = data_lib.TokenWindows(train=windows.train[:fix.steps * fix.batch_size],
                                        heldout=windows.heldout[:0], source=windows.source)
    else:
        windows = None
    corrected = nnx.clone(teacher)
    # no log folder of its own: the distillation's folder is checked and owned as a whole
    result = train(corrected, fix, tokenizer=tokenizer, windows=windows, data_dir=data_dir,
                   log_dir=None, progress=progress, echo=echo)
    entry = {"steps": result.steps, "lr": fix.lr, "tokens": result.tokens,
             "first_loss": result.losses[0], "final_loss": result.losses[-1],
             "seconds": result.seconds}
    if echo is not None:
        echo(f"teacher   corrected: {result.steps} steps of CE on {cfg.dataset}, loss "
             f"{entry['first_loss']:.4f} -> {entry['final_loss']:.4f}")
    return corrected, entry
