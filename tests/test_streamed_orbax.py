"""nnxprune's own checkpoints streamed (`nnxprune.io.orbax_layers`): a decoder layer restored alone
equals the whole checkpoint's layer (masks, FLAP-style biases, per-layer widths after width
surgery, bf16); `eval --stream CKPT` gives the in-memory number bit for bit in fp32; `prune
--stream --model CKPT` (Magnitude, Wanda, SparseGPT, and a ShortGPT cut) writes the in-memory
prune's weights; what cannot stream is refused in one line."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params, tiny_cli_folder
from flax import nnx

from nnxprune import cli
from nnxprune.errors import UserError
from nnxprune.evaluate.perplexity import score_windows
from nnxprune.evaluate.protocol import protocol_for
from nnxprune.evaluate.streamed import evaluate_streamed_windows
from nnxprune.io.atomic import atomic_dir
from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint
from nnxprune.io.hf import load_hf_folder, to_hf_tensors
from nnxprune.io.layers import open_layers
from nnxprune.io.orbax_layers import OrbaxSource
from nnxprune.io.resumable import StreamState
from nnxprune.models.llama import Llama, LlamaConfig, bias_flags
from nnxprune.streamed import run_plan
from nnxprune.transforms import Context
from nnxprune.transforms.depth import Depth
from nnxprune.transforms.magnitude import Magnitude
from nnxprune.transforms.sparsegpt import SparseGPT
from nnxprune.transforms.wanda import Wanda
from nnxprune.transforms.width import Width

DATA_DIR = os.environ.get("NNXPRUNE_DATA_DIR")
STEPS = {
    "magnitude-60": (Magnitude(sparsity=0.6),),
    "wanda-2of4": (Wanda(pattern="2:4", batch_size=4),),
    "sparsegpt-60": (SparseGPT(sparsity=0.6, blocksize=32, batch_size=4),),
    "shortgpt-wanda": (Depth(count=1, batch_size=4), Wanda(sparsity=0.6, batch_size=4)),
}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, size=(8, 32))


def _model(dtype=jnp.float32):
    cfg = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16,
                              max_position_embeddings=64)
    return randomize_params(Llama(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)), scale=0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokens):
    """Checkpoints of a tiny random 3-layer GQA model (untied head): `dense`; `masked` (Wanda 50%
    masks in memory, then biases on two layers' o_proj / down_proj, as FLAP adds); `width`
    (Minitron's width in memory: per-layer heads, KV groups and MLP widths); `bf16`."""
    root = tmp_path_factory.mktemp("streamed-orbax")
    save_checkpoint(_model(), root / "dense")
    model = _model()
    Wanda(sparsity=0.5, batch_size=4)(model, Context(tokens=tokens, progress=False))
    rng = np.random.default_rng(1)
    model.layers[0].self_attn.o_proj.set_bias(rng.normal(0, 0.1, 64))
    model.layers[2].mlp.down_proj.set_bias(rng.normal(0, 0.1, 64))
    save_checkpoint(model, root / "masked")
    model = Width(intermediate=(96, 64, 128), heads=(4, 2, 2), kv_heads=(2, 1, 2),
                  batch_size=4)(_model(), Context(tokens=tokens, progress=False))
    assert not model.config.is_uniform
    save_checkpoint(model, root / "width")
    save_checkpoint(_model(jnp.bfloat16), root / "bf16")
    return root


KINDS = ("dense", "masked", "width", "bf16")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_the_whole_checkpoints(kind, checkpoints):
    """Each layer restored alone is the loaded checkpoint's layer: same variables (masks and
    biases where saved), values and dtypes; the HF tensors have the masks folded."""
    model = load_checkpoint(checkpoints / kind)
    source = open_layers(checkpoints / kind)
    assert isinstance(source, OrbaxSource) and source.config == model.config
    assert source.dtype == ("bfloat16" if kind == "bf16" else "float32")
    assert source.biases == bias_flags(model)
    for i in range(model.config.num_layers):
        ours = nnx.to_flat_state(nnx.state(source.layer(i, model.embed_tokens.embedding.dtype)))
        theirs = nnx.to_flat_state(nnx.state(model.layers[i]))
        assert [p for p, _ in ours] == [p for p, _ in theirs]
        for (path, a), (_, b) in zip(ours, theirs):
            assert a[...].dtype == b[...].dtype, path
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    hf = to_hf_tensors(model)
    assert sorted(source.keys()) == sorted(hf)
    for key, value in source._read(source.keys()).items():
        assert value.dtype == hf[key].dtype, key
        np.testing.assert_array_equal(value, hf[key], err_msg=key)


def test_masks_stay_on_the_layer_and_cast_to_the_run_dtype(checkpoints):
    layer = OrbaxSource(checkpoints / "masked").layer(1, jnp.bfloat16)
    up = layer.mlp.up_proj
    assert up.kernel[...].dtype == jnp.bfloat16 and up.mask[...].dtype == jnp.bool_
    assert 0.45 < 1 - float(np.asarray(up.mask[...]).mean()) < 0.55
    assert layer.self_attn.o_proj.bias is None  # layer 1 was saved without biases
    whole = load_checkpoint(checkpoints / "masked").layers[1].mlp.up_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(up.kernel[...]), np.asarray(whole.astype(jnp.bfloat16)))


@pytest.mark.parametrize("kind,dtype", [("bf16", jnp.float32), ("masked", jnp.bfloat16)])
def test_loader_dtype_casts_a_checkpoint_as_the_streamed_source_does(kind, dtype, checkpoints):
    """`load_model(CKPT, param_dtype=...)` (the CLI's --dtype) returns every weight and bias in that
    dtype, masks boolean, values those of the streamed source read in the same dtype."""
    from nnxprune.io.load import load_model

    model = load_model(checkpoints / kind, param_dtype=dtype, with_tokenizer=False).model
    stored = load_checkpoint(checkpoints / kind)  # param_dtype=None: as saved
    assert stored.layers[0].mlp.up_proj.kernel[...].dtype != dtype
    flat = nnx.to_flat_state(nnx.state(model))
    floats = [(p, v[...]) for p, v in flat if jnp.issubdtype(v[...].dtype, jnp.floating)]
    assert floats and all(a.dtype == dtype for _, a in floats)
    assert all(v[...].dtype == jnp.bool_ for p, v in flat if "mask" in str(p))
    source = OrbaxSource(checkpoints / kind)
    for i in range(model.config.num_layers):
        ours = nnx.to_flat_state(nnx.state(model.layers[i]))
        streamed = nnx.to_flat_state(nnx.state(source.layer(i, dtype)))
        for (path, a), (_, b) in zip(ours, streamed):
            assert a[...].dtype == b[...].dtype, path
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    with pytest.raises(ValueError, match="floating dtype"):
        load_checkpoint(checkpoints / kind, param_dtype=jnp.int8)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_eval_equals_in_memory(kind, checkpoints):
    """Bit for bit: the same NLL as the in-memory evaluator on the loaded checkpoint."""
    windows = np.random.default_rng(2).integers(0, 256, size=(5, 24))
    protocol = protocol_for("wikitext2", seqlen=24, batch_size=2)
    model = load_checkpoint(checkpoints / kind)
    ref = score_windows(model, windows, protocol, progress=False)
    ours = evaluate_streamed_windows(OrbaxSource(checkpoints / kind), windows, protocol,
                                     param_dtype=model.embed_tokens.embedding.dtype, progress=False)
    assert ours.nll == ref.nll and ours.windows == 5


def _streamed(steps, ckpt, tokens, out):
    source = OrbaxSource(ckpt)
    ctx = Context(tokens=tokens, progress=False)
    needs = any(s.needs_calibration for s in steps)
    with atomic_dir(out) as tmp:
        state = StreamState(tmp, {"test": "key"})
        writer, _ = run_plan(steps, source, tokens if needs else None, tmp, ctx, state=state)
        state.clear()
        writer.finish()
    return ctx


@pytest.mark.parametrize("name, kind", [(name, "masked") for name in STEPS]
                         + [("wanda-2of4", "width")])
def test_streamed_prune_equals_in_memory(name, kind, checkpoints, tokens, tmp_path,
                                         private_registry):
    """Pruning the checkpoint layer by layer writes the in-memory prune's weights (the saved
    masks ANDed in as in memory, biases kept) and logs the same per-matrix sparsities."""
    steps = STEPS[name]
    model = load_checkpoint(checkpoints / kind)
    ctx_mem = Context(tokens=tokens, progress=False)
    for step in steps:
        model = step(model, ctx_mem)
    ctx = _streamed(steps, checkpoints / kind, tokens, tmp_path / "out")
    streamed = load_hf_folder(tmp_path / "out")
    assert streamed.config == model.config
    ours, theirs = to_hf_tensors(model), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    probe = jnp.asarray(tokens[:2])
    np.testing.assert_array_equal(np.asarray(model(probe)), np.asarray(streamed(probe)))
    mem, st = ctx_mem.report["transforms"][-1], ctx.report["transforms"][-1]
    assert mem["per_matrix"] == st["per_matrix"] and st["streamed"]


def test_soft_channel_masks_are_refused(tmp_path):
    model = _model()
    keep = np.arange(64) % 4 != 0
    model.embed_tokens.set_mask(keep)
    model.norm.set_mask(keep)
    save_checkpoint(model, tmp_path / "soft")
    with pytest.raises(UserError, match="channel mask .* drop --stream"):
        open_layers(tmp_path / "soft")


def test_a_state_that_contradicts_the_config_is_refused(checkpoints, tmp_path):
    import shutil

    shutil.copytree(checkpoints / "dense", tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "nnxprune.json").read_text())
    meta["config"]["layers"][1]["intermediate_size"] = 96
    (tmp_path / "edited" / "nnxprune.json").write_text(json.dumps(meta))
    source = OrbaxSource(tmp_path / "edited")
    source.layer(0)
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.\w+_proj\.kernel is saved with shape"):
        source.layer(1)
    meta["config"]["layers"] = meta["config"]["layers"][:2]
    (tmp_path / "edited" / "nnxprune.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="the saved state has 3 decoder layers, nnxprune.json 2"):
        OrbaxSource(tmp_path / "edited")


# -- the commands ----------------------------------------------------------------------------------
def _recipe(tmp_path, name: str, step: str, calib) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[recipe]\nname = "{name}"\n\n[[prune]]\n{step}\n\n[calibration]\n'
                    f'dataset = "{calib}"\nnsamples = 4\nseqlen = 32\nseed = 0\n')
    return str(path)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """`prune` (in memory) of the tiny CLI folder with Magnitude 40%: a masked checkpoint with
    its tokenizer, as users have them."""
    root = tiny_cli_folder(tmp_path_factory.mktemp("cli-orbax"), num_layers=2)
    recipe = _recipe(root, "mag", 'kind = "magnitude"\nsparsity = 0.4', root / "calib.txt")
    code = cli.main(["prune", recipe, "--model", str(root / "tiny"), "--out", str(root / "ckpt"),
                     "--no-progress"])
    assert code == 0
    return root


