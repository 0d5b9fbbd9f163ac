"""The multi-pass and structured methods streamed (`nnxprune.streamed_passes`,
`nnxprune.streamed_width`): OWL, SparseLLM, ShortGPT's depth cut (alone and before a sparsity
step) and Minitron's width give the in-memory run's masks, kept layers, kept channels, weights and
logits exactly in fp32, on a tiny random GQA model; a killed OWL run resumes in either pass."""

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
from nnxprune.io.layers import SafetensorsSource
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.io.resumable import StreamState
from nnxprune.streamed import pass_names, run_plan
from nnxprune.transforms import Context
from nnxprune.transforms.depth import Depth
from nnxprune.transforms.owl import OWL
from nnxprune.transforms.sparsellm import SparseLLM
from nnxprune.transforms.wanda import Wanda
from nnxprune.transforms.width import Width

PLANS = {
    "owl-wanda": (OWL(sparsity=0.5, lam=0.1, batch_size=4),),
    "owl-sparsegpt": (OWL(sparsity=0.5, lam=0.1, method="sparsegpt", blocksize=32, batch_size=4),),
    "sparsellm": (SparseLLM(sparsity=0.5, iterations=2, layer_iterations=((-1, 1),),
                            blocksize=32, batch_size=4),),
    "shortgpt": (Depth(count=1, batch_size=4),),
    "shortgpt-wanda-2of4": (Depth(count=1, batch_size=4), Wanda(pattern="2:4", batch_size=4)),
    "shortgpt-owl": (Depth(count=1, batch_size=4), OWL(sparsity=0.6, lam=0.1, batch_size=4)),
    "width-uniform": (Width(heads=2, intermediate=96, batch_size=4),),
    "width-wanda-score": (Width(score="wanda", intermediate=64, batch_size=4),),
    "width-hidden": (Width(hidden=48, intermediate=(96, 64, 128), heads=(4, 2, 2),
                           kv_heads=(2, 1, 2), batch_size=4),),
}
# what each method's report must hold identically in both runs
LOGGED = ("per_matrix", "outlier_ratios", "layer_sparsity", "block_influence", "dropped",
          "reconstruction_error", "mlp_layers", "num_pruned_layers", "hidden", "layers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random 3-layer Llama (GQA, untied head) as a plain fp32 HF folder."""
    cfg = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1)
    out = tmp_path_factory.mktemp("streamed-methods") / "tiny"
    export_hf(model, out)
    return out


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, size=(8, 32))


def streamed_run(steps, folder, tokens, out):
    source = SafetensorsSource(folder)
    ctx = Context(tokens=tokens, progress=False)
    needs = any(s.needs_calibration for s in steps)
    with atomic_dir(out) as tmp:  # every pass's log goes through the resume manifest (JSON)
        state = StreamState(tmp, {"test": "key"})
        writer, _ = run_plan(steps, source, tokens if needs else None, tmp, ctx, state=state)
        assert state.pass_index == len(pass_names(steps)) - 1 and state.done == writer.shards - 1
        state.clear()
        writer.finish()
    return ctx


def _logged(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k in LOGGED}
    if isinstance(out.get("layers"), dict):  # SparseLLM's rounds (without their seconds)
        out["layers"] = {int(i): (v["kept_round"], [(r["before"], r["after"], r["reconstruction"])
                                                    for r in v["rounds"]])
                         for i, v in out["layers"].items()}
    return out


def _entries(ctx):
    return [_logged(t) for t in ctx.report["transforms"]]


@pytest.mark.parametrize("name", list(PLANS))
def test_streamed_equals_in_memory(name, folder, tokens, tmp_path, private_registry):
    steps = PLANS[name]
    model = load_hf_folder(folder)
    ctx_mem = Context(tokens=tokens, progress=False)
    for step in steps:
        step.check(model.config)
        model = step(model, ctx_mem)
    ctx = streamed_run(steps, folder, tokens, tmp_path / "out")

    streamed = load_hf_folder(tmp_path / "out")
    assert streamed.config == model.config
    ours, theirs = to_hf_tensors(model), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:  # same kept layers and channels, same zeros (masks), same weights
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    probe = jnp.asarray(tokens[:2])
    np.testing.assert_array_equal(np.asarray(model(probe)), np.asarray(streamed(probe)))
    assert _entries(ctx) == _entries(ctx_mem)
    assert ctx.report["transforms"]  # something was logged, in the in-memory run's order
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == model.config.num_layers + 1


