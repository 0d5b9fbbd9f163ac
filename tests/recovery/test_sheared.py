"""Sheared LLaMA's pruning stage: hard-concrete gates against their closed forms, the Lagrangian's
ascent, soft gates = the fold, the recipe check, and 1 device = 8 simulated devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.algorithms import hard_concrete as hc
from nnxprune.errors import UserError
from nnxprune.measure import count_params
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.recovery.l0 import L0Module, ShearTarget
from nnxprune.recovery.shear_model import fold, masked_logits
from nnxprune.recovery.shear_train import ShearConfig, train_masks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recovery_common import CFG, tiny_model, windows  # noqa: E402

RECIPES = HERE.parents[1] / "recipes"


# -- hard concrete ---------------------------------------------------------------------------------
def test_sampler_mean_and_nonzero_probability_match_closed_forms():
    """Monte Carlo (fixed seed, 400k draws per gate) against P(z > 0), P(z = 1) in closed form
    and the mean as the integral of the exact inverse CDF (midpoint rule, 2M points)."""
    log_alpha = jnp.asarray([-3.0, -1.0, 0.0, 1.5, 4.0])
    n = 400_000
    z = hc.sample(jax.random.key(0), jnp.broadcast_to(log_alpha, (n, 5)))
    u = (jnp.arange(2_000_000, dtype=jnp.float32) + 0.5) / 2_000_000
    mean = jnp.stack([jnp.mean(hc.quantile(u, la)) for la in log_alpha])
    p0 = hc.prob_nonzero(log_alpha)
    p1 = hc.prob_one(log_alpha)
    tol = 4 * np.sqrt(0.25 / n)
    np.testing.assert_allclose(np.mean(np.asarray(z) > 0, 0), p0, atol=tol)
    np.testing.assert_allclose(np.mean(np.asarray(z) == 1, 0), p1, atol=tol)
    np.testing.assert_allclose(np.mean(np.asarray(z), 0), mean, atol=tol)
    # the closed form itself: P(z > 0) = 1 - sigmoid(beta log(-l/r) - log_alpha)
    expect = 1 - 1 / (1 + np.exp(-(2 / 3 * np.log(0.1 / 1.1) - np.asarray(log_alpha))))
    np.testing.assert_allclose(p0, expect, rtol=1e-5)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0


def test_init_clamp_and_deterministic_gates():
    la = hc.constrain(hc.init_log_alpha(jax.random.key(0), (3, 9)))
    np.testing.assert_allclose(la, np.log(100.0), rtol=1e-6)  # N(5, 0.01) clamped to ln 100
    la = jnp.asarray([[0.5, -2.0, 3.0, 3.0, 1.0]])
    z = hc.deterministic(la, keep=3)
    assert np.count_nonzero(z) == 3 and z[0, 1] == 0 and z[0, 0] == 0  # ties: lower index first
    np.testing.assert_allclose(z[0, 2], 1 / (1 + np.exp(-3.0 / (2 / 3) * 0.8)), rtol=1e-6)


# -- the L0 module and the Lagrangian -----------------------------------------------------------
SMALL = LlamaConfig.uniform(vocab_size=128, hidden_size=64, num_layers=4, num_heads=6,
                            num_kv_heads=2, intermediate_size=96, head_dim=16)


def _random_gates(l0: L0Module, seed: int = 0) -> None:
    for i, name in enumerate(l0.plan.types):
        var = getattr(l0, f"{name}_log_alpha")
        var[...] = 3.0 * jax.random.normal(jax.random.key(seed + i), var.shape)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("target", [
    {"layers": 3, "heads": 2, "intermediate": 40, "hidden": 48},           # query heads in groups
    {"layers": 3, "heads": 3, "kv_heads": 1, "intermediate": 40, "hidden": 48},  # whole KV groups
    {"heads": 4},
])
def test_soft_gates_equal_the_folded_model(tied, target):
    """The model under deterministic gates (applied softly) gives the logits of the folded model,
    which has exactly the target shapes and the predicted parameter count."""
    import dataclasses

    cfg = dataclasses.replace(SMALL, tie_word_embeddings=tied)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    plan = ShearTarget(**target).resolve(cfg)
    l0 = L0Module(plan, rngs=nnx.Rngs(1))
    _random_gates(l0)
    zs = l0.deterministic()
    assert all(float(jnp.min(jnp.where(z > 0, z, 1))) < 1 for z in zs.values())  # soft values
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 20)), jnp.int32)
    soft = masked_logits(model, zs, tokens)
    fold(model, zs, plan)
    np.testing.assert_allclose(model(tokens), soft, atol=1e-5, rtol=1e-5)
    assert model.config == plan.target_config(cfg)
    assert count_params(model) == plan.params()


def test_expected_params_at_the_target_equal_the_folded_count():
    plan = ShearTarget(layers=3, heads=4, intermediate=40, hidden=48).resolve(SMALL)
    l0 = L0Module(plan, rngs=nnx.Rngs(0))
    for name, keep in (("layer", 3), ("head", 4), ("intermediate", 40), ("hidden", 48)):
        var = getattr(l0, f"{name}_log_alpha")
        row = np.where(np.arange(var.shape[-1]) < keep, 100.0, -100.0)
        var[...] = jnp.broadcast_to(jnp.asarray(row, jnp.float32), var.shape)
    np.testing.assert_allclose(float(l0.expected_params()), plan.params(), rtol=1e-4)
    np.testing.assert_allclose(float(l0.expected_sizes()["head"]), 4, rtol=1e-4)


def test_lagrangian_ascent_grows_the_penalty_while_the_expected_size_is_above_target():
    """Gates start at P(z > 0) ~ 1: every expected size is above its target (expected sparsity
    below target). Ascent on lambda: lambda2 rises, lambda1 moves toward (s - t) < 0, and the
    Lagrangian term the masks minimise grows (the reference's signs: loss `lambda1 (s - t) +
    lambda2 (s - t)^2`, multipliers at learning rate -lag_lr)."""
    model = tiny_model(masked=False)
    plan = ShearTarget(layers=1, heads=2, intermediate=64, hidden=48).resolve(model.config)
    l0 = L0Module(plan, rngs=nnx.Rngs(0))
    cfg = ShearConfig(steps=3, batch_size=8, seqlen=32, lr=1e-3, warmup=0.0, target_warmup=0.0)
    result = train_masks(model, l0, cfg, windows().train, progress=False)
    first, second, third = result.history
    assert first["lagrangian"] == 0.0 and first["lambda1_hidden"] == 0.0
    for name in plan.types:
        assert second[f"expected_{name}_sparsity"] < second[f"target_{name}_sparsity"]
        assert second[f"lambda1_{name}"] < 0 < second[f"lambda2_{name}"]
        assert third[f"lambda1_{name}"] < second[f"lambda1_{name}"]
        assert third[f"lambda2_{name}"] > second[f"lambda2_{name}"]
    assert third["lagrangian"] > second["lagrangian"] > 0
    assert third["expected_params"] < first["expected_params"]  # the masks respond


# -- checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, message", [
    ({"hidden": 80}, "wider than the source's 64"),
    ({"layers": 5}, "wider than the source's 4"),
    ({"heads": 5}, "is not reachable"),
    ({"heads": 3, "kv_heads": 2}, "do not divide over kv_heads = 2"),
    ({"heads": 2, "kv_heads": 1}, "shrinking both is not supported"),
    ({"hidden": 0}, "must be at least 1"),
    ({"kv_heads": 1}, "kv_heads needs heads"),
    ({}, "names nothing"),
])
def test_unreachable_targets_are_one_clear_error(target, message):
    with pytest.raises(UserError, match=message):
        ShearTarget(**target).resolve(SMALL)


def test_recipe_check_predicts_the_target_config_and_rejects_bad_settings():
    from nnxprune.recipes import load_recipe

    recipe = load_recipe(RECIPES / "sheared-smollm2-90m.toml")
    smollm = LlamaConfig.uniform(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                 num_kv_heads=3, intermediate_size=1536, head_dim=64,
                                 tie_word_embeddings=True, max_position_embeddings=8192)
    predicted = recipe.check(smollm)
    assert predicted.num_layers == 24 and predicted.hidden_size == 528
    assert predicted.layers[0].num_heads == 6 and predicted.layers[0].num_kv_heads == 3
    for override, message in (("prune.0.heads=4", "not reachable"),
                              ("prune.0.hidden=600", "wider"),
                              ("prune.0.target_warmup=1.5", "fraction"),
                              ("prune.0.batch_size=0", "positive")):
        with pytest.raises(UserError, match=message):
            load_recipe(RECIPES / "sheared-smollm2-90m.toml", [override]).check(smollm)


def test_llama2_recipe_passes_check_from_the_card_config(capsys):
    """`nnxprune prune recipes/sheared-llama2-2.7b.toml --check` needs no hub and no weights:
    the llama-2-7b card carries its config.json."""
    from nnxprune import cli

    assert cli.main(["prune", str(RECIPES / "sheared-llama2-2.7b.toml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "hidden    4096 -> 2560; layers 32 -> 32" in out
    assert "   31     20  20  6912" in out  # layer 31: 20 heads, 20 KV heads (MHA), MLP 6912
    assert "6,738,415,616 -> 2,701,560,320" in out


# -- sharding --------------------------------------------------------------------------------------
def mesh_run(mesh):
    """The tiny pruning run both the 1-device test and the 8-device subprocess make."""
    model = tiny_model(masked=False)
    plan = ShearTarget(layers=1, heads=2, intermediate=64, hidden=48).resolve(CFG)
    cfg = ShearConfig(steps=3, batch_size=8, grad_accum=2, seqlen=32, lr=1e-3, target_warmup=0.5)
    return train_masks(model, L0Module(plan, rngs=nnx.Rngs(0)), cfg, windows().train, mesh=mesh,
                       progress=False)


def test_one_device_and_eight_devices_give_the_same_losses():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(HERE / "sheared_multi_device_run.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = mesh_run(None)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    multi = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    assert multi["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and single.mesh["data"] == 1
    np.testing.assert_allclose(multi["loss"], [h["loss"] for h in single.history], rtol=2e-5)
    np.testing.assert_allclose(multi["expected_params"],
                               [h["expected_params"] for h in single.history], rtol=2e-5)
