"""LoRA as LLM-Pruner's PEFT starts it, and its recovery optimizer (issue 30, item 1): the
initialization bound of `lora_a`, `lora_b = 0`, dropout on the adapter input during training
only, transformers' linear schedule, and keeping the best held-out evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxprune.data import TokenWindows
from nnxprune.errors import UserError
from nnxprune.recovery import RecoveryConfig, train
from nnxprune.recovery.best import BestKeeper
from nnxprune.recovery.config import LoRAConfig
from nnxprune.recovery.lora import LoRALinear, add_lora, init_lora_a, set_training
from nnxprune.recovery.trainer import schedule

from recovery_common import config, tiny_model, windows

IN, RANK = 4096, 64  # 262,144 draws: the max and the variance pin the bound to well under 1%


def test_peft_init_bound_and_variance_on_a_large_matrix():
    a = np.asarray(init_lora_a(jax.random.key(0), IN, RANK, jnp.float32, "peft"))
    bound = 1 / math.sqrt(IN)  # kaiming_uniform_(a=sqrt(5)): sqrt(1/3) * sqrt(3 / fan_in)
    assert a.shape == (IN, RANK)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.999 * bound  # the draws reach the bound, not a smaller one
    assert a.var() == pytest.approx(bound ** 2 / 3, rel=0.02)  # U(-b, b): variance b^2 / 3
    assert abs(a.mean()) < 0.01 * bound
    old = np.asarray(init_lora_a(jax.random.key(0), IN, RANK, jnp.float32, "he_uniform"))
    assert np.abs(old).max() / np.abs(a).max() == pytest.approx(math.sqrt(6), rel=1e-3)
    with pytest.raises(ValueError, match="unknown LoRA init"):
        init_lora_a(jax.random.key(0), IN, RANK, jnp.float32, "kaiming")


def test_peft_bound_equals_torch_kaiming_uniform_a_sqrt5():
    torch = pytest.importorskip("torch")
    w = torch.empty(RANK, IN)  # PEFT's lora_A.weight is [r, in]; ours is its transpose
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    ours = np.asarray(init_lora_a(jax.random.key(1), IN, RANK, jnp.float32, "peft"))
    assert np.abs(ours).max() == pytest.approx(float(w.abs().max()), rel=2e-3)
    assert ours.var() == pytest.approx(float(w.var()), rel=0.03)


def test_add_lora_draws_per_projection_fan_in_and_zero_b():
    model = tiny_model(masked=False)
    tokens = jnp.asarray(windows().heldout[:2])
    before = np.asarray(model(tokens))
    names = add_lora(model, LoRAConfig(rank=8))
    assert len(names) == 14
    for _, node in nnx.iter_modules(model):
        if isinstance(node, LoRALinear):
            a = np.asarray(node.lora_a[...])
            assert a.shape == (node.in_features, 8)
            assert np.abs(a).max() <= 1 / math.sqrt(node.in_features)  # 64 or 128 inputs
            assert np.abs(a).max() > 0.8 / math.sqrt(node.in_features)
            assert not np.any(np.asarray(node.lora_b[...]))
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)  # B = 0: nothing changed


def test_dropout_on_the_adapter_input_only_while_training():
    model = tiny_model(masked=False)
    add_lora(model, LoRAConfig(targets=r"layers\.0\.mlp\.up_proj", rank=4, dropout=0.5))
    node = model.layers[0].mlp.up_proj
    node.lora_b[...] = jnp.ones_like(node.lora_b[...])
    node.dropout_key[...] = jax.random.key_data(jax.random.key(3)).astype(jnp.uint32)
    x = jax.random.normal(jax.random.key(4), (2, 5, node.in_features))
    base = x @ node.kernel[...]
    full = base + (x @ node.lora_a[...]) @ node.lora_b[...] * node.scale
    np.testing.assert_allclose(np.asarray(node(x)), np.asarray(full), rtol=1e-5, atol=1e-5)
    set_training(model, True)
    dropped = node(x)
    set_training(model, False)
    assert not np.allclose(np.asarray(dropped), np.asarray(full), atol=1e-3)
    # the base path never sees dropout: with B = 0 again, training and eval agree exactly
    node.lora_b[...] = jnp.zeros_like(node.lora_b[...])
    set_training(model, True)
    np.testing.assert_allclose(np.asarray(node(x)), np.asarray(base), rtol=1e-6, atol=1e-6)
    set_training(model, False)


def test_linear_schedule_is_transformers_get_linear_schedule_with_warmup():
    cfg = RecoveryConfig(kind="lora", steps=40, warmup_steps=4, lr=1e-4, schedule="linear",
                         min_lr_ratio=0.0)
    sched = schedule(cfg)

    def hf(step):  # transformers.optimization.get_linear_schedule_with_warmup's lr_lambda
        if step < 4:
            return step / 4
        return max(0.0, (40 - step) / (40 - 4))
    for step in range(41):
        assert float(sched(step)) == pytest.approx(1e-4 * hf(step), abs=1e-10), step
    cosine = schedule(RecoveryConfig(kind="lora", steps=40, warmup_steps=4, lr=1e-4))
    assert float(cosine(22)) != pytest.approx(float(sched(22)))  # the default stays cosine


def test_recovery_config_checks_the_new_keys():
    with pytest.raises(UserError, match="init"):
        RecoveryConfig.from_dict({"kind": "lora", "lora": {"init": "kaiming"}})
    with pytest.raises(UserError, match="schedule"):
        RecoveryConfig.from_dict({"kind": "lora", "schedule": "cosin"})
    with pytest.raises(UserError, match="beta2"):
        RecoveryConfig.from_dict({"kind": "lora", "beta2": 1.0})
    with pytest.raises(UserError, match="keep_best needs held-out"):
        RecoveryConfig.from_dict({"kind": "lora", "keep_best": True, "eval_every": 0})
    cfg = RecoveryConfig.from_dict({"kind": "lora", "beta2": 0.999, "schedule": "linear"})
    assert cfg.lora.init == "peft" and cfg.beta2 == 0.999


def test_keeper_skips_step_zero_and_keeps_the_lowest():
    keeper = BestKeeper(enabled=True)
    state = {"w": jnp.ones(3)}
    assert not keeper.observe({"step": 0, "loss": 0.1}, state)  # the untrained model
    assert keeper.observe({"step": 5, "loss": 2.0}, state)
    assert not keeper.observe({"step": 10, "loss": float("nan")}, {"w": jnp.zeros(3)})
    assert not keeper.observe({"step": 15, "loss": 2.0}, {"w": jnp.zeros(3)})  # ties: earlier
    assert keeper.report() == {"step": 5, "loss": 2.0}
    np.testing.assert_array_equal(keeper.final({"w": jnp.zeros(3)})["w"], np.ones(3))
    np.testing.assert_array_equal(keeper.final({"w": jnp.zeros(3)}, finished=False)["w"], np.zeros(3))
    assert BestKeeper(enabled=False).report() is None


def test_keep_best_ends_with_the_best_evaluations_weights():
    """Held-out windows from another token cycle than the training windows: fitting the training
    cycle soon makes the held-out loss rise, so the last step is not the best. The kept model is
    the one at the best evaluation, the same as a run stopped there."""
    data = TokenWindows(train=windows().train, heldout=windows(seed=1).heldout, source="two cycles")
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "merge": False}
    common = dict(kind="lora", steps=8, lr=3e-2, warmup_steps=0, schedule="linear",
                  min_lr_ratio=1.0, beta2=0.999, eval_every=1, eval_batches=1, lora=lora)
    kept = tiny_model(masked=False)
    result = train(kept, config(keep_best=True, **common), windows=data, progress=False)
    losses = {row["step"]: row["loss"] for row in result.evals if row["step"] > 0}
    best = min(losses, key=losses.get)
    assert result.best == {"step": best, "loss": losses[best]}
    assert best < 8 and losses[8] > losses[best]  # the last step is not the best here
    stopped = tiny_model(masked=False)
    train(stopped, config(keep_best=False, **common), windows=data, progress=False,
          stop_after=best)
    tokens = jnp.asarray(windows().heldout[:2])
    np.testing.assert_allclose(np.asarray(kept(tokens)), np.asarray(stopped(tokens)),
                               rtol=1e-5, atol=1e-5)
