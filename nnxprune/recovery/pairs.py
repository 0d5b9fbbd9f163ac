"""Which student layer learns from which teacher layer, and the projections between their widths.

Minitron's distillation (Muralidharan et al., arXiv 2407.14679, section 3.4; Sreenivas et al.,
arXiv 2408.11796) as NVIDIA ModelOpt builds it (`modelopt/torch/distill/plugins/megatron.py`):
besides the logit KL, a cosine loss between named intermediate outputs of the student and the
teacher, `intermediate_layer_pairs = [["decoder.layers.S.input_layernorm",
"decoder.layers.T.input_layernorm"], ..., ["decoder.final_layernorm", "decoder.final_layernorm"]]`,
each loss with its own `ProjectionLayer` (a `Linear(student hidden, teacher hidden)` with bias,
normal init, zero bias; the identity when the widths agree) trained with the student and never
saved with it.

Here a pair point is an integer `i`, the output of decoder layer `i`'s input RMSNorm (the
residual stream entering layer `i`, normalized), or `FINAL` (-1), the final norm's output. The
default pairing follows the layers the depth step kept: `graph.drop_layers` records on the model
which source layer every remaining layer was (`source_layers`, saved in the checkpoint), so a
student that kept source layers (0, 1, 2, 5, 6, ...) pairs its layer 3 with the teacher's layer 5,
never with the teacher's layer 3. A teacher that is itself a pruned checkpoint maps through its own
`source_layers`.

`prepare(strategy, model, teacher)` resolves a `Distillation` strategy against the two models
(checks, default pairs, the teacher layers of the hidden-state MSE) and attaches the projections
to the student as `model.distill_projections`, where the trainer's optimizer finds them as
parameters of the student; `detach(model)` removes them after training, so no checkpoint, export
or parameter count ever sees them.

Example:
    >>> source_layers(pruned)            # after ShortGPT removed layers 3 and 4 of 8
    (0, 1, 2, 5, 6, 7)
    >>> default_pairs(pruned, dense)
    ((0, 0), (1, 1), (2, 2), (3, 5), (4, 6), (5, 7), (-1, -1))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.errors import UserError

FINAL = -1  # the final norm's output
ATTRIBUTE = "distill_projections"
INIT_STD = 0.02  # Megatron's init_method_std, which ModelOpt's ProjectionLayer uses


def source_layers(model) -> tuple[int, ...]:
    """The source-model index of each of `model`'s decoder layers (identity when none dropped)."""
    recorded = getattr(model, "source_layers", None)
    n = len(model.layers)
    if recorded is None:
        return tuple(range(n))
    recorded = tuple(int(i) for i in recorded)
    if len(recorded) != n:
        raise UserError(f"the model records {len(recorded)} source layers for its {n} layers")
    return recorded


def teacher_layers(student, teacher) -> tuple[int, ...]:
    """For every student layer, the index of the same source layer in `teacher`."""
    where = {src: i for i, src in enumerate(source_layers(teacher))}
    out = []
    for i, src in enumerate(source_layers(student)):
        if src not in where:
            raise UserError(f"student layer {i} comes from source layer {src}, which the teacher "
                            f"does not have (teacher source layers {sorted(where)})")
        out.append(where[src])
    return tuple(out)


def default_pairs(student, teacher) -> tuple[tuple[int, int], ...]:
    """Every student layer's input norm with its teacher layer's, then the final norms."""
    return tuple(enumerate(teacher_layers(student, teacher))) + ((FINAL, FINAL),)


def point_name(point: int) -> str:
    return "final norm" if point == FINAL else f"layer {point} input norm"


