"""Optional projection biases (FLAP's compensation) through every door: the forward, surgery, nnxprune
checkpoints, Hugging Face export and load (`attention_bias` / `mlp_bias`, zeros where the model has
none) and transformers' own LlamaForCausalLM on the exported folder."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import graph
from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint
from nnxprune.io.hf import export_hf, load_hf_folder
from nnxprune.measure import count_params
from nnxprune.models.llama import Llama, LlamaConfig, bias_flags

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=40, head_dim=8, max_position_embeddings=64)
TOKENS = np.random.default_rng(3).integers(0, 96, (2, 12)).astype(np.int32)


def build(seed=0, tie=False) -> Llama:
    import dataclasses

    cfg = dataclasses.replace(CFG, tie_word_embeddings=tie)
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def with_biases(model, names=("self_attn.o_proj", "mlp.down_proj"), seed=1):
    """FLAP's layout by default: random biases on o_proj and down_proj of every layer."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for name in names:
            lin = layer
            for part in name.split("."):
                lin = getattr(lin, part)
            lin.set_bias(0.5 * rng.standard_normal(lin.out_features))
    return model


def logits(model):
    return np.asarray(model(jnp.asarray(TOKENS)))


def test_bias_is_added_and_counted():
    model = build()
    plain = logits(model)
    n = count_params(model)
    lin = model.layers[0].mlp.down_proj
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, lin.in_features)), jnp.float32)
    before = np.asarray(lin(x))
    with_biases(model)
    np.testing.assert_allclose(np.asarray(lin(x)), before + np.asarray(lin.bias[...]), rtol=1e-6)
    assert count_params(model) == n + 3 * 2 * CFG.hidden_size
    assert not np.allclose(logits(model), plain)
    assert bias_flags(model) == (True, True)
    with pytest.raises(ValueError, match="bias shape"):
        lin.set_bias(np.zeros(3))


