"""`nnxprune importance`: one calibration pass, the JSON layout the issue fixes (exact keys and
lengths), values equal to the library's scores, a PNG, and bad input before any work."""

import json
import os

import numpy as np
import pytest
from test_cli import assert_user_error, run, tiny_folder  # noqa: F401  (fixture)

from nnxprune.data import calibration_samples
from nnxprune.inspect.importance import importance, plot_importance
from nnxprune.io.load import load_model

DATA_DIR = os.environ.get("NNXPRUNE_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set")


@needs_data
def test_importance_writes_the_scores_and_a_plot(capsys, tiny_folder, tmp_path):  # noqa: F811
    out, png = tmp_path / "imp.json", tmp_path / "imp.png"
    code, stdout, err = run(capsys, "importance", tiny_folder, "--score", "block_influence",
                            "--score", "activation", "--json", out, "--png", png,
                            "--set", "calibration.nsamples=4", "--set", "calibration.seqlen=48",
                            "--no-progress")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report) == {"block_influence", "mlp", "heads", "hidden", "protocol"}
    assert len(report["block_influence"]) == 2
    assert [len(r) for r in report["mlp"]] == [64, 64] and [len(r) for r in report["heads"]] == [4, 4]
    assert len(report["hidden"]) == 32
    protocol = report["protocol"]
    assert (protocol["calibration"], protocol["nsamples"], protocol["seqlen"], protocol["seed"]) == (
        "c4", 4, 48, 0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_model(str(tiny_folder))
    tokens = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=4, seqlen=48, seed=0,
                                 data_dir=DATA_DIR).tokens
    lib = importance(loaded.model, tokens, ["block_influence", "activation"], progress=False)
    np.testing.assert_allclose(report["block_influence"], lib["block_influence"], rtol=1e-6)
    np.testing.assert_allclose(report["heads"], lib["heads"], rtol=1e-6)
    np.testing.assert_allclose(report["hidden"], lib["hidden"], rtol=1e-6)


@pytest.mark.parametrize("argv, needle", [
    (["--score", "block_influense"], "did you mean 'block_influence'"),
    (["--score", "wanda"], "importance reports"),
    (["--score", "activation", "--set", "eval.seqlen=3"], "only calibration"),
    (["--score", "activation", "--set", "calibration.nsample=3"], "unknown calibration key"),
    (["--score", "activation", "--set", "calibration.nsamples=0"], "nsamples must be >= 1"),
])
def test_importance_bad_input(capsys, tiny_folder, tmp_path, argv, needle):  # noqa: F811
    out = tmp_path / "x.json"
    code, _, err = run(capsys, "importance", tiny_folder, "--json", out, *argv)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_plot_handles_ragged_widths():
    report = {"block_influence": [0.1, 0.3], "mlp": [[1.0, 2.0, 3.0], [1.0]],
              "heads": [[1.0, 2.0], [3.0, 4.0]], "hidden": [1.0, 2.0, 0.5]}
    assert plot_importance(report)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_importance({"protocol": {}})


@needs_data
def test_importance_taylor_writes_every_variant_and_the_loss(capsys, tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "taylor.json"
    code, _, err = run(capsys, "importance", tiny_folder, "--score", "taylor", "--json", out,
                       "--set", "calibration.nsamples=3", "--set", "calibration.seqlen=32",
                       "--no-progress")
    assert code == 0, err
    report = json.loads(out.read_text())
    for kind in ("mlp", "kv"):
        assert [len(r) for r in report[f"taylor_{kind}"]] == ([64, 64] if kind == "mlp" else [2, 2])
        for variant in ("vector", "element2", "mix"):
            assert len(report[f"taylor_{kind}_{variant}"]) == 2
    assert report["protocol"]["nsamples"] == 3 and report["protocol"]["loss"] > 0
    assert "block_influence" not in report


def test_taylor_alone_defaults_to_llm_pruner_calibration():
    from nnxprune.inspect.importance import calibration_for

    assert (calibration_for([], ["taylor"]).nsamples, calibration_for([], ["taylor"]).seqlen) == (10, 64)
    assert calibration_for([], ["taylor", "activation"]).seqlen == 1024
