"""Training losses as strategy objects: the trainer calls `compute_loss` and never asks which.

A strategy says what it needs (`needs_teacher`, `hidden_layers`) and turns model outputs into a
scalar loss plus named metrics:

    loss, metrics = strategy.compute_loss(student_out, teacher_out, tokens)

- `CrossEntropy`: next-token cross-entropy (continued pretraining, LoRA; Sheared LLaMA,
  arXiv 2310.06694, LLM-Pruner, arXiv 2305.11627).
- `Distillation`: forward KL(teacher || student) on temperature-softened logits, times T^2
  (Hinton et al., arXiv 1503.02531; Minitron, arXiv 2407.14679), optionally plus next-token CE,
  an MSE between the outputs of paired decoder layers, and Minitron's intermediate loss as
  NVIDIA ModelOpt computes it (`modelopt/torch/distill/plugins/megatron.py`): the cosine loss
  `1 - cos(student, teacher)` per token between the norm outputs of (student, teacher) layer
  pairs (`recovery.pairs`; the student's through a learned projection when the widths differ),
  averaged over the pairs and rescaled to the logit loss by the detached ratio of the two
  (`LogitsAndIntermediatesLossBalancer`): `kl + cos * stop_grad(kl / cos)`.

Outputs are `ModelOutput(logits [B, T, V], hidden {layer: [B, T, D]}, pairs {k: [B, T, D]})`,
computed by `forward` (the strategy's `student_forward` / `teacher_forward` choose the layers).
Losses are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from nnxprune.models.llama import default_positions


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    logits: jax.Array  # [B, T, V]
    hidden: dict[int, jax.Array]  # decoder layer index -> its output [B, T, D]
    pairs: dict[int, jax.Array] = dataclasses.field(default_factory=dict)  # pair k -> norm output


jax.tree_util.register_dataclass(ModelOutput, data_fields=["logits", "hidden", "pairs"],
                                 meta_fields=[])


def forward(model, tokens: jax.Array, hidden_layers: tuple[int, ...] = (),
            points: tuple[int, ...] = (), *, project: bool = False) -> ModelOutput:
    """Logits of `tokens [B, T]`, the outputs of the decoder layers in `hidden_layers`, and the
    norm outputs at `points` (pair k at `points[k]`: layer i's input norm, or -1 the final norm;
    with `project`, through the model's distillation projection k, `recovery.pairs`)."""
    tokens = input_ids(tokens)
    x0 = model.embed_tokens(tokens)
    keep = set(hidden_layers) | {p - 1 for p in points if p > 0}
    out = model.run_layers(x0, default_positions(tokens), keep=keep)
    h = model.norm(out.x)
    proj = getattr(model, "distill_projections", None) if project else None
    normed = {}
    for k, p in enumerate(points):
        y = h if p < 0 else model.layers[p].input_layernorm(x0 if p == 0 else out.hidden[p - 1])
        normed[k] = y if proj is None else proj[k](y)
    return ModelOutput(logits=_logits(model, h), hidden={i: out.hidden[i] for i in hidden_layers},
                       pairs=normed)


def cosine_loss(student: jax.Array, teacher: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Mean over tokens of `1 - cos(student, teacher)` along the last axis, float32 (torch's
    `cosine_embedding_loss` with target 1, as ModelOpt's `HiddenStateCosineLoss`)."""
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    cos = jnp.sum(s * t, -1) / jnp.sqrt((jnp.sum(s * s, -1) + eps) * (jnp.sum(t * t, -1) + eps))
    return jnp.mean(1.0 - cos)


def balance(logit_loss: jax.Array, intermediate: jax.Array) -> jax.Array:
    """ModelOpt's rescaling: the intermediate loss times the detached ratio `logit / intermediate`
    (1 when the intermediate loss is 0), so both terms weigh alike whatever their scales."""
    ratio = jnp.where(intermediate > 0, logit_loss / jnp.where(intermediate > 0, intermediate, 1.0),
                      1.0)
    return intermediate * jax.lax.stop_gradient(ratio)


def _logits(model, h: jax.Array) -> jax.Array:
    """`model.logits(h)`; a tied head (`h @ E.T`) goes through `_matmul_nt`, whose backward is
    cheaper on CPU."""
    if model.lm_head is not None:
        return model.logits(h)
    embedding = model.embed_tokens.effective_embedding()
    return _matmul_nt(h.astype(embedding.dtype), embedding)


@jax.custom_vjp
def _matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., D] @ w.T` for `w [V, D]`. Its backward computes the weight gradient as
    `(x^T @ g)^T` instead of autodiff's `g^T @ x`: XLA on CPU then writes the `[D, V]` product
    in `w`'s layout instead of first copying the `[tokens, V]` cotangent into a transposed
    `[V, tokens]` array (a pass over the largest array of the step; measured in
    benchmarks/results/distill_speed.md). The values are the same matmul, summed in another
    order."""
    return jnp.dot(x, w.T)


def _matmul_nt_fwd(x, w):
    return jnp.dot(x, w.T), (x, w)


def _matmul_nt_bwd(residuals, g):
    x, w = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return jnp.dot(g, w).astype(x.dtype), jnp.dot(x2.T, g2).T.astype(w.dtype)


_matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


def input_ids(tokens: jax.Array) -> jax.Array:
    """Token ids with the no-target marks (`-(id + 1)`, `data.training.not_target`) undone."""
    return jnp.where(tokens < 0, -tokens - 1, tokens)


def next_token_ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `tokens[:, 1:]` from `logits[:, :-1]`, over the targets
    not marked (prompt and padding of instruction windows are marked negative)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    weight = (targets >= 0).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, input_ids(targets)[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Mean over tokens of KL(p_teacher || p_student) at `temperature`, times temperature^2.

    Float32 whatever the logits' dtype. The gradient reaches the student's logits only (the
    teacher is a constant) and is written by hand: `(softmax(s / T) - p_teacher) * T / N` over
    the N tokens, one fused pass over `[B, T, V]` from the saved logits and the two per-token
    log-normalisers; autodiff of the log-softmaxes would keep and re-read more `[B, T, V]`
    arrays (and save the teacher's probabilities besides its logits)."""
    return _forward_kl(student_logits, jax.lax.stop_gradient(teacher_logits), float(temperature))


def _kl_parts(student_logits, teacher_logits, t):
    s = student_logits.astype(jnp.float32) / t
    q = teacher_logits.astype(jnp.float32) / t
    lse_s = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    lse_q = jax.nn.logsumexp(q, axis=-1, keepdims=True)
    kl = jnp.sum(jnp.exp(q - lse_q) * ((q - lse_q) - (s - lse_s)), axis=-1)
    return jnp.mean(kl) * (t * t), (lse_s, lse_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _forward_kl(student_logits, teacher_logits, t):
    return _kl_parts(student_logits, teacher_logits, t)[0]


def _forward_kl_fwd(student_logits, teacher_logits, t):
    loss, lse = _kl_parts(student_logits, teacher_logits, t)
    return loss, (student_logits, teacher_logits, lse)


def _forward_kl_bwd(t, residuals, g):
    student_logits, teacher_logits, (lse_s, lse_q) = residuals
    n = student_logits.size // student_logits.shape[-1]
    p_s = jnp.exp(student_logits.astype(jnp.float32) / t - lse_s)
    p_q = jnp.exp(teacher_logits.astype(jnp.float32) / t - lse_q)
    grad = ((p_s - p_q) * (g * t / n)).astype(student_logits.dtype)
    return grad, jnp.zeros_like(teacher_logits)


_forward_kl.defvjp(_forward_kl_fwd, _forward_kl_bwd)


class LossStrategy:
    """Base: `compute_loss(student_out, teacher_out, tokens) -> (loss, {name: scalar})`."""

    needs_teacher: bool = False
    hidden_layers: tuple[int, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()

    def student_forward(self, model, tokens: jax.Array) -> ModelOutput:
        return forward(model, tokens, self.hidden_layers)

    def teacher_forward(self, teacher, tokens: jax.Array) -> ModelOutput:
        return forward(teacher, tokens, self.hidden_layers)

    def compute_loss(self, student: ModelOutput, teacher: ModelOutput | None,
                     tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"strategy": type(self).__name__}


@dataclasses.dataclass(frozen=True)
class CrossEntropy(LossStrategy):
    """Next-token cross-entropy on the training text."""

    def compute_loss(self, student, teacher, tokens):
        ce = next_token_ce(student.logits, tokens)
        return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Distillation(LossStrategy):
    """`kd_weight * (T^2 KL + balanced cosine) + ce_weight * CE + hidden_weight * MSE(hidden)`.

    `hidden_layers` (student) pair with `teacher_hidden_layers` (default: the same indices;
    `recovery.pairs.prepare` maps them by source layer). `pairs` are (student point, teacher
    point) of the intermediate cosine loss; with `intermediate` and no pairs, `prepare` fills the
    default pairing."""

    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    teacher_hidden_layers: tuple[int, ...] | None = None
    hidden_weight: float = 0.0
    intermediate: bool = False
    pairs: tuple[tuple[int, int], ...] = ()
    needs_teacher = True

    def student_forward(self, model, tokens):
        return forward(model, tokens, self.hidden_layers, tuple(s for s, _ in self.pairs),
                       project=True)

    def teacher_forward(self, teacher, tokens):
        layers = self.hidden_layers if self.teacher_hidden_layers is None \
            else self.teacher_hidden_layers
        return forward(teacher, tokens, layers, tuple(t for _, t in self.pairs))

    def compute_loss(self, student, teacher, tokens):
        metrics = {}
        loss = jnp.zeros((), jnp.float32)
        if self.kd_weight:
            kl = forward_kl(student.logits, teacher.logits, self.temperature)
            metrics["kl"] = kl
            kd = kl
            if self.pairs:
                cos = jnp.mean(jnp.stack([cosine_loss(student.pairs[k], teacher.pairs[k])
                                          for k in range(len(self.pairs))]))
                metrics["intermediate"] = cos
                kd = kd + balance(kl, cos)
            loss = loss + self.kd_weight * kd
        if self.ce_weight:
            ce = next_token_ce(student.logits, tokens)
            metrics["ce"] = ce
            loss = loss + self.ce_weight * ce
        if self.hidden_weight and self.hidden_layers:
            theirs = self.hidden_layers if self.teacher_hidden_layers is None \
                else self.teacher_hidden_layers
            mse = jnp.mean(jnp.stack([
                jnp.mean(jnp.square(student.hidden[i].astype(jnp.float32)
                                    - teacher.hidden[j].astype(jnp.float32)))
                for i, j in zip(self.hidden_layers, theirs)]))
            metrics["hidden_mse"] = mse
            loss = loss + self.hidden_weight * mse
        return loss, metrics

    def describe(self):
        return {"strategy": "Distillation", **dataclasses.asdict(self)}


def strategy_for(cfg) -> LossStrategy:
    """The strategy of a `RecoveryConfig`: distill -> Distillation, lora / pretrain -> CE."""
    if cfg.kind == "distill":
        d = cfg.distill
        return Distillation(temperature=d.temperature, kd_weight=d.kd_weight,
                            ce_weight=d.ce_weight, hidden_layers=d.hidden_layers,
                            hidden_weight=d.hidden_weight, intermediate=d.intermediate,
                            pairs=tuple((_point(s), _point(t)) for s, t in d.pairs))
    return CrossEntropy()


def _point(p) -> int:
    """A recipe's pair point: a layer index, or "final" (-1, the final norm)."""
    return -1 if p == "final" else int(p)
