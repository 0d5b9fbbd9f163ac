"""`nnxprune prune --distributed` for real: two processes on localhost (2 forced CPU devices each,
one 4-device mesh over gloo) run Sheared LLaMA's pruning stage (mask training, then the fold) on a
tiny model. Without a given mesh the stage spreads the weights over all 4 devices (FSDP across
both processes). Losses, expected sizes, the structures kept and the trained weights equal a
1-process run on the same global batch; one checkpoint is written by Orbax from both processes
and restored here; process 0 alone prints and writes the report. A bad input seen by one process
only stops both with one line each. Every wait is bounded; every process is killed at the end."""

import json
import time
from pathlib import Path

import multiprocess_harness as mh
import numpy as np
import test_cli
import test_multiprocess as tm
from test_cli import run

from nnxprune import multihost

tiny_folder = test_cli.tiny_folder  # a tiny Llama (hidden 32, 4 heads, 2 KV heads, MLP 64)
SHEARED = """
[recipe]
name = "tiny-sheared"

[[prune]]
kind = "sheared"
layers = 1
heads = 2
intermediate = 32
hidden = 24
steps = 3
batch_size = 4
seqlen = 16
lr = 0.001
target_warmup = 0.5
dataset = "DATA"
"""
# Tolerance: as in test_multiprocess (the same float32 program, sums grouped differently), with
# the trained weights moved by 3 Adam steps of lr 1e-3; 8 simulated devices against 1 measured
# 6e-6 at most on this stage's weights (tests/calibration/test_gradients_sharded.py), 2e-5 allowed.
WEIGHTS_ATOL = 2e-5


def _sheared(report: dict) -> dict:
    return next(t for t in report["transforms"] if t["kind"] == "sheared")


def _prune_argv(tmp_path: Path, tiny_folder) -> list:
    recipe = tm._setup(tmp_path, SHEARED)
    return ["prune", recipe, "--model", tiny_folder, "--no-progress"]


def test_sheared_pruning_on_two_processes_equals_one(capsys, tiny_folder, tmp_path):
    argv = _prune_argv(tmp_path, tiny_folder)

    def one_process():
        code, _, err = run(capsys, *argv, "--out", tmp_path / "out1", "--json", tmp_path / "rep1.json")
        assert code == 0, err

    (out0, err0), (out1, err1) = mh.two_processes(
        tmp_path, mh.nnxprune([*argv, "--out", "out2", "--json", "rep2.json"]), one_process)
    assert "process 0 of 2" in out0 and "pruned    " in out0 and "wrote     out2" in out0
    assert mh.own_lines(out1) == [] and mh.own_lines(err1) == [], (out1, err1)
    two = json.loads((tmp_path / "rep2.json").read_text())
    one = json.loads((tmp_path / "rep1.json").read_text())
    s2, s1 = _sheared(two), _sheared(one)
    assert s2["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}  # weights split over both processes
    assert s1["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    np.testing.assert_allclose(s2["ce_per_step"], s1["ce_per_step"], rtol=tm.RTOL)
    np.testing.assert_allclose(s2["expected_params_per_step"], s1["expected_params_per_step"],
                               rtol=tm.RTOL)
    for name, size in s1["expected_sizes"].items():
        np.testing.assert_allclose(s2["expected_sizes"][name], size, rtol=tm.RTOL)
    # the same target shapes, and (below) the same structures kept with the same trained values
    assert two["pruned"] == one["pruned"] and two["pruned"]["hidden_size"] == 24
    assert [(s["num_heads"], s["intermediate_size"]) for s in two["pruned"]["layers"]] == [(2, 32)]
    for suffix in (".md", ".html", ".png"):  # process 0 wrote the report and its views
        assert (tmp_path / f"rep2{suffix}").is_file()
    state = tmp_path / "out2" / "state"  # one checkpoint, written by both processes
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    _assert_same_weights(tmp_path / "out2", tmp_path / "out1")


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    """Both checkpoints restored in this (1-process, 1-device) run: same shapes, close values."""
    import jax
    from flax import nnx

    from nnxprune.io.load import load_model

    a = nnx.state(load_model(path_a, with_tokenizer=False).model)
    b = nnx.state(load_model(path_b, with_tokenizer=False).model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=WEIGHTS_ATOL)


def _error_lines(text: str) -> list[str]:
    return [line for line in mh.own_lines(text) if line.strip()]


def test_bad_input_in_one_process_stops_both_with_one_line(tiny_folder, tmp_path):
    """Process 1 alone is given a data folder that does not exist: it reports it and stops;
    process 0, already loading and pruning, stops too, naming process 1 and its reason."""
    argv = [*_prune_argv(tmp_path, tiny_folder), "--out", "out2", "--json", "rep2.json"]
    missing = tmp_path / "no-such-folder"
    with mh.launched(tmp_path, mh.nnxprune(argv), extra={1: ["--data-dir", missing]}) as procs:
        code1 = procs[1].wait(timeout=mh.TIMEOUT)
        t0 = time.monotonic()
        code0 = procs[0].wait(timeout=mh.TIMEOUT)
        waited = time.monotonic() - t0
    (out0, err0), (out1, err1) = mh.outputs(tmp_path, 0), mh.outputs(tmp_path, 1)
    reason = f"data directory {missing} (from --data-dir) does not exist"
    assert code1 == 2 and _error_lines(err1) == [f"nnxprune prune: error: {reason}"], err1[-3000:]
    assert code0 == 2 and _error_lines(err0) == [
        f"nnxprune prune: error: process 1 of this --distributed run stopped: {reason}"], err0[-3000:]
    assert waited < 2 * multihost.HEARTBEAT_SECONDS, waited  # noticed by the watchdog, no hang
    assert "process 0 of 2" in out0 and mh.own_lines(out1) == []  # both had joined
    assert not (tmp_path / "out2").exists() and not (tmp_path / "rep2.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