def test_command_prune_stream_from_a_checkpoint(cli_checkpoint, tmp_path, capsys,
                                                private_registry):
    root = cli_checkpoint
    recipe = _recipe(tmp_path, "wanda", 'kind = "wanda"\nsparsity = 0.6', root / "calib.txt")
    base = ["prune", recipe, "--model", str(root / "ckpt"), "--no-progress"]
    assert cli.main(base + ["--stream", "--out", str(tmp_path / "st"), "--json",
                            str(tmp_path / "r.json")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "mem")]) == 0
    out = capsys.readouterr().out
    assert "(checkpoint, float32)" in out
    streamed, in_memory = load_hf_folder(tmp_path / "st"), load_checkpoint(tmp_path / "mem")
    ours, theirs = to_hf_tensors(in_memory), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["streamed"] and abs(report["sparsity"] - 0.6) < 0.02
    assert (tmp_path / "st" / "tokenizer.json").is_file()


@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (real WikiText-2 needed)")
def test_command_eval_stream_of_a_checkpoint(cli_checkpoint, tmp_path, capsys):
    reports = []
    for flags in ([], ["--stream"]):
        out_json = tmp_path / f"ppl{len(flags)}.json"
        code = cli.main(["eval", str(cli_checkpoint / "ckpt"), "--seqlen", "32", "--max-windows",
                         "5", "--batch-size", "2", "--json", str(out_json), "--no-progress", *flags])
        assert code == 0, capsys.readouterr().err
        reports.append(json.loads(out_json.read_text()))
    assert reports[0]["ppl"] == reports[1]["ppl"] and reports[1]["streamed"]


@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (eval checks its data first)")
def test_command_eval_stream_refuses_soft_masks_in_one_line(cli_checkpoint, tmp_path, capsys):
    from nnxprune.io.load import load_model

    loaded = load_model(cli_checkpoint / "ckpt")
    loaded.model.norm.set_mask(np.arange(32) % 2 == 0)
    save_checkpoint(loaded.model, tmp_path / "soft", tokenizer=loaded.tokenizer)
    code = cli.main(["eval", str(tmp_path / "soft"), "--stream", "--seqlen", "16",
                     "--max-windows", "1", "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "channel mask" in lines[0]
