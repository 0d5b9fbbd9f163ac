"""Gradient-based pruning on a sharded model: the runs that test_gradients_sharded.py makes on 1
device (in the pytest process) and, as a script, on 8 simulated CPU devices (in a subprocess: the
XLA flag must be set before jax is imported). `python gradients_sharded_run.py OUT.npz` writes
every array the test compares, keyed by name.

- `taylor`: LLM-Pruner's gradient pass (first and second order) and every Taylor variant's
  per-layer scores, then the `llm_pruner` transform (Taylor-mix ranked KV groups and MLP neurons,
  removed): the pruned model's arrays. Without a given mesh the pass spreads the model over
  every device (`sharding.auto_sizes`: 4 rows -> fsdp 4 x tensor 2 on 8 devices).
- `placed`: the same pass on a model placed on a (data 2, fsdp 2, tensor 2) mesh first: its
  gradients stay sharded like the kernels (the spec of one is recorded).
- `sheared`: Sheared LLaMA's mask training (auto mesh: micro-batch 4 -> fsdp 4 x tensor 2) and
  the fold: per-step losses, expected sizes and the folded model's arrays.
- `real` (`OUT.npz --real`): SmolLM2-135M's Taylor scores.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for conftest's randomize_params


def model_and_tokens():
    from conftest import randomize_params
    from flax import nnx

    from nnxprune.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.uniform(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=40, head_dim=8)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), seed=0, scale=0.15)
    return model, np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)


def _state(model, prefix: str) -> dict[str, np.ndarray]:
    from flax import nnx

    return {f"{prefix}/{'.'.join(map(str, path))}": np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model))}


def _grads(grads, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{layer}/{kind}/{name}": np.asarray(g)
            for layer, by_kind in grads.stats.items() for kind, by_name in by_kind.items()
            for name, g in by_name.items()}


def taylor_run() -> dict[str, np.ndarray]:
    from nnxprune.calibration.gradients import gradient_pass
    from nnxprune.scoring.taylor import VARIANTS, taylor_importance
    from nnxprune.transforms import Context
    from nnxprune.transforms.coupled import LLMPruner

    model, tokens = model_and_tokens()
    grads = gradient_pass(model, tokens, second_order=True, batch_size=2)
    out = {"loss": np.float32(grads.loss), **_grads(grads, "grad")}
    scores = taylor_importance(model, tokens, VARIANTS)
    for key, per_layer in scores.items():
        if key.startswith("taylor_"):
            out[f"score/{key}"] = np.asarray(per_layer, np.float32)
    LLMPruner(ratio=0.5, score="taylor_mix", attention_start=0, attention_end=3, mlp_start=0,
              mlp_end=3)(model, Context(tokens=tokens, progress=False))
    return {**out, **_state(model, "llm_pruner")}


def placed_run() -> tuple[dict[str, np.ndarray], str]:
    """The pass on a model placed on a (2, 2, 2) mesh (8 devices only); the gradients and the
    spec of layer 0's up_proj gradient."""
    from nnxprune.calibration.gradients import gradient_pass
    from nnxprune.recovery import sharding as sh

    model, tokens = model_and_tokens()
    sh.place_model(model, sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    grads = gradient_pass(model, tokens, second_order=True)
    spec = str(grads.stats[0]["gradient"]["mlp.up_proj"].sharding.spec)
    return _grads(grads, "placed"), spec


def sheared_run() -> dict[str, np.ndarray]:
    from nnxprune.recovery.l0 import ShearTarget
    from nnxprune.recovery.shear_train import ShearConfig
    from nnxprune.transforms.sheared import prune_to_target

    model, tokens = model_and_tokens()
    windows = np.random.default_rng(1).integers(0, 128, (16, 16)).astype(np.int32)
    target = ShearTarget(layers=2, heads=2, intermediate=24, hidden=24)
    cfg = ShearConfig(steps=3, batch_size=8, grad_accum=2, seqlen=16, lr=1e-3, target_warmup=0.5)
    result, record = prune_to_target(model, target, cfg, windows, progress=False)
    mesh = np.asarray([result.mesh[a] for a in ("data", "fsdp", "tensor")])
    return {"sheared_loss": np.asarray([h["loss"] for h in result.history]),
            "sheared_expected_params": np.asarray(record["expected_params_per_step"]),
            "sheared_mesh": mesh, **_state(model, "sheared")}


def real_run() -> dict[str, np.ndarray]:
    """SmolLM2-135M (the installed card): LLM-Pruner's element-wise Taylor scores of every
    layer's MLP neurons [30, 1536] and KV groups [30, 3] from one gradient pass over 4 rows of
    64 random tokens (the pass spread by `sharding.auto_sizes`: fsdp 4 x tensor 2 on 8 devices)."""
    from nnxprune.io.load import load_model
    from nnxprune.scoring.taylor import taylor_importance

    model = load_model("smollm2-135m", with_tokenizer=False).model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (4, 64)).astype(np.int32)
    scores = taylor_importance(model, tokens, ("element1",))
    return {"real_loss": np.float32(scores["loss"]),
            "real_mlp": np.asarray(scores["taylor_mlp"], np.float32),
            "real_kv": np.asarray(scores["taylor_kv"], np.float32)}


if __name__ == "__main__":
    assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
    import jax

    assert jax.device_count() == 8, jax.devices()
    if sys.argv[2:] == ["--real"]:
        np.savez(sys.argv[1], **real_run())
    else:
        placed, spec = placed_run()
        np.savez(sys.argv[1], **taylor_run(), **placed, **sheared_run(),
                 placed_spec=np.asarray(spec))
