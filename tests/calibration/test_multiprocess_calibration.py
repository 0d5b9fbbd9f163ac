"""Data-parallel calibration across processes: two processes on localhost (2 forced CPU devices
each, one 4-device mesh, collectives over gloo) gather every collector's statistics and run Wanda
and SparseGPT with the calibration sequences split over all 4 devices; both processes end with
the statistics, masks and kernels of this process's 1-device run, bit for bit. And the command a
user runs, `nnxprune prune --distributed`, on 2 processes writes the model and the perplexities of
a 1-process run, printed by process 0 only. Every wait is bounded and every process is killed at
the end, whatever happened."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import parallel_common as pc
import pytest
import test_cli
from flax import nnx
from test_cli import run

from nnxprune import multihost
from nnxprune.calibration import parallel

tiny_folder = test_cli.tiny_folder  # a tiny Llama (hidden 32, 2 layers, vocab 320) + tokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIMEOUT = 600  # seconds for the 2-process run (about 150 s here on 2 busy cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in multihost.ENV.values() and k != parallel.ENV}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


@contextlib.contextmanager
def _launched(tmp_path: Path, argv):
    """Two processes of `argv` (each given its process id where `argv` says <ID>, and the
    coordinator's port where it says <PORT>); yields them; kills what is left at the end."""
    port, procs = _free_port(), []
    try:
        for i in range(2):
            args = [str(a).replace("<PORT>", str(port)).replace("<ID>", str(i)) for a in argv]
            with open(tmp_path / f"p{i}.out", "w") as out, open(tmp_path / f"p{i}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, *args], cwd=tmp_path,
                                              env=_environment(), stdout=out, stderr=err))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def _wait(procs) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]


def test_two_processes_give_the_one_device_statistics_and_masks(tmp_path):
    argv = [HERE / "multiprocess_calibration_run.py", "<PORT>", "<ID>", tmp_path / "p<ID>.npz"]
    with _launched(tmp_path, argv) as procs:
        want = {}  # meanwhile, this process's 1-device run
        for case in ("two_per_device", "padded"):
            want.update(pc.statistics(case))
        want.update(pc.pruned("two_per_device", ("wanda", "sparsegpt")))
        codes = _wait(procs)
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
# what gloo prints of its own, a piece at a time from several threads (test_multiprocess.py)
_GLOO_PIECES = ("[Gloo] Rank ", " is connected to ",
                " peer ranks. Expected number of connected peer ranks is : ")


def _own_lines(text: str) -> list[str]:
    for piece in _GLOO_PIECES:
        text = text.replace(piece, " ")
    return [line for line in text.splitlines() if line.strip()
            and not line.replace(" ", "").isdigit() and not re.match(r"[WIEF]\d{4} ", line)]


@pytest.mark.skipif(not test_cli.DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (C4, WikiText-2)")
def test_prune_distributed_on_two_processes_equals_one(capsys, tiny_folder, tmp_path):
    from nnxprune.io.load import load_model

    (tmp_path / "r.toml").write_text(RECIPE)
    argv = ["prune", tmp_path / "r.toml", "--model", tiny_folder, "--no-progress"]
    two = ["-m", "nnxprune.cli", *argv, "--out", "out2", "--json", "rep2.json", "--distributed",
           "--coordinator", "127.0.0.1:<PORT>", "--num-processes", "2", "--process-id", "<ID>"]
    with _launched(tmp_path, two) as procs:
        code, _, err = run(capsys, *argv, "--out", tmp_path / "out1", "--json",
                           tmp_path / "rep1.json")  # meanwhile, 1 process, 1 device
        codes = _wait(procs)
    outs = [((tmp_path / f"p{i}.out").read_text(), (tmp_path / f"p{i}.err").read_text())
            for i in range(2)]
    assert code == 0 and codes == [0, 0], (err, codes, outs[0][1][-3000:], outs[1][1][-3000:])
    assert "process 0 of 2, 4 devices" in outs[0][0] and "perplexity" in outs[0][0]
    assert _own_lines(outs[1][0]) == [] and outs[1][1].strip() == ""  # process 1 prints nothing
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