def test_surgery_slices_biases_and_soft_equals_hard():
    model = with_biases(build(), names=("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                        "mlp.down_proj"))
    soft, hard = nnx.clone(model), nnx.clone(model)
    edits = [("kv", 1, [1]), ("mlp", 0, range(0, 40, 3)), ("embed", None, range(0, 32, 2))]
    for kind, layer, keep in edits:
        graph.mask_group(soft, graph.find_group(soft, kind, layer), keep)
        graph.take(hard, graph.find_group(hard, kind, layer), keep)
    np.testing.assert_allclose(logits(soft), logits(hard), rtol=1e-5, atol=1e-5)
    assert hard.layers[1].self_attn.q_proj.bias.shape == (16,)  # one KV group of 2 heads x 8
    assert hard.layers[0].mlp.up_proj.bias.shape == (14,)
    assert hard.layers[2].mlp.down_proj.bias.shape == (16,)  # hidden channels follow
    np.testing.assert_array_equal(np.asarray(hard.layers[2].mlp.down_proj.bias[...]),
                                  np.asarray(model.layers[2].mlp.down_proj.bias[...])[::2])
    graph.fold_masks(soft)
    np.testing.assert_allclose(logits(soft), logits(hard), rtol=1e-5, atol=1e-5)
    assert soft.config == hard.config


def test_soft_layer_removal_silences_its_biases():
    model = with_biases(build())
    soft, hard = nnx.clone(model), nnx.clone(model)
    graph.mask_group(soft, graph.find_group(soft, "layer", 1), [])
    graph.drop_layers(hard, [1])
    np.testing.assert_allclose(logits(soft), logits(hard), rtol=1e-6, atol=1e-6)
    assert len(hard.layers) == 2 and count_params(hard) < count_params(model)


def test_checkpoint_keeps_biases(tmp_path):
    model = with_biases(build())
    graph.take(model, graph.find_group(model, "mlp", 1), range(30))  # heterogeneous shapes
    path = save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((path / "nnxprune.json").read_text())
    assert sorted(meta["biased"]) == [f"layers.{i}.{n}" for i in range(3)
                                      for n in ("mlp.down_proj", "self_attn.o_proj")]
    back = load_checkpoint(path)
    np.testing.assert_array_equal(logits(back), logits(model))
    assert count_params(back) == count_params(model)
    for a, b in zip(model.layers, back.layers):
        np.testing.assert_array_equal(np.asarray(a.mlp.down_proj.bias[...]),
                                      np.asarray(b.mlp.down_proj.bias[...]))
        assert b.self_attn.q_proj.bias is None


def test_checkpoint_without_biases_is_unchanged(tmp_path):
    path = save_checkpoint(build(), tmp_path / "ckpt")
    assert "biased" not in json.loads((path / "nnxprune.json").read_text())
    assert all(lin.bias is None for _, lin in nnx.iter_modules(load_checkpoint(path))
               if hasattr(lin, "bias"))


@pytest.mark.parametrize("names, flags", [
    (("self_attn.o_proj", "mlp.down_proj"), (True, True)),
    (("mlp.down_proj",), (False, True)),
    ((), (False, False)),
])
def test_hf_export_writes_hf_bias_layout_and_loads_back(tmp_path, names, flags):
    model = with_biases(build(), names=names)
    folder = export_hf(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert (config["attention_bias"], config["mlp_bias"]) == flags
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    biases = sorted(k for k in tensors if k.endswith(".bias"))
    per_layer = (4 if flags[0] else 0) + (3 if flags[1] else 0)
    assert len(biases) == 3 * per_layer
    if flags[0]:  # HF's attention_bias covers q, k, v, o: the ones FLAP adds none to are zero
        assert not tensors["model.layers.0.self_attn.q_proj.bias"].any()
        np.testing.assert_array_equal(tensors["model.layers.0.self_attn.o_proj.bias"],
                                      np.asarray(model.layers[0].self_attn.o_proj.bias[...]))
    back = load_hf_folder(folder)
    np.testing.assert_array_equal(logits(back), logits(model))
    assert bias_flags(back) == flags


def test_hf_config_says_biases_the_file_lacks(tmp_path):
    from nnxprune.errors import UserError

    folder = export_hf(build(), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(UserError, match="missing 9 tensors"):
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "mlp_bias": "yes"}))
    with pytest.raises(UserError, match="mlp_bias must be true or false"):
        load_hf_folder(folder)


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_logits_equal_ours_with_biases(tmp_path, tie):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from nnxprune.io.hf import load_in_transformers

    model = with_biases(build(tie=tie))
    folder = export_hf(model, tmp_path / "hf")
    theirs_model = load_in_transformers(folder)
    assert theirs_model.model.layers[0].self_attn.o_proj.bias is not None
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor(TOKENS.astype(np.int64))).logits.numpy()
    ours = logits(model)
    assert np.abs(ours).max() > 1.0  # logits O(1-10): a real comparison
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    bare = nnx.clone(model)
    for layer in bare.layers:
        layer.self_attn.o_proj.bias = layer.mlp.down_proj.bias = None
    assert np.abs(logits(bare) - theirs).max() > 1e-2  # the biases are what makes them agree


def test_lora_keeps_biases_and_merges_them():
    from nnxprune.recovery.config import LoRAConfig
    from nnxprune.recovery.lora import add_lora, lora_modules, merge_lora

    model = with_biases(build())
    before = logits(model)
    add_lora(model, LoRAConfig(rank=2))
    assert lora_modules(model)
    for _, node in lora_modules(model):  # a trained adapter: the bias must still be added
        node.lora_b.set_value(0.1 * np.ones(node.lora_b.shape, np.float32))
    trained = logits(model)
    assert not np.allclose(trained, before)
    assert all(layer.mlp.down_proj.bias is not None for layer in model.layers)
    merge_lora(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(logits(model), trained, rtol=1e-4, atol=1e-4)
    bare = nnx.clone(model)
    for layer in bare.layers:
        layer.self_attn.o_proj.bias = layer.mlp.down_proj.bias = None
    assert np.abs(logits(bare) - trained).max() > 1e-2
