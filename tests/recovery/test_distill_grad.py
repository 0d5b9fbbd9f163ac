"""The distillation loss's hand-written gradients (`losses.forward_kl`, the tied output head of
`losses.forward`) against autodiff of the plain formulas, and the trainer's whole distillation step
against the same step in torch + transformers (`benchmarks/distill_speed.py --quick`)."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.models.llama import Llama
from nnxprune.recovery.losses import forward, forward_kl


def plain_kl(student_logits, teacher_logits, t):
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    q = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(q) * (q - s), axis=-1)) * t * t


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_kl_value_and_gradient_match_autodiff(t, dtype):
    rng = np.random.default_rng(0)
    s = jnp.asarray(3 * rng.standard_normal((2, 5, 40)), dtype)
    q = jnp.asarray(3 * rng.standard_normal((2, 5, 40)), dtype)
    want, want_grads = jax.value_and_grad(plain_kl, argnums=(0, 1))(s, q, t)
    got, got_grads = jax.jit(jax.value_and_grad(forward_kl, argnums=(0, 1)), static_argnums=2)(s, q, t)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert got_grads[0].dtype == dtype
    np.testing.assert_allclose(np.asarray(got_grads[0], np.float32),
                               np.asarray(want_grads[0], np.float32),
                               atol=1e-7 if dtype == jnp.float32 else 1e-3)
    assert not np.any(np.asarray(got_grads[1], np.float32))  # the teacher is a constant


def test_tied_head_gradients_match_model_logits(tiny_config, randomize):
    """`forward` (tied head through `_matmul_nt`) gives the same loss and parameter gradients as
    the model's own `logits`, with an embedding mask on."""
    model = randomize(Llama(tiny_config, rngs=nnx.Rngs(0)), seed=1)
    model.embed_tokens.set_mask(jnp.arange(tiny_config.hidden_size) % 5 != 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 12)))
    teacher_logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, tiny_config.vocab_size)),
                                 jnp.float32)
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def ours(p):
        return forward_kl(forward(nnx.merge(gdef, p, rest), tokens).logits, teacher_logits, 1.0)

    def plain(p):
        return plain_kl(nnx.merge(gdef, p, rest)(tokens), teacher_logits, 1.0)

    got, got_g = jax.value_and_grad(ours)(params)
    want, want_g = jax.value_and_grad(plain)(params)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_trainer_step_agrees_with_torch(tmp_path):
    """The trainer's distillation step and the same step in torch + transformers (AdamW, clipping,
    the warmup-cosine schedule) give the same losses step by step on a tiny random Llama."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import distill_speed

    out = tmp_path / "d.json"
    assert distill_speed.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ours, theirs = report["nnxprune"]["losses"], report["torch"]["losses"]
    assert len(ours) == 3 and ours[0] > 0.05  # the perturbed student is not the teacher
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert len(set(ours)) == 3  # the optimizer moved the student: losses differ step to step
    assert report["flops"]["step"] == 4 * report["flops"]["forward"]
    assert out.with_suffix(".md").is_file()
