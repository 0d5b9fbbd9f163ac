"""`--distributed` for real: two processes on localhost join one 4-device mesh (2 forced CPU devices
each, collectives over gloo) and run `nnxprune train` (distillation, LoRA). Their losses and
process 0's metrics.jsonl equal a 1-process run on the same global batch; one checkpoint is
written by Orbax from both processes and a 1-process run restores it; only process 0 prints and
writes; a killed process makes the other exit with one line instead of hanging. Every wait is
bounded and every process is killed at the end, whatever happened (the harness:
`tests/multiprocess_harness.py`)."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess_harness as mh
import numpy as np
import pytest
import test_cli
from test_cli import assert_user_error, run

from nnxprune import multihost

tiny_folder = test_cli.tiny_folder  # a tiny Llama (hidden 32, 2 layers, vocab 320) + tokenizer
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building. It was the "
        "tallest man-made structure in the world for 41 years.\n") * 60
RECIPE = """
[recovery]
dataset = "DATA"
steps = 3
batch_size = 4
seqlen = 16
lr = 0.003
warmup_steps = 1
eval_every = 0
eval_batches = 0
"""
DISTILL = RECIPE + 'kind = "distill"\n[recovery.distill]\nce_weight = 1.0\n'
LORA = RECIPE + "kind = \"lora\"\ncheckpoint_every = 2\n[recovery.lora]\ntargets = '.*mlp.*'\nrank = 2\n"
TWO = ["--set", "recovery.mesh.fsdp=2"]  # 2 processes: mesh data=2 x fsdp=2 (weights split too)
# Tolerance. Both runs compute the same float32 program on the same global batch of 4 x 16
# tokens; the 2-process run only groups its sums differently (per-device partial sums, then an
# all-reduce over gloo; FSDP all-gathers copy exactly). Regrouping a float32 sum of n terms moves
# it by at most about n * 2^-24 relative; the loss sums 4 x 15 token losses, each a logsumexp
# over 320 logits: (60 + 320) * 6e-8 = 2.3e-5 at the first step, and 3 Adam steps of lr 3e-3
# carry a gradient that differs in its last bits into parameter changes of the same relative
# size. Hence rtol 3e-5 on losses and metrics; the weights, which move by lr per step, get an
# absolute 1e-5 (lr 3e-3 x 3 steps x a few 1e-4 of relative gradient difference at most).
RTOL, WEIGHTS_ATOL = 3e-5, 1e-5


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float) and k != "elapsed":  # elapsed: wall time
                np.testing.assert_allclose(g[k], w[k], rtol=RTOL, err_msg=k)
            elif k != "elapsed":
                assert g[k] == w[k], k


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    """Both checkpoints restored in this (1-process, 1-device) run hold the same weights."""
    from flax import nnx

    from nnxprune.io.load import load_model

    a = nnx.state(load_model(path_a, with_tokenizer=False).model)
    b = nnx.state(load_model(path_b, with_tokenizer=False).model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=WEIGHTS_ATOL)


def _check_run(tmp_path: Path, outs, kind: str) -> tuple[dict, dict]:
    """What every 2-process run must show against its 1-process twin."""
    (out0, err0), (out1, err1) = outs
    assert f"recovery  {kind}" in out0 and "wrote     out2" in out0 and "process 0 of 2" in out0
    assert mh.own_lines(out1) == [], out1  # process 1 prints nothing of its own
    assert "recovery" not in err1 and "wrote" not in err1
    two, one = json.loads((tmp_path / "rep2.json").read_text()), json.loads(
        (tmp_path / "rep1.json").read_text())
    assert two["recovery"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    np.testing.assert_allclose(two["recovery"]["losses"], one["recovery"]["losses"], rtol=RTOL)
    _assert_same_metrics(_metrics(tmp_path / "rep2.train" / "metrics.jsonl"),
                         _metrics(tmp_path / "rep1.train" / "metrics.jsonl"))
    state = tmp_path / "out2" / "state"  # one checkpoint, written by both processes
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]  # no temporaries left
    _assert_same_weights(tmp_path / "out2", tmp_path / "out1")
    return two, one


def _setup(tmp_path: Path, body: str) -> Path:
    (tmp_path / "train.txt").write_text(TEXT)
    path = tmp_path / "r.toml"
    path.write_text(body.replace("DATA", str(tmp_path / "train.txt")))
    return path


def _one_process(capsys, tmp_path: Path, argv) -> None:
    """The same command in this process: 1 process, 1 device, the same global batch."""
    code, _, err = run(capsys, *argv, "--out", tmp_path / "out1", "--json", tmp_path / "rep1.json")
    assert code == 0, err


def test_distillation_on_two_processes_equals_one(capsys, tiny_folder, tmp_path):
    recipe = _setup(tmp_path, DISTILL)
    argv = ["train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder, "--no-progress"]
    two = mh.nnxprune([*argv, "--out", "out2", "--json", "rep2.json", *TWO])
    outs = mh.two_processes(tmp_path, two, lambda: _one_process(capsys, tmp_path, argv))
    two, one = _check_run(tmp_path, outs, "distill")
    assert two["recovery"]["losses"][0] > 1.0  # CE + KD: a real loss, not the 0 of self-distill


def test_lora_on_two_processes_equals_one(capsys, tiny_folder, tmp_path):
    recipe = _setup(tmp_path, LORA)
    argv = ["train", tiny_folder, "--recipe", recipe, "--no-progress"]
    two = mh.nnxprune([*argv, "--out", "out2", "--json", "rep2.json", *TWO])
    outs = mh.two_processes(tmp_path, two, lambda: _one_process(capsys, tmp_path, argv))
    two, _ = _check_run(tmp_path, outs, "lora")
    assert two["recovery"]["lora_merged"] == 2 * 3
    steps = tmp_path / "rep2.train" / "checkpoints"  # the resumable ones, also from both processes
    assert sorted(p.name for p in steps.iterdir() if p.name.isdigit()) == ["2", "3"]
    assert (steps / "3" / "state" / "ocdbt.process_1").is_dir()


def _port_of(proc) -> int:
    return int(proc.args[proc.args.index("--coordinator") + 1].rpartition(":")[2])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_with_one_line(tiny_folder, tmp_path, victim):
    """Either process killed mid-training: the other prints one line and exits within about
    `HEARTBEAT_SECONDS`. Process 0 killed: the coordination service (a process of its own,
    `multihost._detached_service`) outlives it, so the survivor's watchdog, not JAX's fatal
    abort, ends it; the service then ends too, freeing the port."""
    survivor = 1 - victim
    recipe = _setup(tmp_path, DISTILL.replace("steps = 3", "steps = 10000"))
    argv = ["train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder, "--no-progress",
            "--out", "out2", *TWO]
    with mh.launched(tmp_path, mh.nnxprune(argv)) as procs:
        deadline = time.monotonic() + mh.TIMEOUT
        while "recovery  distill" not in mh.outputs(tmp_path, 0)[0]:  # both joined, working
            assert procs[0].poll() is None and procs[1].poll() is None, mh.outputs(tmp_path, 0)
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        code = procs[survivor].wait(timeout=60)
        waited = time.monotonic() - t0
        port = _port_of(procs[0])
    err = mh.outputs(tmp_path, survivor)[1]
    assert code == multihost.EXIT_PEER_LOST, err[-3000:]
    lines = mh.own_lines(err)  # XLA's own log lines (W..., E...) aside
    assert len(lines) == 1 and lines[0].startswith(
        "nnxprune train: error: another process of this --distributed run stopped "
        f"(process {victim} sent no heartbeat for "), err[-3000:]
    assert waited < 2 * multihost.HEARTBEAT_SECONDS + 10, waited
    assert not (tmp_path / "out2").exists()
    deadline = time.monotonic() + 3 * multihost.HEARTBEAT_SECONDS
    while not _port_free(port):  # the detached service is gone
        assert time.monotonic() < deadline, f"port {port} still in use"
        time.sleep(0.5)


def test_cluster_options_are_checked_before_any_work(capsys, tiny_folder, tmp_path, monkeypatch):
    recipe = _setup(tmp_path, DISTILL)
    base = ["train", tiny_folder, "--recipe", recipe, "--out", tmp_path / "never"]
    for k in multihost.ENV.values():
        monkeypatch.delenv(k, raising=False)
    for extra, needle in (
            (["--coordinator", "127.0.0.1:1"], "only apply with --distributed"),
            (["--distributed", "--coordinator", "127.0.0.1"], "expected HOST:PORT"),
            (["--distributed", "--coordinator", "127.0.0.1:70000"], "out of range"),
            (["--distributed", "--coordinator", "h:x"], "port: expected an integer"),
            (["--distributed", "--num-processes", "0"], "--num-processes must be at least 1"),
            (["--distributed", "--num-processes", "2", "--process-id", "2"], "not below"),
            (["--distributed", "--process-id", "-1"], "--process-id must be at least 0")):
        code, _, err = run(capsys, *base, *extra)
        assert_user_error(code, err, needle)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    code, _, err = run(capsys, *base, "--distributed")
    assert_user_error(code, err, "$JAX_NUM_PROCESSES: expected an integer")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    code, _, err = run(capsys, "prune", recipe, "--model", tiny_folder, "--distributed")
    assert_user_error(code, err, "--process-id 5 is not below --num-processes 2")
    assert not (tmp_path / "never").exists()


def test_a_coordinator_port_in_use_is_one_line(tiny_folder, tmp_path):
    """Process 0 serves the coordination service on --coordinator's port: a port already taken
    is reported on one line (exit 2) before any work, nothing written."""
    recipe = _setup(tmp_path, DISTILL)
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "nnxprune.cli", "train", str(tiny_folder), "--recipe", str(recipe),
             "--out", "out2", "--distributed", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", "0"],
            cwd=tmp_path, env=mh.environment(), capture_output=True, text=True, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, f"cannot serve on port {port}", "in use")
    assert not (tmp_path / "out2").exists()
