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


def tiny_cli_folder(root, *, num_layers: int):
    """A tiny HF folder `root/tiny` with a trained byte-level BPE tokenizer (the command reads it)
    and a local calibration text `root/calib.txt`; `root` is returned."""
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nnxprune.io.hf import export_hf
    from nnxprune.models.llama import Llama, LlamaConfig

    text = ("The tower is 324 metres tall, about the same height as an 81-storey building. "
            "It was the tallest man-made structure in the world for 41 years. ") * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = LlamaConfig.uniform(vocab_size=320, hidden_size=32, num_layers=num_layers, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, head_dim=8,
                              max_position_embeddings=64, eos_token_id=0)
    export_hf(randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1), root / "tiny",
              tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"))
    (root / "calib.txt").write_text("\n\n".join([text] * 4))
    return root