def test_depth_cut_copies_the_kept_layers(folder, tokens, tmp_path, private_registry):
    """The depth cut's two kept layers are the dense model's tensors, renumbered."""
    ctx = streamed_run(PLANS["shortgpt"], folder, tokens, tmp_path / "depth")
    dropped = ctx.report["transforms"][-1]["dropped"]
    kept = [i for i in range(3) if i not in dropped]
    dense, cut = to_hf_tensors(load_hf_folder(folder)), to_hf_tensors(load_hf_folder(tmp_path / "depth"))
    for new, old in enumerate(kept):
        key = "model.layers.{}.mlp.down_proj.weight"
        np.testing.assert_array_equal(cut[key.format(new)], dense[key.format(old)])
    assert "model.layers.2.mlp.down_proj.weight" not in cut


def test_bf16_depth_copy_keeps_the_stored_tensors(folder, tokens, tmp_path, private_registry):
    """A bf16 checkpoint's kept layers are copied as stored (bf16, bit for bit), renumbered."""
    model = load_hf_folder(folder, param_dtype=jnp.bfloat16)
    export_hf(model, tmp_path / "bf16")
    ctx = streamed_run(PLANS["shortgpt"], tmp_path / "bf16", tokens, tmp_path / "out")
    kept = [i for i in range(3) if i not in ctx.report["transforms"][-1]["dropped"]]
    source, out = SafetensorsSource(tmp_path / "bf16"), SafetensorsSource(tmp_path / "out")
    assert out.dtype == "bfloat16"
    for new, old in enumerate(kept):
        for part in ("self_attn.q_proj.weight", "input_layernorm.weight"):
            a, b = out.tensor(f"model.layers.{new}.{part}"), source.tensor(f"model.layers.{old}.{part}")
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint16), b.view(np.uint16))


# -- the command: refusals and --resume of a multi-pass method ---------------------------------------
def _recipe(tmp_path, step: str, calibration: str = "") -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(f'[recipe]\nname = "t"\n\n{step}\n{calibration}')
    return str(path)


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A tiny HF folder with a tokenizer (the command reads it) and a local calibration text."""
    return tiny_cli_folder(tmp_path_factory.mktemp("cli-streamed-methods"), num_layers=3)


def _calibration(cli_folder) -> str:
    return (f'[calibration]\ndataset = "{cli_folder / "calib.txt"}"\nnsamples = 4\nseqlen = 32\n'
            f'seed = 0\n')


@pytest.mark.parametrize("steps, needle", [
    ('[[prune]]\nkind = "depth"\ncount = 1\nmethod = "block_search"', "block_search"),
    ('[[prune]]\nkind = "width"\nintermediate = 32\nsoft = true', "soft"),
    ('[[prune]]\nkind = "width"\nhidden = 16\nscore = "wanda"', "activation"),
    ('[[prune]]\nkind = "wanda"\nsparsity = 0.5\n[[prune]]\nkind = "depth"\ncount = 1',
     "only as the last step"),
    ('[[prune]]\nkind = "shrink_mlp"\nfraction = 0.5', "shrink_mlp does not stream"),
])
def test_command_refuses_what_does_not_stream(steps, needle, cli_folder, tmp_path, capsys):
    recipe = _recipe(tmp_path, steps, _calibration(cli_folder))
    code = cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--out",
                     str(tmp_path / "out"), "--stream"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "--stream runs one sparsity step" in lines[0] and "width (Minitron" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("width, model_type, shapes", [
    ("heads = 2\nintermediate = 48", "llama", [(2, 2, 48)] * 3),
    ("hidden = 24\nintermediate = [48, 32, 64]\nheads = [4, 2, 2]\nkv_heads = [2, 1, 2]",
     "nnxprune_llama", [(4, 2, 48), (2, 1, 32), (2, 2, 64)]),
])
def test_command_streams_width(width, model_type, shapes, cli_folder, tmp_path, capsys,
                               private_registry):
    """Uniform widths give a plain Llama folder, per-layer widths nnxprune's heterogeneous one
    (as `export_hf` writes them); both load as `nnxprune eval` loads a model."""
    from nnxprune.io.load import load_model

    recipe = _recipe(tmp_path, f'[[prune]]\nkind = "width"\n{width}', _calibration(cli_folder))
    assert cli.main(["prune", recipe, "--model", str(cli_folder / "tiny"), "--out",
                     str(tmp_path / "out"), "--stream", "--no-progress", "--json",
                     str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type
    loaded = load_model(str(tmp_path / "out")).model
    assert [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in loaded.config.layers] \
        == shapes
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "width" and "sparsity" not in report
    assert [[s["num_heads"], s["num_kv_heads"], s["intermediate_size"]]
            for s in report["pruned"]["layers"]] == [list(s) for s in shapes]


STOP_IN_PASS = """
import os, signal, sys
from nnxprune import cli
from nnxprune.io import resumable

