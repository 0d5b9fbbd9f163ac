"""Data-parallel calibration across processes: two processes on localhost (2 forced CPU devices
each, one 4-device mesh, collectives over gloo) gather every collector's statistics and run Wanda
and SparseGPT with the calibration sequences split over all 4 devices; both processes end with
the statistics, masks and kernels of this process's 1-device run, bit for bit. And the command a
user runs, `nnxprune prune --distributed`, on 2 processes writes the model and the perplexities of
a 1-process run, printed by process 0 only. Every wait is bounded and every process is killed at
the end, whatever happened (`tests/multiprocess_harness.py`)."""

import json
from pathlib import Path

import jax
import multiprocess_harness as mh
import numpy as np
import parallel_common as pc
import pytest
import test_cli
from flax import nnx
from test_cli import run

from nnxprune.calibration import parallel

tiny_folder = test_cli.tiny_folder  # a tiny Llama (hidden 32, 2 layers, vocab 320) + tokenizer

HERE = Path(__file__).resolve().parent
DROP = (parallel.ENV,)  # the children split calibration as they would by default


def test_two_processes_give_the_one_device_statistics_and_masks(tmp_path):
    argv = [HERE / "multiprocess_calibration_run.py", "<PORT>", "<ID>", tmp_path / "p<ID>.npz"]
    with mh.launched(tmp_path, argv, drop=DROP) as procs:
        want = {}  # meanwhile, this process's 1-device run
        for case in ("two_per_device", "padded"):
            want.update(pc.statistics(case))
        want.update(pc.pruned("two_per_device", ("wanda", "sparsegpt")))
        codes = mh.wait(procs)
    errors = [(tmp_path / f"p{i}.err").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], (codes, errors)
    assert len(want) > 100 and any("/activations/" in k for k in want)
    for i in range(2):
        assert pc.compare(dict(np.load(tmp_path / f"p{i}.npz")), want) == [], i


RECIPE = """
[[prune]]
kind = "wanda"
sparsity = 0.5
batch_size = 2
[calibration]
dataset = "c4"
nsamples = 8
seqlen = 32
[eval]
dataset = "wikitext2"
seqlen = 32
max_windows = 4
"""


@pytest.mark.skipif(not test_cli.DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (C4, WikiText-2)")
def test_prune_distributed_on_two_processes_equals_one(capsys, tiny_folder, tmp_path):
    from nnxprune.io.load import load_model

    (tmp_path / "r.toml").write_text(RECIPE)
    argv = ["prune", tmp_path / "r.toml", "--model", tiny_folder, "--no-progress"]
    two = mh.nnxprune([*argv, "--out", "out2", "--json", "rep2.json"])
    with mh.launched(tmp_path, two, drop=DROP) as procs:
        code, _, err = run(capsys, *argv, "--out", tmp_path / "out1", "--json",
                           tmp_path / "rep1.json")  # meanwhile, 1 process, 1 device
        codes = mh.wait(procs)
    outs = [mh.outputs(tmp_path, i) for i in range(2)]
    assert code == 0 and codes == [0, 0], (err, codes, outs[0][1][-3000:], outs[1][1][-3000:])
    assert "process 0 of 2, 4 devices" in outs[0][0] and "perplexity" in outs[0][0]
    assert mh.own_lines(outs[1][0]) == [] and outs[1][1].strip() == ""  # process 1 prints nothing
    one, two = (json.loads((tmp_path / f"rep{i}.json").read_text()) for i in (1, 2))
    for key in ("ppl", "nll", "sparsity"):
        assert one["pruned"][key] == two["pruned"][key], key
    a, b = (nnx.state(load_model(tmp_path / f"out{i}", with_tokenizer=False).model)
            for i in (1, 2))
    masks = 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
        masks += "mask" in jax.tree_util.keystr(path)
    assert masks == 2 * 7  # every projection of both layers was pruned, identically
