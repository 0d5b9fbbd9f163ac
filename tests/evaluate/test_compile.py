"""Ahead-of-time compilation with oneDNN matmuls: the crash guard, the numerical gate and equal
scores.

`has_dot_chain` must find the matmul chains that kill the process under oneDNN (a LoRA branch,
`x @ (a @ b)`, a carry that feeds a matmul in a loop) and pass the Llama scorer, whose only
pass-through is the attention values into a batched matmul. A LoRA-wrapped model must therefore
compile with XLA's defaults: if the guard let it through, this test process would die of SIGILL.
`onednn_matches_xla` must refuse oneDNN on a CPU where it gets a scaled matmul wrong (an AMD EPYC
with AVX2 does), and the scorer must give XLA's numbers whichever way the gate decides.
"""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.evaluate import compile as compile_lib
from nnxprune.evaluate.compile import (ONEDNN_OPTIONS, PROBE_RTOL, compile_fast, has_dot_chain,
                                       onednn_matches_xla)
from nnxprune.evaluate.perplexity import compile_scorer, make_scorer
from nnxprune.models.llama import Llama


def _chain(f, *shapes) -> bool:
    return has_dot_chain(jax.jit(f).trace(*(jnp.ones(s) for s in shapes)).jaxpr)


def test_chains_found():
    assert _chain(lambda x, a, b: jnp.dot(jnp.dot(x, a), b), (8, 4), (4, 2), (2, 4))  # LoRA branch
    assert _chain(lambda x, a, b: jnp.dot(x, jnp.dot(a, b)), (8, 4), (4, 2), (2, 4))
    # through layout ops and a nested jit
    assert _chain(lambda x, a, b: jax.jit(lambda y: jnp.dot(y.T.reshape(2, 8).T, b))(jnp.dot(x, a)),
                  (8, 4), (4, 2), (2, 4))
    # scores straight into the value matmul (attention without its softmax)
    assert _chain(lambda q, k, v: jnp.einsum("bts,bsd->btd", jnp.einsum("btd,bsd->bts", q, k), v),
                  (2, 8, 4), (2, 8, 4), (2, 8, 4))

    def body(c, x):
        return jnp.dot(c, x), None

    assert _chain(lambda c, xs: jax.lax.scan(body, c, xs)[0], (4, 4), (3, 4, 4))  # via the carry
    assert _chain(lambda c, x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.dot(y, x), c), (4, 4), (4, 4))


def test_no_chain_through_arithmetic():
    assert not _chain(lambda x, a, b: jnp.dot(jax.nn.silu(jnp.dot(x, a)), b), (8, 4), (4, 2), (2, 4))
    assert not _chain(lambda x, a, b: jnp.dot(jnp.dot(x, a) * 2.0, b), (8, 4), (4, 2), (2, 4))
    # the values of attention: a projection's output as the right operand of a batched matmul
    assert not _chain(lambda p, x, w: jnp.einsum("bts,bsd->btd", p, jnp.einsum("bsi,id->bsd", x, w)),
                      (2, 8, 8), (2, 8, 4), (4, 4))

    def body(c, x):  # a matmul per step, its result leaving through arithmetic
        return c + jnp.tanh(jnp.dot(x, x)), None

    assert not _chain(lambda c, xs: jax.lax.scan(body, c, xs)[0], (4, 4), (3, 4, 4))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_scorer_has_no_chain(tiny_config, tie):
    import dataclasses

    model = Llama(dataclasses.replace(tiny_config, tie_word_embeddings=tie), rngs=nnx.Rngs(0))
    score, state = make_scorer(model)
    traced = score.trace(state, jax.ShapeDtypeStruct((2, 128), jnp.int32),
                         jax.ShapeDtypeStruct((2,), jnp.float32))
    assert not has_dot_chain(traced.jaxpr)


def _windows(vocab, n=3, seqlen=128):
    return np.random.default_rng(0).integers(0, vocab, (n, seqlen)).astype(np.int32)


def _score(compiled, state, windows):
    weight = jnp.ones((windows.shape[0],), jnp.float32)
    return float(compiled(state, jnp.asarray(windows), weight))


on_x86_cpu = pytest.mark.skipif(
    jax.default_backend() != "cpu" or platform.machine() not in ("x86_64", "AMD64"),
    reason="oneDNN matmuls are an x86 CPU option")


