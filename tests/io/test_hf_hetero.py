"""Hugging Face folders for heterogeneous models: the `nnxprune_llama` variant (see nnxprune.io.hf).

Round trips must be exact, config.json must say every layer's sizes, plain transformers must
refuse the folder loudly (never load it with re-initialised tensors), and uniform models must keep
exporting plain `LlamaForCausalLM` folders.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.hf import export_hf, load_hf_folder, to_hf_tensors
from nnxprune.io.hf_config import config_from_hf, config_to_hf
from nnxprune.models.llama import LayerShape, Llama, Llama3RopeScaling, LlamaConfig


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16, max_position_embeddings=128)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


def shape(heads: int, kv: int, mlp: int) -> LayerShape:
    return LayerShape(num_heads=heads, num_kv_heads=kv, intermediate_size=mlp)


# Pruned-looking layers: 6 and 9 query heads (GQA groups of 2 and 3), MLP widths that differ.
HETERO_LAYERS = (shape(4, 2, 128), shape(6, 3, 80), shape(9, 3, 128), shape(2, 1, 48))


def hetero(layers=HETERO_LAYERS, **kwargs) -> LlamaConfig:
    return dataclasses.replace(tiny(**kwargs), layers=tuple(layers))


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def logits(model) -> np.ndarray:
    return np.asarray(model(TOKENS))


def params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_identical(loaded: Llama, model: Llama):
    """Same config, bit-identical parameters, identical logits."""
    assert loaded.config == model.config
    want, got = params(model), params(loaded)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(logits(loaded), logits(model))


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def write_config(folder, hf: dict):
    (folder / "config.json").write_text(json.dumps(hf))


@pytest.fixture
def exported(tmp_path):
    model = build(hetero())
    return model, export_hf(model, tmp_path / "hf")


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    hetero(),
    hetero(tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2, 3)),
    hetero(rope_theta=500000.0, eos_token_id=7,
           rope_scaling=Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
    hetero(layers=(shape(4, 2, 128), shape(4, 2, 96))),  # MLP widths differ only
    hetero(layers=(shape(4, 2, 128), shape(4, 1, 128))),  # KV heads differ only
], ids=["untied", "tied", "llama3", "mlp-only", "kv-only"])
def test_round_trip_is_exact(tmp_path, cfg):
    model = build(cfg)
    assert not cfg.is_uniform
    out = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_hf_folder(out)
    assert loaded.config == cfg
    assert_identical(loaded, model)
    assert [layer.shape for layer in loaded.layers] == list(cfg.layers)


def test_config_json_carries_per_layer_sizes(exported):
    model, folder = exported
    hf = read_config(folder)
    assert hf["model_type"] == "nnxprune_llama"
    assert hf["architectures"] == ["NnxpruneLlamaForCausalLM"]
    assert hf["num_hidden_layers"] == 4
    assert hf["nnxprune_layers"] == [
        {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
        {"num_heads": 6, "num_kv_heads": 3, "intermediate_size": 80},
        {"num_heads": 9, "num_kv_heads": 3, "intermediate_size": 128},
        {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 48},
    ]
    # The usual fields stay a readable Llama config, with the per-layer ones at their maxima ...
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]) == (9, 3, 128)
    assert (hf["hidden_size"], hf["head_dim"], hf["vocab_size"]) == (64, 16, 256)
    assert hf["hidden_act"] == "silu" and hf["tie_word_embeddings"] is False
    # ... and transformers' own per-layer overrides name the layers that differ from them.
    assert hf["per_layer_config"] == {
        "0": {"num_attention_heads": 4, "num_key_value_heads": 2},
        "1": {"num_attention_heads": 6, "intermediate_size": 80},
        "3": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48},
    }


def test_tensors_keep_hf_names_and_per_layer_shapes(exported):
    import safetensors.numpy

    model, folder = exported
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert tensors.keys() == to_hf_tensors(model).keys()
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (6 * 16, 64)
    assert tensors["model.layers.2.self_attn.q_proj.weight"].shape == (9 * 16, 64)
    assert tensors["model.layers.3.self_attn.k_proj.weight"].shape == (16, 64)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 80)


def test_deleted_layer_and_shrunk_widths(tmp_path):
    """What structured pruning leaves: 3 layers -> 2, one with fewer heads, both with narrower MLPs."""
    base = build(tiny(num_layers=3))
    small = hetero(layers=(shape(4, 2, 96), shape(2, 1, 64)))
    model = build(small, seed=3)
    out = export_hf(model, tmp_path / "hf")
    hf = read_config(out)
    assert hf["num_hidden_layers"] == 2 and len(hf["nnxprune_layers"]) == 2
    assert_identical(load_hf_folder(out), model)

    # The same through surgery on a live model: delete a layer, then slice one MLP narrower.
    del base.layers[1]
    mlp = base.layers[1].mlp
    mlp.gate_proj.kernel = nnx.Param(mlp.gate_proj.kernel[:, :72])
    mlp.up_proj.kernel = nnx.Param(mlp.up_proj.kernel[:, :72])
    mlp.down_proj.kernel = nnx.Param(mlp.down_proj.kernel[:72])
    assert base.config.layers == (shape(4, 2, 128), shape(4, 2, 72))
    out = export_hf(base, tmp_path / "surgery")
    assert read_config(out)["nnxprune_layers"][1]["intermediate_size"] == 72
    assert_identical(load_hf_folder(out), base)


def test_masks_are_folded_in_heterogeneous_export(tmp_path):
    model = build(hetero())
    q = model.layers[2].self_attn.q_proj
    mask = np.random.default_rng(1).random(q.kernel.shape) > 0.5
    q.set_mask(mask)
    expected = logits(model)
    loaded = load_hf_folder(export_hf(model, tmp_path / "hf"))
    assert loaded.layers[2].self_attn.q_proj.mask is None
    np.testing.assert_array_equal(np.asarray(loaded.layers[2].self_attn.q_proj.kernel[...])[~mask], 0.0)
    np.testing.assert_allclose(logits(loaded), expected, atol=1e-5, rtol=0)


def test_model_with_no_layers_round_trips(tmp_path):
    model = build(dataclasses.replace(tiny(), layers=()))
    out = export_hf(model, tmp_path / "hf")
    hf = read_config(out)
    assert hf["model_type"] == "nnxprune_llama"
    assert hf["num_hidden_layers"] == 0 and hf["nnxprune_layers"] == []
    assert "per_layer_config" not in hf
    loaded = load_hf_folder(out)
    assert loaded.config.num_layers == 0
    assert_identical(loaded, model)


def test_export_replaces_previous_uniform_folder(tmp_path):
    export_hf(build(tiny()), tmp_path / "hf")
    model = build(hetero(), seed=2)
    export_hf(model, tmp_path / "hf")
    assert read_config(tmp_path / "hf")["model_type"] == "nnxprune_llama"
    assert_identical(load_hf_folder(tmp_path / "hf"), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]



def test_folder_with_tokenizer_loads_through_load_model(tmp_path):
    """The CLI path: `load_model` recognises the folder, and its tokenizer still loads."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nnxprune.io.load import load_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the cat sat on the mat"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    model = build(hetero())
    loaded = load_model(export_hf(model, tmp_path / "hf", tokenizer=tokenizer))
    assert loaded.kind == "hf"
    assert_identical(loaded.model, model)
    assert loaded.tokenizer("the cat").input_ids == tokenizer("the cat").input_ids

