"""Minitron's full distillation on tiny models: layer pairs follow the layers depth pruning kept
(recorded by `drop_layers`, kept in checkpoints), the cosine loss on norm outputs with its
rescaling to the logit loss, the projection of a narrower student (trained, then gone), and
teacher correction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx
from recovery_common import SEQLEN, VOCAB, config, windows

from nnxprune import graph
from nnxprune.errors import UserError
from nnxprune.io.checkpoint import load_checkpoint, read_meta, save_checkpoint
from nnxprune.measure import count_params
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.recovery import RecoveryConfig, train
from nnxprune.recovery import pairs as pairs_lib
from nnxprune.recovery.losses import balance, cosine_loss, forward, strategy_for
from nnxprune.recovery.teacher_correction import correct_teacher


def model(layers=4, hidden=64, seed=0) -> Llama:
    cfg = LlamaConfig.uniform(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16)
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.2)


def distill_cfg(**distill):
    return config(kind="distill", steps=3, lr=1e-3, distill={"intermediate": True, **distill})


def tokens():
    return jnp.asarray(windows().train[:2])


def test_depth_pruning_records_kept_layers_and_checkpoints_keep_them(tmp_path):
    student = model()
    graph.drop_layers(student, [1])
    graph.drop_layers(student, [0])  # indices into the current layers: source layer 0 goes
    assert pairs_lib.source_layers(student) == (2, 3)
    save_checkpoint(student, tmp_path / "ckpt")
    assert read_meta(tmp_path / "ckpt")["source_layers"] == [2, 3]
    assert pairs_lib.source_layers(load_checkpoint(tmp_path / "ckpt")) == (2, 3)


def test_default_pairs_map_to_the_kept_teacher_layers():
    teacher = model()
    student = nnx.clone(teacher)
    graph.drop_layers(student, [1])
    assert pairs_lib.default_pairs(student, teacher) == ((0, 0), (1, 2), (2, 3), (-1, -1))
    strategy = pairs_lib.prepare(strategy_for(distill_cfg(hidden_layers=[1], hidden_weight=1.0)),
                                 student, teacher)
    assert strategy.pairs == ((0, 0), (1, 2), (2, 3), (-1, -1))
    assert strategy.teacher_hidden_layers == (2,)  # the MSE compares layer 1 with teacher layer 2
    assert pairs_lib.projections(student) is None  # same width: no projection
    # the teacher side of pair (1, 2) is the teacher's layer-2 input norm of its layer-1 output
    t_out = strategy.teacher_forward(teacher, tokens())
    x = teacher.embed_tokens(tokens())
    hidden = teacher.run_layers(x, jnp.broadcast_to(jnp.arange(SEQLEN), (2, SEQLEN)), keep={1})
    np.testing.assert_allclose(t_out.pairs[1], teacher.layers[2].input_layernorm(hidden.hidden[1]),
                               rtol=1e-5, atol=1e-6)
    # a teacher that is itself pruned maps through its own source layers
    pruned_teacher = nnx.clone(teacher)
    graph.drop_layers(pruned_teacher, [0])  # source (1, 2, 3)
    with pytest.raises(UserError, match="source layer 0, which the teacher does not have"):
        pairs_lib.teacher_layers(student, pruned_teacher)


def test_aligned_pairs_agree_where_the_student_is_the_teacher():
    """Dropping the last layer leaves every kept layer's input unchanged: the cosine loss of its
    layer pairs is 0, only the final norms differ; pairing by index after dropping layer 0 is
    what the default avoids (its first pair compares embeddings with layer 0's output)."""
    teacher = model()
    student = nnx.clone(teacher)
    graph.drop_layers(student, [3])
    strategy = pairs_lib.prepare(strategy_for(distill_cfg()), student, teacher)
    s_out, t_out = strategy.student_forward(student, tokens()), strategy.teacher_forward(teacher, tokens())
    per_pair = [float(cosine_loss(s_out.pairs[k], t_out.pairs[k])) for k in range(4)]
    assert max(per_pair[:3]) < 1e-6 and per_pair[3] > 1e-3
    front = nnx.clone(teacher)
    graph.drop_layers(front, [0])
    by_source = pairs_lib.prepare(strategy_for(distill_cfg()), front, teacher)
    assert by_source.pairs[:3] == ((0, 1), (1, 2), (2, 3))
    s_out = by_source.student_forward(front, tokens())
    t_out = by_source.teacher_forward(teacher, tokens())
    assert float(cosine_loss(s_out.pairs[1], t_out.pairs[1])) > 1e-3  # different inputs now


def test_cosine_loss_and_rescaling_by_hand():
    a = jnp.asarray([[[1.0, 0.0], [1.0, 1.0]]])
    b = jnp.asarray([[[0.0, 2.0], [2.0, 2.0]]])
    assert float(cosine_loss(a, b)) == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    kl, cos = jnp.float32(0.7), jnp.float32(0.2)
    assert float(balance(kl, cos)) == pytest.approx(0.7)  # scaled to the logit loss
    d_cos, d_kl = jax.grad(lambda c, k: balance(k, c), argnums=(0, 1))(cos, kl)
    assert float(d_cos) == pytest.approx(0.7 / 0.2) and float(d_kl) == 0.0  # the ratio is detached
    assert float(balance(kl, jnp.float32(0.0))) == 0.0
    teacher = model()
    student = randomize_params(nnx.clone(teacher), seed=5, scale=0.2)
    strategy = pairs_lib.prepare(strategy_for(distill_cfg()), student, teacher)
    loss, metrics = strategy.compute_loss(strategy.student_forward(student, tokens()),
                                          strategy.teacher_forward(teacher, tokens()), tokens())
    assert float(metrics["intermediate"]) > 0
    assert float(loss) == pytest.approx(2 * float(metrics["kl"]), rel=1e-5)


def test_width_pruned_student_trains_a_projection_that_is_never_saved(tmp_path, monkeypatch):
    teacher = model(hidden=64)
    student = model(hidden=48, seed=1)
    cfg = distill_cfg()
    params_before = count_params(student)
    strategy = pairs_lib.prepare(strategy_for(cfg), student, teacher, seed=cfg.seed)
    proj = pairs_lib.projections(student)
    assert len(proj) == len(strategy.pairs) == 5 and proj[0].kernel.shape == (48, 64)
    initial = np.asarray(proj[4].kernel[...])

    gdef, params, rest = nnx.split(student, nnx.Param, ...)

    def loss(params):
        s = nnx.merge(gdef, params, rest)
        return strategy.compute_loss(strategy.student_forward(s, tokens()),
                                     strategy.teacher_forward(teacher, tokens()), tokens())[0]

    grads = jax.grad(loss)(params)
    for k in range(5):
        assert float(jnp.abs(grads["distill_projections"][k]["kernel"][...]).max()) > 0
    pairs_lib.detach(student)
    trained = {}
    detach = pairs_lib.detach

    def spy(m):  # the projection as training leaves it, just before the trainer drops it
        if pairs_lib.projections(m) is not None:
            trained["kernel"] = np.asarray(pairs_lib.projections(m)[4].kernel[...])
        return detach(m)

    monkeypatch.setattr(pairs_lib, "detach", spy)
    result = train(student, cfg, windows=windows(), teacher=teacher, progress=False)
    assert len(result.losses) == 3 and result.strategy["pairs"][-1] == (-1, -1)
    assert not np.array_equal(trained["kernel"], initial)  # trained with the student...
    assert pairs_lib.projections(student) is None  # ...and gone after training
    assert count_params(student) == params_before
    save_checkpoint(student, tmp_path / "s")
    loaded = load_checkpoint(tmp_path / "s")
    assert not any("distill_projections" in str(p) for p, _ in nnx.to_flat_state(nnx.state(loaded)))
    legacy = RecoveryConfig.from_dict({"kind": "distill", "seqlen": SEQLEN, "batch_size": 8,
                                       "distill": {"hidden_layers": [0], "hidden_weight": 1.0}})
    with pytest.raises(UserError, match="intermediate = true pairs any widths"):
        train(model(hidden=48), legacy, windows=windows(), teacher=teacher, progress=False)


def test_config_errors():
    base = {"kind": "distill"}
    for distill, message in (
            ({"pairs": [[0, 0]]}, "set intermediate = true"),
            ({"intermediate": True, "pairs": [[0]]}, "is not a \\[student, teacher\\] pair"),
            ({"intermediate": True, "pairs": [["last", 0]]}, "is not a \\[student, teacher\\]"),
            ({"intermediate": True, "kd_weight": 0.0, "ce_weight": 1.0}, "needs kd_weight > 0"),
            ({"intermediate": "yes"}, "must be true or false"),
            ({"teacher_correction_steps": -1}, "teacher_correction_steps must be an integer"),
            ({"teacher_correction_lr": -1.0}, "teacher_correction_lr must be a number")):
        with pytest.raises(UserError, match=message):
            RecoveryConfig.from_dict({**base, "distill": distill})
    cfg = RecoveryConfig.from_dict({**base, "distill": {"intermediate": True,
                                                        "pairs": [[3, "final"]]}})
    with pytest.raises(UserError, match="layer 3 does not exist in the student"):
        cfg.check(model(layers=2).config, device_count=1)
    assert strategy_for(cfg).pairs == ((3, -1),)


def test_teacher_correction_changes_a_copy_for_its_steps_only():
    teacher = model()
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param))}
    cfg = config(kind="distill", steps=6, batch_size=8, lr=1e-3,
                 distill={"teacher_correction_steps": 2, "teacher_correction_lr": 5e-3})
    corrected, entry = correct_teacher(teacher, cfg, windows=windows())
    assert entry["steps"] == 2 and entry["lr"] == 5e-3
    assert entry["tokens"] == 2 * 8 * SEQLEN  # two steps of the recovery's batch, no more
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param))}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the caller's teacher stays
    moved = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(corrected, nnx.Param))}
    assert any(not np.array_equal(before[k], moved[k]) for k in before)
    same, none = correct_teacher(teacher, config(kind="distill", steps=2), windows=windows())
    assert same is teacher and none is None
    out_a = forward(teacher, tokens()).logits
    out_b = forward(corrected, tokens()).logits
    assert float(jnp.abs(out_a - out_b).max()) > 0


def test_recover_corrects_the_teacher_then_distills_by_source_layer():
    """`recover` (the step `nnxprune prune` and `nnxprune train` run): the correction's steps in
    the report, then the distillation pairs by source layer; the student keeps no projection."""
    from nnxprune.recovery.run import recover

    teacher = model()
    student = nnx.clone(teacher)
    graph.drop_layers(student, [2])
    cfg = config(kind="distill", steps=2, batch_size=8, lr=1e-3,
                 distill={"intermediate": True, "teacher_correction_steps": 2})
    entry = recover(student, cfg, tokenizer=None, teacher=teacher, windows=windows(),
                    progress=False, echo=lambda *a: None)
    assert entry["teacher_correction"]["steps"] == 2 and entry["steps"] == 2
    assert entry["strategy"]["pairs"] == ((0, 0), (1, 1), (2, 3), (-1, -1))
    assert pairs_lib.projections(student) is None and pairs_lib.source_layers(student) == (0, 1, 3)