@on_x86_cpu
def test_onednn_scores_equal_xla_defaults(tiny_config, randomize):
    model = randomize(Llama(tiny_config, rngs=nnx.Rngs(0)))
    windows = _windows(tiny_config.vocab_size)
    fast, state, options = compile_scorer(model, 3, 128)
    plain, _, plain_options = compile_scorer(model, 3, 128, onednn=False)
    # oneDNN where the gate accepts it (an AVX-512 Xeon), XLA's defaults where not (an AVX2 EPYC)
    assert options == (ONEDNN_OPTIONS if onednn_matches_xla() else {}) and plain_options == {}
    a, b = _score(fast, state, windows), _score(plain, state, windows)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # what `nnxprune eval` runs, and reports
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for

    result = score_windows(model, windows, protocol_for("wikitext2", seqlen=128, batch_size=3),
                           progress=False)
    assert result.compiler_options == options
    assert result.to_dict()["compiler_options"] == options
    np.testing.assert_allclose(result.nll * result.predicted_tokens, a, rtol=1e-5)


def _scaled_matmul(options):
    """The smallest program seen wrong under oneDNN: a matmul times a broadcast constant."""
    rng = np.random.default_rng(1)
    x, w = (jnp.asarray(rng.standard_normal((16, 16)), jnp.float32) for _ in range(2))
    lowered = jax.jit(lambda x, w: (x @ w) * 2.0).trace(x, w).lower()
    return np.asarray(lowered.compile(dict(options))(x, w), np.float64)


@on_x86_cpu
def test_gate_agrees_with_the_reproducer():
    """The gate accepts oneDNN only where the reproducer comes out right, and refuses it where the
    reproducer comes out wrong (on an AVX2 EPYC, as `(x @ w) ** 2`)."""
    plain = _scaled_matmul({})
    reproducer_right = np.allclose(_scaled_matmul(ONEDNN_OPTIONS), plain, rtol=1e-5, atol=1e-5)
    assert onednn_matches_xla() == reproducer_right
    assert (compile_lib.probe_difference(ONEDNN_OPTIONS) <= PROBE_RTOL) == reproducer_right


@pytest.mark.parametrize("error, accepted", [(1e-3, False), (1e-6, True)])
def test_gate_threshold(monkeypatch, error, accepted):
    """A compile whose probe outputs are 0.1% off is refused; one off by float32 rounding is not."""
    real = compile_lib._outputs

    def outputs(fn, args, options):  # XLA's defaults, scaled by 1 + error where options are given
        return real(fn, args, None) * (1.0 if options is None else 1.0 + error)

    monkeypatch.setattr(compile_lib, "_outputs", outputs)
    assert compile_lib.probe_difference(ONEDNN_OPTIONS) == pytest.approx(error, rel=1e-3)
    onednn_matches_xla.cache_clear()
    try:
        assert onednn_matches_xla() == accepted
    finally:
        onednn_matches_xla.cache_clear()


@on_x86_cpu
@pytest.mark.parametrize("accepted", [False, True])
def test_compile_fast_follows_the_gate(monkeypatch, accepted):
    fn, x = jax.jit(lambda x: jnp.dot(x, x).sum()), jnp.ones((4, 4))
    monkeypatch.setattr(compile_lib, "onednn_matches_xla", lambda: accepted)
    compiled, options = compile_fast(fn, x)
    assert options == (ONEDNN_OPTIONS if accepted else {}) and float(compiled(x)) == 64.0


def test_lora_model_compiles_without_onednn(tiny_config, randomize):
    from nnxprune.recovery.config import LoRAConfig
    from nnxprune.recovery.lora import add_lora

    model = randomize(Llama(tiny_config, rngs=nnx.Rngs(0)))
    windows = _windows(tiny_config.vocab_size)
    plain, state, _ = compile_scorer(model, 3, 128, onednn=False)
    before = _score(plain, state, windows)
    add_lora(model, LoRAConfig(rank=4))  # lora_b starts at zero: the scores stay the same
    compiled, state, options = compile_scorer(model, 3, 128)
    assert options == {}
    np.testing.assert_allclose(_score(compiled, state, windows), before, rtol=1e-5)


def test_env_turns_onednn_off(monkeypatch):
    monkeypatch.setenv(compile_lib.ONEDNN_ENV, "0")
    compiled, options = compile_fast(jax.jit(lambda x: jnp.dot(x, x).sum()), jnp.ones((4, 4)))
    assert options == {} and float(compiled(jnp.ones((4, 4)))) == 64.0