class Projection(nnx.Module):
    """`x [..., Ds] @ kernel [Ds, Dt] + bias [Dt]`: a student hidden state in the teacher's width."""

    def __init__(self, d_student: int, d_teacher: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (d_student, d_teacher)))
        self.bias = nnx.Param(jnp.zeros((d_teacher,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def projections(model):
    """The projections attached to `model` for training (None when there are none)."""
    return getattr(model, ATTRIBUTE, None)


def detach(model) -> int:
    """Removes the training-only projections from `model`; returns how many there were."""
    found = projections(model)
    if found is None:
        return 0
    delattr(model, ATTRIBUTE)
    return len(found)


def check_teacher(strategy, model, teacher) -> None:
    """What a distillation needs of its teacher (UserError before any work)."""
    if not strategy.needs_teacher:
        return
    if teacher is None:
        raise UserError("recovery kind 'distill' needs a teacher model")
    sc, tc = model.config, teacher.config
    if sc.vocab_size != tc.vocab_size:
        raise UserError(f"teacher vocabulary {tc.vocab_size} != student vocabulary {sc.vocab_size}")
    if strategy.hidden_layers:
        if sc.hidden_size != tc.hidden_size:
            raise UserError(f"hidden-state MSE needs equal hidden sizes (student {sc.hidden_size}, "
                            f"teacher {tc.hidden_size}); intermediate = true pairs any widths")
        bad = [i for i in strategy.hidden_layers if i >= sc.num_layers]
        if bad:
            raise UserError(f"recovery.distill.hidden_layers {bad} are beyond the student's "
                            f"{sc.num_layers} layers")
    for s, t in strategy.pairs:
        for point, n, who in ((s, sc.num_layers, "student"), (t, tc.num_layers, "teacher")):
            if point != FINAL and not 0 <= point < n:
                raise UserError(f"recovery.distill.pairs: layer {point} does not exist in the "
                                f"{who} ({n} layers)")


def prepare(strategy, model, teacher, *, seed: int = 0):
    """The strategy resolved against `model` and `teacher` (checked; default pairs; the teacher
    layers of the hidden MSE by source layer) with projections attached to `model` when the
    widths differ. Strategies without a teacher come back unchanged."""
    if not strategy.needs_teacher:
        return strategy
    check_teacher(strategy, model, teacher)  # a missing teacher fails before any mapping
    mapped = teacher_layers(model, teacher)
    changes = {"teacher_hidden_layers": tuple(mapped[i] for i in strategy.hidden_layers)}
    if getattr(strategy, "intermediate", False) and not strategy.pairs:
        changes["pairs"] = default_pairs(model, teacher)
    strategy = dataclasses.replace(strategy, **changes)
    check_teacher(strategy, model, teacher)
    detach(model)
    ds, dt = model.config.hidden_size, teacher.config.hidden_size
    if strategy.pairs and ds != dt:
        rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 7))
        setattr(model, ATTRIBUTE, nnx.List([Projection(ds, dt, rngs=rngs) for _ in strategy.pairs]))
    return strategy


def check_config(d) -> None:
    """The `[recovery.distill]` keys of this module (a `DistillConfig`): UserError on bad values;
    the pairs are stored as tuples."""
    if not isinstance(d.intermediate, bool):
        raise UserError(f"recovery.distill.intermediate must be true or false, got "
                        f"{d.intermediate!r}")
    if not isinstance(d.pairs, (list, tuple)):
        raise UserError(f"recovery.distill.pairs must be a list of [student, teacher] pairs, got "
                        f"{d.pairs!r}")
    pairs = []
    for pair in d.pairs:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            p == "final" or (isinstance(p, int) and not isinstance(p, bool) and p >= 0)
            for p in pair)
        if not ok:
            raise UserError(f"recovery.distill.pairs: {pair!r} is not a [student, teacher] pair "
                            f"of layer indices >= 0 or \"final\"")
        pairs.append(tuple(pair))
    object.__setattr__(d, "pairs", tuple(pairs))
    if pairs and not d.intermediate:
        raise UserError("recovery.distill.pairs are the intermediate loss's: set intermediate = true")
    if d.intermediate and d.kd_weight <= 0:
        raise UserError("recovery.distill.intermediate is rescaled to the logit loss: it needs "
                        "kd_weight > 0")
    steps, lr = d.teacher_correction_steps, d.teacher_correction_lr
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"recovery.distill.teacher_correction_steps must be an integer >= 0, got "
                        f"{steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 or lr == float("inf"):
        raise UserError(f"recovery.distill.teacher_correction_lr must be a number >= 0, got {lr!r}")


def check_points(pairs, layers: int, who: str) -> None:
    """Recipe pair points (`who` is "student" or "teacher") against a model of `layers` layers."""
    index = 0 if who == "student" else 1
    for pair in pairs:
        p = pair[index]
        if p != "final" and p >= layers:
            raise UserError(f"recovery.distill.pairs: layer {p} does not exist in the {who} "
                            f"({layers} layers)")
