"""Streamed training data (`[recovery.stream]`) on two real processes (the harness
`tests/multiprocess_harness.py`: localhost, 2 forced CPU devices each, gloo): each process reads
only the rows of the global batch its devices hold, the losses and metrics equal a 1-process run
on the same data, and the checkpoint holds every row's position (gathered from both processes),
from which a 1-process stream continues exactly."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import test_cli
from multiprocess_harness import nnxprune, two_processes
from test_multiprocess import RTOL, TWO, _assert_same_metrics, _metrics, _one_process

from nnxprune.data import grain_stream, sources
from nnxprune.io.load import load_model
from nnxprune.recovery import RecoveryConfig

tiny_folder = test_cli.tiny_folder  # a tiny Llama (hidden 32, 2 layers, vocab 320) + tokenizer
RECIPE = """
[recovery]
kind = "pretrain"
dataset = "DATA"
steps = 4
batch_size = 4
seqlen = 16
lr = 0.003
warmup_steps = 1
eval_every = 2
eval_batches = 1
checkpoint_every = 2
[recovery.stream]
"""


def test_two_processes_read_their_rows_and_train_as_one(capsys, tiny_folder, tmp_path):
    folder = os.environ.get(sources.DATA_DIR_ENV)
    if not folder or not (Path(folder) / "wiki.test.raw").is_file():
        pytest.skip(f"{sources.DATA_DIR_ENV} does not name the data folder with wiki.test.raw")
    (tmp_path / "wiki.txt").symlink_to(Path(folder) / "wiki.test.raw")
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace("DATA", str(tmp_path / "wiki.txt")))
    argv = ["train", tiny_folder, "--recipe", recipe, "--no-progress"]
    two_processes(tmp_path, nnxprune([*argv, "--out", "out2", "--json", "rep2.json", *TWO]),
                  lambda: _one_process(capsys, tmp_path, argv))
    two, one = (json.loads((tmp_path / f"rep{n}.json").read_text()) for n in (2, 1))
    assert two["recovery"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # process 0 read 2 of the 4 rows of each micro-batch (its devices' share); the 1-process run 4
    assert two["recovery"]["data"]["rows_read_here"] == 2
    assert one["recovery"]["data"]["rows_read_here"] == 4
    np.testing.assert_allclose(two["recovery"]["losses"], one["recovery"]["losses"], rtol=RTOL)
    _assert_same_metrics(_metrics(tmp_path / "rep2.train" / "metrics.jsonl"),
                         _metrics(tmp_path / "rep1.train" / "metrics.jsonl"))
    # the step-2 checkpoint of the 2-process run: all 4 rows' positions, from both processes
    state = json.loads((tmp_path / "rep2.train" / "checkpoints" / "2" / "data" / "metadata")
                       .read_text())
    assert sorted(state["slots"]) == ["0", "1", "2", "3"] and state["batches"] == 2
    cfg = RecoveryConfig.from_dict({"kind": "pretrain", "dataset": str(tmp_path / "wiki.txt"),
                                    "batch_size": 4, "seqlen": 16, "eval_batches": 1,
                                    "stream": {}})
    tok = load_model(tiny_folder).tokenizer
    whole = grain_stream.open_stream(cfg, tok)
    want = [next(whole) for _ in range(4)]
    resumed = grain_stream.open_stream(cfg, tok)
    resumed.set_state(state)
    for got, expected in zip([next(resumed) for _ in range(2)], want[2:]):
        np.testing.assert_array_equal(got, expected)
