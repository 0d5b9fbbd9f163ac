"""A Sheared LLaMA step's own `mesh` (`mesh = { ... }` in its [[prune]] table, parsed and checked as
`[recovery.mesh]` by `recovery.mesh_config`): refused before any work when an axis name is unknown,
a size is bad or the sizes do not fit the devices or the micro-batch; and on 8 forced CPU devices
(this file run as a script in a subprocess: the XLA flag must come before jax starts) the given
mesh is the one the mask training runs on, and it learns the same masks as the automatic mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest's tiny_cli_folder

# A tiny pruning run (the model of conftest.tiny_cli_folder: hidden 32, 4 heads, 2 KV heads, MLP
# 64, 2 layers) toward 1 layer, 2 heads, MLP 32, hidden 24: a micro-batch of 4 sequences.
STEP = {"kind": "sheared", "layers": 1, "heads": 2, "intermediate": 32, "hidden": 24, "steps": 3,
        "batch_size": 4, "seqlen": 16, "lr": 1e-3, "target_warmup": 0.5}
GIVEN = {"data": 2, "fsdp": 2, "tensor": 2}  # the automatic mesh of 8 devices: fsdp 4 x tensor 2
# Tolerances of tests/calibration/test_gradients_sharded.py (8 devices against 1, the same float32
# program with its sums grouped differently): 1e-5 relative on losses and expected sizes, 5e-5
# absolute on the trained weights after 3 Adam steps of lr 1e-3.
LOSS_RTOL, WEIGHTS_ATOL = 1e-5, 5e-5


def _step(**extra):
    from nnxprune.transforms import from_dict

    return from_dict({**STEP, **extra}, "prune[0]")


def test_unknown_axes_and_bad_sizes_are_refused_when_the_recipe_is_read():
    from nnxprune.errors import UserError
    from nnxprune.recipes import parse_recipe

    for mesh, message in (({"fsdb": 2}, "unknown mesh axis 'fsdb'; did you mean 'fsdp'"),
                          ({"tensor": 0}, "sheared mesh.tensor must be a positive integer or -1"),
                          ({"data": -1, "fsdp": -1}, "at most one axis can be -1"),
                          ("fsdp", "sheared mesh must be a table")):
        with pytest.raises(UserError, match=message):
            parse_recipe({"prune": [{**STEP, "mesh": mesh}]})
    # the axes left out at [recovery.mesh]'s defaults
    assert _step(mesh={"fsdp": 2}).mesh == {"data": -1, "fsdp": 2, "tensor": 1}
    assert _step().mesh is None and _step().mesh_sizes() is None  # automatic


def test_a_mesh_that_does_not_fit_the_devices_fails_the_check_before_any_work():
    """On this 1-device process: a mesh of 2 is refused by the recipe check (before loading)."""
    from nnxprune.errors import UserError
    from nnxprune.models.llama import LlamaConfig
    from nnxprune.recipes import parse_recipe
    from nnxprune.recovery import mesh_config

    config = LlamaConfig.uniform(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, intermediate_size=64, head_dim=8,
                                 max_position_embeddings=64)
    recipe = parse_recipe({"prune": [{**STEP, "mesh": {"fsdp": 2, "data": 1}}]})
    with pytest.raises(UserError, match=r"sheared mesh \(data=1, fsdp=2, tensor=1\) needs 2 "
                                        r"devices but 1 are available"):
        recipe.check(config)
    recipe = parse_recipe({"prune": [{**STEP, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}]})
    assert recipe.check(config).hidden_size == 24
    # on 8 devices: fsdp 8 does not split a micro-batch of 4; tensor -1 fills the rest
    sizes = mesh_config.from_table({"fsdp": 8}, "sheared mesh")
    with pytest.raises(UserError, match="micro-batch of 4 sequences is not divisible by the 8"):
        mesh_config.resolve_for_batch(sizes, 4, "sheared mesh", device_count=8)
    sizes = mesh_config.from_table({"data": 1, "fsdp": 2, "tensor": -1}, "sheared mesh")
    assert mesh_config.resolve_for_batch(sizes, 4, "sheared mesh", device_count=8) == {
        "data": 1, "fsdp": 2, "tensor": 4}


def _prune(folder: Path, mesh) -> tuple[dict, dict[str, np.ndarray]]:
    """The step (with `mesh`, or automatic) checked and run on the tiny folder's model as a
    recipe runs it; its report record and the folded model's arrays."""
    import jax
    from flax import nnx

    from nnxprune.io.load import load_model
    from nnxprune.transforms import Context

    loaded = load_model(folder / "tiny")
    step = _step(dataset=str(folder / "calib.txt"), **({"mesh": mesh} if mesh else {}))
    step.check(loaded.model.config)
    ctx = Context(tokenizer=loaded.tokenizer, progress=False)
    step(loaded.model, ctx)
    arrays = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(loaded.model))}
    return ctx.report["transforms"][-1], arrays


def test_a_given_mesh_is_used_and_learns_the_masks_of_the_automatic_one(tmp_path):
    from conftest import tiny_cli_folder

    tiny_cli_folder(tmp_path, num_layers=2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    given, auto = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("given", "auto"))
    assert given["mesh"] == GIVEN and auto["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    np.testing.assert_allclose(given["ce_per_step"], auto["ce_per_step"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(given["expected_params_per_step"], auto["expected_params_per_step"],
                               rtol=LOSS_RTOL)
    # the same structures kept (the fold leaves the target shapes, the same rows and columns of
    # the trained weights) and the same trained values
    a, b = np.load(tmp_path / "given.npz"), np.load(tmp_path / "auto.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    assert b["['layers'][0]['mlp']['up_proj']['kernel'].value"].shape == (24, 32)
    for key in b.files:
        assert a[key].shape == b[key].shape, key
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=WEIGHTS_ATOL, err_msg=key)


if __name__ == "__main__":  # the 8-device child: both runs, their records and folded arrays
    import jax

    assert jax.device_count() == 8, jax.devices()
    out = Path(sys.argv[1])
    for name, mesh in (("given", GIVEN), ("auto", None)):
        record, arrays = _prune(out, mesh)
        (out / f"{name}.json").write_text(json.dumps(record))
        np.savez(out / f"{name}.npz", **arrays)
