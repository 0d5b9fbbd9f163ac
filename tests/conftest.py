"""Shared test helpers: a tiny Llama config and a parameter re-randomizer.

The default init (normal, std 0.02) gives near-zero logits, so parity checks against it are
weak; `randomize` redraws every parameter at a larger scale so logits are O(1-10).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def pytest_configure(config):
    # A relative data directory (CI passes ../shared/data) is relative to where pytest started;
    # tests that change directory must still find it.
    if os.environ.get("NNXPRUNE_DATA_DIR"):
        os.environ["NNXPRUNE_DATA_DIR"] = os.path.abspath(os.environ["NNXPRUNE_DATA_DIR"])
    config.addinivalue_line(
        "markers", "real: uses the real SmolLM2-135M model (slower; skipped when it is not installed)")


def randomize_params(model, seed: int = 0, scale: float = 0.2):
    """Redraws all `nnx.Param`s in place: kernels/embeddings ~ N(0, scale), norms ~ 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def draw(path, var):
        shape, dtype = var.shape, var.dtype
        if path[-1] == "scale":  # RMSNorm weights
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape)
        return var.replace(jnp.asarray(value, dtype=jnp.float32).astype(dtype))  # jax, not numpy: immutable

    state = nnx.state(model, nnx.Param)
    nnx.update(model, nnx.map_state(draw, state))
    return model


@pytest.fixture
def randomize():
    return randomize_params


@pytest.fixture
def tiny_config():
    from nnxprune.models.llama import LlamaConfig

    return LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, intermediate_size=128, head_dim=16)


@pytest.fixture
def private_registry(tmp_path, monkeypatch):
    """A registry of written outputs of the test's own (`nnxprune.io.ownership`), beside its
    tmp_path (so that a test listing tmp_path does not see it)."""
    monkeypatch.setenv("NNXPRUNE_STATE_DIR", str(tmp_path.parent / f"{tmp_path.name}-registry"))


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any model weights are loaded (a check must come before)."""
    from nnxprune import runner
    from nnxprune.recovery import run as recovery_run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    for module in (runner, recovery_run):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr("nnxprune.io.load.load_model", refuse)
