"""Gradient-based pruning on a sharded model: LLM-Pruner's Taylor pass and Sheared LLaMA's mask
training on 8 simulated CPU devices (a subprocess; `gradients_sharded_run.py`), the model spread
over them by the recovery mesh rules, give the 1-device gradients, Taylor scores, kept groups and
folded model."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gradients_sharded_run as runs  # noqa: E402

# Tolerances, from what the 8-device run measured against 1 device (float32 on both; the sharded
# run only groups its sums differently: per-device partial sums, then all-reduces): gradients and
# scores differ by at most 1e-6 of their largest entry (measured 8e-7), so an absolute 1e-5 of
# that largest entry is the test's margin. Sheared training moves each weight by Adam steps of
# lr 1e-3, where a gradient entry near zero turns its last-bit differences into update
# differences: measured 6e-6 on the output head after 3 steps; 5e-5 allowed. Losses: measured 2e-7
# relative; 1e-5 allowed.
GRAD_REL, WEIGHTS_ATOL, LOSS_RTOL = 1e-5, 5e-5, 1e-5


def _close(got, want, scale=None, **kw):
    want = np.asarray(want)
    atol = GRAD_REL * float(np.abs(want).max()) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, **kw)


def _eight_devices(tmp_path, meanwhile, *args) -> tuple[dict, dict]:
    """`gradients_sharded_run.py OUT *args` on 8 simulated devices in a subprocess (bounded),
    while `meanwhile()` runs here on 1 device; both results."""
    out = tmp_path / "eight.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "gradients_sharded_run.py"), str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        one = meanwhile()
        _, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return dict(np.load(out)), one


def test_taylor_pass_and_sheared_masks_on_eight_devices_equal_one_device(tmp_path):
    eight, one = _eight_devices(tmp_path, lambda: {**runs.taylor_run(), **runs.sheared_run()})

    # the pass ran spread over the devices: a model placed on (2, 2, 2) keeps sharded gradients
    assert str(eight["placed_spec"]) == "P('fsdp', 'tensor')"
    for key in [k for k in eight if k.startswith("placed/")]:
        _close(eight[key], one["grad/" + key[len("placed/"):]], err_msg=key)
    # gradients (first order, mean per-row squares) and every Taylor variant's scores
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=LOSS_RTOL)
    grads = [k for k in one if k.startswith(("grad/", "score/"))]
    assert len(grads) == 3 * 7 * 2 + 8  # 3 layers x 7 kernels x (g, g^2), 4 variants x (mlp, kv)
    for key in grads:
        _close(eight[key], one[key], err_msg=key)
    # the groups llm_pruner keeps (Taylor-mix ranked): the very same weights, sliced the same way
    pruned = [k for k in one if k.startswith("llm_pruner/")]
    assert one["llm_pruner/layers.1.mlp.up_proj.kernel"].shape == (32, 20)
    for key in pruned:
        np.testing.assert_array_equal(eight[key], one[key], err_msg=key)

    # Sheared LLaMA: the 8-device run spread the model (fsdp 4 x tensor 2), same losses, same
    # expected sizes, the same structures kept by the fold (shapes) with the same trained values
    assert list(eight["sheared_mesh"]) == [1, 4, 2] and list(one["sheared_mesh"]) == [1, 1, 1]
    np.testing.assert_allclose(eight["sheared_loss"], one["sheared_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(eight["sheared_expected_params"], one["sheared_expected_params"],
                               rtol=LOSS_RTOL)
    folded = [k for k in one if k.startswith("sheared/")]
    assert one["sheared/layers.0.mlp.up_proj.kernel"].shape == (24, 24)  # hidden 24, MLP 24
    assert one["sheared/layers.0.self_attn.q_proj.kernel"].shape == (24, 16)  # 2 heads of 8
    for key in folded:
        assert eight[key].shape == one[key].shape, key
        _close(eight[key], one[key], scale=WEIGHTS_ATOL, err_msg=key)


def _same_kept(got: np.ndarray, want: np.ndarray, keep: int, tol: float) -> None:
    """The `keep` highest of each row are the same channels, but for channels whose score is
    within `tol` of the row's cut (a tie at float32 precision may fall either way)."""
    for g, w in zip(got, want):
        a, b = set(np.argsort(-g, kind="stable")[:keep]), set(np.argsort(-w, kind="stable")[:keep])
        cut = np.sort(w)[::-1][keep - 1:keep + 1].mean()
        assert all(abs(w[i] - cut) <= tol for i in a ^ b), sorted(a ^ b)


@pytest.mark.real
def test_smollm2_taylor_scores_and_kept_groups_on_eight_devices_equal_one_device(tmp_path):
    """SmolLM2-135M's gradient pass spread over 8 devices: the same Taylor score for every MLP
    neuron and KV group of its 30 layers, and the same groups kept at LLM-Pruner's 34% (1013 of
    1536 neurons, 2 of 3 KV groups per layer, `recipes/llm-pruner-*.toml`)."""
    eight, one = _eight_devices(tmp_path, runs.real_run, "--real")
    assert one["real_mlp"].shape == (30, 1536) and one["real_kv"].shape == (30, 3)
    np.testing.assert_allclose(eight["real_loss"], one["real_loss"], rtol=LOSS_RTOL)
    for key, keep in (("real_mlp", 1013), ("real_kv", 2)):
        _close(eight[key], one[key], err_msg=key)
        _same_kept(eight[key], one[key], keep, GRAD_REL * float(np.abs(one[key]).max()))
