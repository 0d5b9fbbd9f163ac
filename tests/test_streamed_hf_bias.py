"""HF folders with biases (`attention_bias` / `mlp_bias`, e.g. a FLAP model exported by nnxprune)
stream like any other: each lazily read layer is `load_hf_folder`'s, with every bias; streamed
evaluation equals the in-memory one bit for bit; a streamed prune of the folder writes the
in-memory prune's weights and keeps the biases."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.evaluate.perplexity import score_windows
from nnxprune.evaluate.protocol import protocol_for
from nnxprune.evaluate.streamed import evaluate_streamed_windows
from nnxprune.io.atomic import atomic_dir
from nnxprune.io.hf import export_hf, load_hf_folder, to_hf_tensors
from nnxprune.io.layers import HFLayerWriter, SafetensorsSource
from nnxprune.models.llama import Llama, LlamaConfig, bias_flags
from nnxprune.streamed import prune_streamed
from nnxprune.transforms import Context
from nnxprune.transforms.sparsegpt import SparseGPT
from nnxprune.transforms.wanda import Wanda


def _biased(names):
    cfg = LlamaConfig.uniform(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=48, head_dim=8,
                              max_position_embeddings=64)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.2)
    rng = np.random.default_rng(1)
    for layer in model.layers:  # FLAP's layout by default: o_proj and down_proj
        for part, name in names:
            lin = getattr(getattr(layer, part), name)
            lin.set_bias(0.3 * rng.standard_normal(lin.out_features))
    return model


LAYOUTS = {"o+down": (("self_attn", "o_proj"), ("mlp", "down_proj")),
           "down": (("mlp", "down_proj"),)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed-hf-bias")
    for kind, names in LAYOUTS.items():
        export_hf(_biased(names), root / kind)
    return root


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128, size=(8, 24))


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_each_layer_is_the_loaded_folders_with_its_biases(kind, folders):
    source = SafetensorsSource(folders / kind)
    model = load_hf_folder(folders / kind)
    assert source.biases == bias_flags(model) == ((True, True) if kind == "o+down" else (False, True))
    for i in range(model.config.num_layers):
        ours = nnx.to_flat_state(nnx.state(source.layer(i)))
        theirs = nnx.to_flat_state(nnx.state(model.layers[i]))
        assert [p for p, _ in ours] == [p for p, _ in theirs]
        assert any("bias" in str(p) for p, _ in ours)
        for (path, a), (_, b) in zip(ours, theirs):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    layer = source.layer(0, jnp.bfloat16)
    assert layer.mlp.down_proj.bias[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_streamed_eval_equals_in_memory(kind, folders):
    windows = np.random.default_rng(2).integers(0, 128, size=(5, 24))
    protocol = protocol_for("wikitext2", seqlen=24, batch_size=2)
    ref = score_windows(load_hf_folder(folders / kind), windows, protocol, progress=False)
    ours = evaluate_streamed_windows(SafetensorsSource(folders / kind), windows, protocol,
                                     progress=False)
    assert ours.nll == ref.nll and ours.windows == 5


@pytest.mark.parametrize("step", [Wanda(sparsity=0.5, batch_size=4),
                                  SparseGPT(pattern="2:4", blocksize=16, batch_size=4)],
                         ids=["wanda-50", "sparsegpt-2of4"])
def test_streamed_prune_keeps_the_biases_and_equals_in_memory(step, folders, tokens, tmp_path):
    folder = folders / "o+down"
    model = load_hf_folder(folder)
    step(model, Context(tokens=tokens, progress=False))
    source = SafetensorsSource(folder)
    with atomic_dir(tmp_path / "out") as tmp:
        writer = HFLayerWriter(tmp, source.config, dtype=source.dtype, biases=source.biases)
        prune_streamed(step, source, tokens, writer, Context(tokens=tokens, progress=False))
        writer.finish()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    ours, theirs = to_hf_tensors(model), to_hf_tensors(load_hf_folder(tmp_path / "out"))
    assert ours.keys() == theirs.keys() and any(k.endswith("o_proj.bias") for k in ours)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    original = to_hf_tensors(load_hf_folder(folder))
    np.testing.assert_array_equal(theirs["model.layers.2.mlp.down_proj.bias"],
                                  original["model.layers.2.mlp.down_proj.bias"])


def test_command_prune_stream_of_a_biased_folder_equals_in_memory(tmp_path, capsys, private_registry):
    """`prune --stream --model FOLDER` on an HF folder with biases (what a FLAP export is): the
    command accepts it and writes the in-memory command's weights, biases included."""
    from conftest import tiny_cli_folder

    from nnxprune import cli
    from nnxprune.io.checkpoint import load_checkpoint
    from nnxprune.io.load import load_model

    root = tiny_cli_folder(tmp_path, num_layers=2)
    loaded = load_model(root / "tiny")
    for layer in loaded.model.layers:
        layer.mlp.down_proj.set_bias(np.linspace(-0.2, 0.2, 32))
    export_hf(loaded.model, root / "biased", tokenizer=loaded.tokenizer)
    recipe = tmp_path / "wanda.toml"
    recipe.write_text('[recipe]\nname = "wanda"\n\n[[prune]]\nkind = "wanda"\nsparsity = 0.5\n\n'
                      f'[calibration]\ndataset = "{root / "calib.txt"}"\nnsamples = 4\nseqlen = 32\n'
                      'seed = 0\n')
    base = ["prune", str(recipe), "--model", str(root / "biased"), "--no-progress"]
    assert cli.main(base + ["--stream", "--out", str(tmp_path / "st")]) == 0, capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "mem")]) == 0, capsys.readouterr().err
    ours = to_hf_tensors(load_checkpoint(tmp_path / "mem"))
    theirs = to_hf_tensors(load_hf_folder(tmp_path / "st"))
    assert ours.keys() == theirs.keys() and "model.layers.1.mlp.down_proj.bias" in ours
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