# -- uniform models are unchanged ------------------------------------------------------------------
def test_uniform_export_is_plain_llama(tmp_path):
    model = build(tiny(num_layers=3))
    del model.layers[0]  # fewer layers, same shapes: still a plain Llama
    hf = read_config(export_hf(model, tmp_path / "hf"))
    assert hf["model_type"] == "llama"
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert "nnxprune_layers" not in hf and "per_layer_config" not in hf
    assert hf == config_to_hf(model.config)
    assert_identical(load_hf_folder(tmp_path / "hf"), model)


def test_uniform_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = build(tiny())
    export_hf(model, tmp_path / "hf")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(ref_model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ref = ref_model.eval()(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(logits(model), ref, atol=1e-4, rtol=0)


def test_uniformly_pruned_model_loads_in_transformers(tmp_path):
    """Surgery that keeps every layer alike (a layer dropped, every MLP shrunk, one query head per
    KV group removed, every hidden channel count cut) plus 50% unstructured masks exports a plain
    `LlamaForCausalLM` folder whose logits equal ours."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nnxprune.transforms import (Context, DropLayers, Magnitude, Pipeline, RemoveQueryHeads,
                                     ShrinkHidden, ShrinkMLP)

    model = build(tiny(num_layers=3, num_heads=6, num_kv_heads=2))
    Pipeline(steps=(DropLayers(layers=(1,)), ShrinkMLP(fraction=0.25),
                    RemoveQueryHeads(per_kv_group=1), ShrinkHidden(count=8),
                    Magnitude(sparsity=0.5)))(model, Context(progress=False))
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size) == (2, 56)
    assert {(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in cfg.layers} == {(4, 2, 96)}
    ours = logits(model)
    export_hf(model, tmp_path / "hf")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(ref_model).__name__ == "LlamaForCausalLM"
    down = ref_model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert abs((down == 0).mean() - 0.5) < 0.01  # the masks went out baked into the weights
    with torch.no_grad():
        ref = ref_model.eval()(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# -- plain transformers refuses heterogeneous folders ----------------------------------------------
UNRECOGNIZED = r"model type `nnxprune_llama` but Transformers does not recognize this architecture"
LOAD_KWARGS = [{}, {"ignore_mismatched_sizes": True}]


@pytest.mark.parametrize("kwargs", LOAD_KWARGS, ids=["plain", "ignore-mismatched"])
def test_transformers_auto_classes_refuse(exported, kwargs):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, folder = exported
    with pytest.raises(ValueError, match=UNRECOGNIZED):
        transformers.AutoConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=UNRECOGNIZED):
        transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("layers", [HETERO_LAYERS, (shape(4, 2, 128), shape(4, 2, 96))],
                         ids=["heads-and-mlp", "mlp-only"])
@pytest.mark.parametrize("kwargs", LOAD_KWARGS, ids=["plain", "ignore-mismatched"])
def test_forcing_llama_class_refuses(tmp_path, layers, kwargs):
    """`LlamaForCausalLM.from_pretrained(..., ignore_mismatched_sizes=True)` would re-initialise the
    smaller layers at random; transformers' `per_layer_config` makes it refuse instead."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    heterogeneity = pytest.importorskip("transformers.integrations.heterogeneity")
    from transformers import LlamaForCausalLM

    folder = export_hf(build(hetero(layers=layers)), tmp_path / "hf")
    with pytest.raises(heterogeneity.AmbiguousGlobalPerLayerAttributeError, match="per-layer attribute"):
        LlamaForCausalLM.from_pretrained(folder, **kwargs)


def test_forcing_llama_class_on_empty_model_is_still_correct(tmp_path):
    """With no layers nothing is ambiguous: a forced load gives the right logits, not garbage."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    model = build(dataclasses.replace(tiny(), layers=()))
    folder = export_hf(model, tmp_path / "hf")
    ref_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits(model), ref, atol=1e-4, rtol=0)


# -- malformed per-layer lists ---------------------------------------------------------------------
GOOD = {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


@pytest.mark.parametrize("layers,message", [
    (None, "needs 'nnxprune_layers'"),
    ("4,2,128", "needs 'nnxprune_layers'"),
    ([GOOD] * 3, "has 3 entries but num_hidden_layers is 4"),
    ([GOOD] * 5, "has 5 entries but num_hidden_layers is 4"),
    ([GOOD] * 3 + [[4, 2, 128]], r"nnxprune_layers\[3\] must be an object"),
    ([GOOD] * 3 + [{"num_heads": 4, "num_kv_heads": 2}], r"nnxprune_layers\[3\] must be an object"),
    ([GOOD] * 3 + [{**GOOD, "head_dim": 16}], r"nnxprune_layers\[3\] must be an object"),
    ([GOOD] * 3 + [{**GOOD, "num_heads": 0}], r"nnxprune_layers\[3\]\.num_heads must be a positive"),
    ([GOOD] * 3 + [{**GOOD, "num_kv_heads": -2}], r"\.num_kv_heads must be a positive"),
    ([GOOD] * 3 + [{**GOOD, "intermediate_size": 12.5}], r"\.intermediate_size must be a positive"),
    ([GOOD] * 3 + [{**GOOD, "intermediate_size": "128"}], r"\.intermediate_size must be a positive"),
    ([GOOD] * 3 + [{**GOOD, "num_kv_heads": True}], r"\.num_kv_heads must be a positive"),
    ([GOOD] * 3 + [{**GOOD, "num_heads": 6, "num_kv_heads": 4}], r"num_heads \(6\) is not a multiple"),
], ids=["missing", "not-a-list", "too-short", "too-long", "entry-not-object", "missing-key",
        "unknown-key", "zero", "negative", "float", "string", "bool", "uneven-gqa"])
def test_bad_layer_list_is_user_error(exported, layers, message):
    _, folder = exported
    hf = read_config(folder)
    if layers is None:
        del hf["nnxprune_layers"]
    else:
        hf["nnxprune_layers"] = layers
    write_config(folder, hf)
    with pytest.raises(UserError, match=message):
        load_hf_folder(folder)


def test_layer_list_that_disagrees_with_tensors_is_user_error(exported):
    _, folder = exported
    hf = read_config(folder)
    hf["nnxprune_layers"][1]["intermediate_size"] = 96
    write_config(folder, hf)
    with pytest.raises(UserError, match="shape"):
        load_hf_folder(folder)


def test_layer_list_in_plain_llama_config_is_user_error(exported):
    _, folder = exported
    write_config(folder, {**read_config(folder), "model_type": "llama"})
    with pytest.raises(UserError, match="only read with model_type 'nnxprune_llama'"):
        load_hf_folder(folder)


def test_per_layer_config_in_plain_llama_config_is_user_error(exported):
    _, folder = exported
    hf = read_config(folder)
    del hf["nnxprune_layers"]
    write_config(folder, {**hf, "model_type": "llama"})
    with pytest.raises(UserError, match="per_layer_config"):
        load_hf_folder(folder)


def test_to_hf_still_refuses_heterogeneous_by_default():
    with pytest.raises(ValueError):
        config_to_hf(hetero())
    assert config_from_hf(config_to_hf(hetero(), allow_heterogeneous=True)) == hetero()
    assert config_to_hf(tiny(), allow_heterogeneous=True) == config_to_hf(tiny())
