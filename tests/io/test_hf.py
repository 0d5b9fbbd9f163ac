"""Hugging Face folders: export/load round trips, sharding, malformed checkpoints, atomic export."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import randomize_params
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.hf import export_hf, hf_key_to_path, load_hf_folder, to_hf_tensors
from nnxprune.models.llama import Llama, Llama3RopeScaling, LlamaConfig


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16, max_position_embeddings=128)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


def build(cfg: LlamaConfig | None = None, seed: int = 0) -> Llama:
    return randomize_params(Llama(cfg or tiny(), rngs=nnx.Rngs(seed)), seed=seed)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def logits(model) -> np.ndarray:
    return np.asarray(model(TOKENS))


def rewrite_tensors(folder, edit):
    """Replaces `model.safetensors` in `folder` with `edit(tensors)`."""
    file = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(file))
    file.unlink()
    safetensors.numpy.save_file(edit(dict(tensors)), str(file), metadata={"format": "pt"})


@pytest.fixture
def exported(tmp_path):
    model = build()
    return model, export_hf(model, tmp_path / "hf")


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2, 3)),
    tiny(rope_theta=500000.0, eos_token_id=7,
         rope_scaling=Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32)),
], ids=["untied", "tied", "llama3"])
def test_round_trip(tmp_path, cfg):
    model = build(cfg)
    out = export_hf(model, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_hf_folder(out)
    assert loaded.config == model.config == cfg
    np.testing.assert_array_equal(logits(loaded), logits(model))
    assert (loaded.lm_head is None) == cfg.tie_word_embeddings


def test_export_uses_hf_layouts(exported):
    model, folder = exported
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # [out, in]
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"],
                                  np.asarray(model.layers[1].mlp.down_proj.kernel[...]).T)
    assert all(hf_key_to_path(k) is not None for k in tensors)
    assert len(tensors) == 2 * 9 + 3


def test_export_folds_masks_into_kernels(tmp_path):
    model = build()
    up = model.layers[1].mlp.up_proj
    mask = np.random.default_rng(1).random(up.kernel.shape) > 0.5
    up.set_mask(mask)
    expected = logits(model)
    loaded = load_hf_folder(export_hf(model, tmp_path / "hf"))
    assert loaded.layers[1].mlp.up_proj.mask is None
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].mlp.up_proj.kernel[...])[~mask], 0.0)
    np.testing.assert_allclose(logits(loaded), expected, atol=1e-5, rtol=0)


def test_export_after_layer_deletion(tmp_path):
    model = build(tiny(num_layers=3))
    del model.layers[1]
    expected = logits(model)
    loaded = load_hf_folder(export_hf(model, tmp_path / "hf"))
    assert loaded.config.num_layers == 2
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
    np.testing.assert_array_equal(logits(loaded), expected)


def test_export_overwrites_existing_folder(tmp_path):
    first, second = build(seed=0), build(seed=1)
    export_hf(first, tmp_path / "hf")
    export_hf(first, tmp_path / "hf")  # its own output: replaced without asking
    (tmp_path / "hf" / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):  # changed by the user
        export_hf(second, tmp_path / "hf")
    export_hf(second, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "stale.txt").exists()
    np.testing.assert_array_equal(logits(load_hf_folder(tmp_path / "hf")), logits(second))


def test_heterogeneous_model_exports_nnxprune_variant(tmp_path):
    """Layers of different shapes export as `nnxprune_llama` (tests/io/test_hf_hetero.py has the rest)."""
    model = build()
    model.layers[1].mlp.up_proj.kernel = nnx.Param(model.layers[1].mlp.up_proj.kernel[:, :96])
    model.layers[1].mlp.gate_proj.kernel = nnx.Param(model.layers[1].mlp.gate_proj.kernel[:, :96])
    model.layers[1].mlp.down_proj.kernel = nnx.Param(model.layers[1].mlp.down_proj.kernel[:96])
    assert not model.config.is_uniform
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "nnxprune_llama"
    loaded = load_hf_folder(out)
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits(loaded), logits(model))


# -- sharded checkpoints ---------------------------------------------------------------------------
def test_sharded_checkpoint(exported):
    model, folder = exported
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in shard_keys}, str(folder / name),
                                    metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    loaded = load_hf_folder(folder)
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits(loaded), logits(model))

    # A shard named in the index but absent is a user error, not a crash.
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError):
        load_hf_folder(folder)


# -- malformed checkpoints -------------------------------------------------------------------------
def test_missing_tensor(exported):
    _, folder = exported
    rewrite_tensors(folder, lambda t: {k: v for k, v in t.items()
                                       if k != "model.layers.1.mlp.gate_proj.weight"})
    with pytest.raises(UserError, match="missing"):
        load_hf_folder(folder)


@pytest.mark.parametrize("key", [
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.2.input_layernorm.weight",  # a layer the config does not have
    "some.unknown.weight",
])
def test_extra_tensor(exported, key):
    _, folder = exported
    rewrite_tensors(folder, lambda t: {**t, key: np.ones((64,), np.float32)})
    with pytest.raises(UserError):
        load_hf_folder(folder)


def test_lm_head_in_tied_checkpoint_is_rejected(tmp_path):
    folder = export_hf(build(tiny(tie_word_embeddings=True)), tmp_path / "hf")
    rewrite_tensors(folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    with pytest.raises(UserError):
        load_hf_folder(folder)


def test_rotary_inv_freq_buffers_are_ignored(exported):
    model, folder = exported
    rewrite_tensors(folder, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq":
                                       np.ones((8,), np.float32)})
    np.testing.assert_array_equal(logits(load_hf_folder(folder)), logits(model))


@pytest.mark.parametrize("key,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (64, 64)),
    ("model.layers.1.mlp.down_proj.weight", (128, 64)),  # transposed by mistake
    ("model.norm.weight", (65,)),
    ("model.embed_tokens.weight", (255, 64)),
])
def test_wrong_shape(exported, key, shape):
    _, folder = exported
    rewrite_tensors(folder, lambda t: {**t, key: np.zeros(shape, np.float32)})
    with pytest.raises(UserError, match="shape"):
        load_hf_folder(folder)


def test_folder_without_config(exported):
    _, folder = exported
    (folder / "config.json").unlink()
    with pytest.raises(UserError):
        load_hf_folder(folder)


def test_folder_without_safetensors(exported):
    _, folder = exported
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError):
        load_hf_folder(folder)


@pytest.mark.parametrize("edit", [{"model_type": "mistral"}, {"attention_bias": True}])
def test_unsupported_config_is_user_error(exported, edit):
    _, folder = exported
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **edit}))
    with pytest.raises(UserError):
        load_hf_folder(folder)


def test_config_missing_required_key_is_user_error(exported):
    _, folder = exported
    hf = json.loads((folder / "config.json").read_text())
    del hf["vocab_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError):
        load_hf_folder(folder)


# -- atomic export ---------------------------------------------------------------------------------
def _failing_save(*args, **kwargs):
    raise OSError("disk full")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = build()
    parent = tmp_path / "out"
    parent.mkdir()
    monkeypatch.setattr(safetensors.numpy, "save_file", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, parent / "hf")
    assert not (parent / "hf").exists()
    assert list(parent.iterdir()) == []


def test_failed_export_keeps_previous_folder(tmp_path, monkeypatch):
    old = build(seed=0)
    export_hf(old, tmp_path / "hf")
    monkeypatch.setattr(safetensors.numpy, "save_file", _failing_save)
    with pytest.raises(OSError):
        export_hf(build(seed=1), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    np.testing.assert_array_equal(logits(load_hf_folder(tmp_path / "hf")), logits(old))


def test_failing_extra_file_leaves_nothing(tmp_path):
    def broken(path):
        path.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_hf(build(), tmp_path / "hf", extra_files={"notes.txt": broken})
    assert list(tmp_path.iterdir()) == []


# -- bfloat16 checkpoints --------------------------------------------------------------------------
def test_bf16_checkpoint_loads_as_float32(exported):
    model, folder = exported
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in to_hf_tensors(model).items()}
    rewrite_tensors(folder, lambda _: bf16)
    loaded = load_hf_folder(folder, param_dtype=jnp.float32)
    q = loaded.layers[0].self_attn.q_proj.kernel
    assert q.dtype == jnp.float32
    expected = bf16["model.layers.0.self_attn.q_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(q[...]), expected)
    np.testing.assert_array_equal(np.asarray(loaded.embed_tokens.embedding[...]),
                                  bf16["model.embed_tokens.weight"].astype(np.float32))
    # Rounding to bf16 really happened (so the comparison above is not vacuous) ...
    original = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    assert np.abs(original - expected).max() > 0
    # ... and every loaded tensor equals its bf16-rounded source.
    for key, array in to_hf_tensors(loaded).items():
        np.testing.assert_array_equal(array, bf16[key].astype(np.float32), err_msg=key)
    assert np.all(np.isfinite(logits(loaded)))


def test_bf16_checkpoint_loads_as_bf16(exported):
    _, folder = exported
    rewrite_tensors(folder, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    loaded = load_hf_folder(folder, param_dtype=jnp.bfloat16)
    assert loaded.norm.scale.dtype == jnp.bfloat16
    assert loaded.layers[1].mlp.up_proj.kernel.dtype == jnp.bfloat16