save = resumable.StreamState.save

def save_then_stop(self, done, *args, **kwargs):  # the signal right after a layer is recorded
    save(self, done, *args, **kwargs)
    if self.pass_index == int(os.environ["STOP_PASS"]) and done == 1:
        os.kill(os.getpid(), signal.SIGKILL)

resumable.StreamState.save = save_then_stop
sys.exit(cli.main(sys.argv[1:]))
"""


def _tensors(folder):
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("stop_pass", [0, 1])
def test_killed_owl_run_resumes_in_its_pass(stop_pass, cli_folder, tmp_path, capsys,
                                            private_registry):
    """OWL-SparseGPT killed (SIGKILL) after layer 0 of its outlier pass (0) or of its pruning pass
    (1): `--resume` continues there (the outlier ratios of a finished pass are taken as they
    are) and gives the uninterrupted run's kernels and report entries exactly."""
    import subprocess
    import sys

    recipe = _recipe(tmp_path, '[[prune]]\nkind = "owl"\nsparsity = 0.5\nlam = 0.1\n'
                               'method = "sparsegpt"\nbatch_size = 2\nblocksize = 32',
                     _calibration(cli_folder))
    argv = ["prune", recipe, "--model", str(cli_folder / "tiny"), "--stream", "--no-progress"]
    out = tmp_path / "out"
    env = {**os.environ, "STOP_PASS": str(stop_pass)}
    killed = subprocess.run([sys.executable, "-c", STOP_IN_PASS, *argv, "--out", str(out)],
                            env=env, check=False, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (partial,) = list(tmp_path.glob(".out.nnxprune-tmp-*"))
    manifest = json.loads((partial / ".resume" / "manifest.json").read_text())
    assert (manifest["pass"], manifest["done"], len(manifest["results"])) == (stop_pass, 1, stop_pass)

    assert cli.main(argv + ["--out", str(out), "--resume", "--json", str(tmp_path / "r.json")]) == 0
    assert f"pass {stop_pass + 1} of 2" in capsys.readouterr().out
    assert cli.main(argv + ["--out", str(tmp_path / "full"), "--json",
                            str(tmp_path / "full.json")]) == 0
    resumed, full = _tensors(out), _tensors(tmp_path / "full")
    assert resumed.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)
    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "full.json"))
    assert (ours["resumed_at_pass"], ours["resumed_at_layer"]) == (stop_pass, 1)
    for a, b in zip(ours["transforms"], theirs["transforms"], strict=True):
        assert _logged(a) == _logged(b)
    assert ours["sparsity"] == theirs["sparsity"] and abs(ours["sparsity"] - 0.5) < 0.02
    assert not list(tmp_path.glob(".*nnxprune-tmp*"))
