"""The recovery trainer on a tiny GQA Llama: the loss falls, masks hold exactly, 1 device and 8
simulated devices agree and place arrays by the channel-space rules, LoRA trains adapters only and
merges to the same outputs, a resumed run equals an uninterrupted one, bad input fails before
training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx
from recovery_common import CFG, MESH_RUN, config, tiny_model, windows

from nnxprune.errors import UserError
from nnxprune.layers import Linear
from nnxprune.recovery import LoRAConfig, LoRALinear, add_lora, merge_lora, train
from nnxprune.recovery.losses import Distillation, forward
from nnxprune.recovery.trainer import make_tx
from nnxprune.variables import Mask

HERE = Path(__file__).resolve().parent


def masked_linears(model):
    return [(p, n) for p, n in nnx.iter_modules(model) if isinstance(n, Linear) and n.mask is not None]


def test_loss_falls_masks_hold_and_logs(tmp_path):
    model = tiny_model()
    masks_before = {p: np.asarray(n.mask[...]) for p, n in masked_linears(model)}
    result = train(model, config(steps=20, grad_accum=2, eval_every=10, eval_batches=1),
                   windows=windows(), log_dir=tmp_path, progress=False)
    assert len(result.losses) == 20 and result.steps == 20
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.evals[-1]["loss"] < result.evals[0]["loss"]
    # masks: unchanged, and every masked weight is exactly zero after 20 steps
    assert len(masks_before) == 7
    for path, lin in masked_linears(model):
        mask = np.asarray(lin.mask[...])
        np.testing.assert_array_equal(mask, masks_before[path])
        kernel = np.asarray(lin.effective_kernel())
        assert np.all(kernel[~mask] == 0.0), path
        assert np.count_nonzero(kernel[mask]) == mask.sum()  # the kept weights did train
    # logs: one train line per step, held-out lines, a PNG
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 21))
    assert [r["step"] for r in rows if r["split"] == "heldout"] == [0, 10, 20]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert result.tokens_per_second > 0


def test_optimizer_never_sees_masks():
    model = tiny_model()
    opt = nnx.Optimizer(model, make_tx(config()), wrt=nnx.Param)
    opt_types = {type(v) for _, v in nnx.iter_graph(opt) if isinstance(v, nnx.Variable)}
    assert Mask not in opt_types
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    mu = [p for p, _ in nnx.to_flat_state(nnx.state(opt)) if "mu" in p]
    assert len(mu) == n_params


def test_distillation_bf16_with_hidden_mse():
    teacher = randomize_params(tiny_model(seed=1, masked=False), seed=1, scale=0.1)
    tokens = jnp.asarray(windows().train[:2])
    strategy = Distillation(temperature=2.0, ce_weight=0.5, hidden_layers=(0,), hidden_weight=1.0)
    out = forward(teacher, tokens, (0,))
    loss, metrics = strategy.compute_loss(out, out, tokens)  # a model against itself: KL 0, MSE 0
    assert abs(float(metrics["kl"])) < 1e-5 and float(metrics["hidden_mse"]) == 0.0
    student = nnx.clone(teacher)
    for _, lin in nnx.iter_modules(student):
        if isinstance(lin, Linear) and lin.out_space == "mlp":
            lin.set_mask(jnp.abs(lin.kernel[...]) > 0.1)
    cfg = config(kind="distill", steps=12, lr=2e-3, compute_dtype="bfloat16",
                 distill={"temperature": 2.0, "hidden_layers": [0], "hidden_weight": 1.0})
    result = train(student, cfg, windows=windows(), teacher=teacher, progress=False)
    assert result.strategy["strategy"] == "Distillation"
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert student.embed_tokens.embedding.dtype == jnp.float32  # float32 master weights
    with pytest.raises(UserError, match="needs a teacher"):
        train(tiny_model(), cfg, windows=windows(), progress=False)


def test_lora_trains_adapters_only_and_merges_to_the_same_outputs():
    model = tiny_model()
    params_before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cfg = config(kind="lora", steps=10, lr=1e-2,
                 lora={"targets": r"layers\.\d+\.(self_attn\.q_proj|mlp\..*)", "rank": 4,
                       "alpha": 8.0, "dropout": 0.1, "merge": False})
    result = train(model, cfg, windows=windows(), progress=False)
    assert len(result.lora_paths) == 8 and result.lora_merged == 0
    assert result.losses[-1] < result.losses[0]
    lora = [n for _, n in nnx.iter_modules(model) if isinstance(n, LoRALinear)]
    assert len(lora) == 8 and all(float(jnp.abs(n.lora_b[...]).max()) > 0 for n in lora)
    # every base parameter is bit-for-bit what it was: only adapters trained
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, value in params_before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value, err_msg=str(key))
    tokens = jnp.asarray(windows().heldout[:2])
    unmerged = model(tokens)
    assert merge_lora(model) == 8
    assert not any(isinstance(n, LoRALinear) for _, n in nnx.iter_modules(model))
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(unmerged), atol=2e-5)
    for path, lin in masked_linears(model):  # merging revived no pruned weight
        assert np.all(np.asarray(lin.effective_kernel())[~np.asarray(lin.mask[...])] == 0), path


def test_lora_regex_matching_nothing_fails_before_training(tmp_path):
    cfg = config(kind="lora", lora={"targets": "layers.*attn_proj"})
    with pytest.raises(UserError, match="matches no projection"):
        cfg.check(CFG)
    with pytest.raises(UserError, match="matches no projection"):
        train(tiny_model(), cfg, windows=windows(), log_dir=tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="matches no projection"):
        add_lora(tiny_model(), LoRAConfig(targets="nothing"))


@pytest.mark.parametrize("kwargs, match", [
    ({"mesh": {"data": -1, "fsdp": 3}}, "do not divide the 8 available devices"),
    ({"mesh": {"data": 3}}, "needs 3 devices but 8 are available"),
    ({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}}, "needs 4 devices but 8 are available"),
    ({"batch_size": 4}, "not divisible by the data axis"),
    ({"batch_size": 16, "grad_accum": 8, "mesh": {"data": 4, "tensor": -1}}, "micro-batch"),
])
def test_bad_mesh_and_batch_fail_before_training(kwargs, match):
    with pytest.raises(UserError, match=match):
        config(**kwargs).check(CFG, device_count=8)


def test_resume_equals_uninterrupted(tmp_path):
    run = dict(steps=6, checkpoint_every=2, keep_checkpoints=2, grad_accum=2)
    full = train(tiny_model(), config(**run), windows=windows(), progress=False,
                 log_dir=tmp_path / "full")
    first = train(tiny_model(), config(**run), windows=windows(), progress=False,
                  log_dir=tmp_path / "cut", stop_after=3)  # interrupted after step 3
    assert len(first.losses) == 3
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["2"]
    second = train(tiny_model(), config(**run), windows=windows(), progress=False,
                   log_dir=tmp_path / "cut")  # resumes from step 2
    assert second.resumed_from == 2
    np.testing.assert_array_equal(first.losses[:2] + second.losses, full.losses)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["4", "6"]  # keep-last-2
    rows = [json.loads(r) for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_one_device_and_eight_devices_agree_and_follow_the_rules():
    """The same run on 1 device here and on a (data 2, fsdp 2, tensor 2) mesh of 8 simulated CPU
    devices in a subprocess (XLA_FLAGS must be set before jax is imported)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(HERE / "multi_device_run.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = train(tiny_model(), config(**MESH_RUN), windows=windows(), progress=False)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    multi = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    assert multi["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and single.mesh["data"] == 1
    np.testing.assert_allclose(multi["losses"], single.losses, rtol=2e-5)
    params, opt = multi["placement"]["params"], multi["placement"]["optimizer"]
    expect = {  # channel spaces -> axes: embed -> fsdp; heads, mlp, vocab -> tensor
        "layers.0.mlp.up_proj.kernel": "('fsdp', 'tensor')",
        "layers.0.mlp.down_proj.kernel": "('tensor', 'fsdp')",
        "layers.1.self_attn.q_proj.kernel": "('fsdp', 'tensor')",
        "layers.1.self_attn.k_proj.kernel": "('fsdp', 'tensor')",
        "layers.1.self_attn.o_proj.kernel": "('tensor', 'fsdp')",
        "embed_tokens.embedding": "('tensor', 'fsdp')",
        "norm.scale": "('fsdp',)",
    }
    for path, spec in expect.items():
        assert params[path] == f"P{spec}", (path, params[path])
        moments = [v for k, v in opt.items() if k.endswith("." + path) and (".mu." in k or ".nu." in k)]
        assert moments == [f"P{spec}"] * 2, (path, moments)
    assert all(v == "P()" for k, v in opt.items() if k.endswith("count"))
    assert "needs 3 devices but 8 are available" in multi["errors"]["mesh"]
    assert "not divisible by the data axis" in multi["errors"]["batch"]
