"""Ownership by content (issue 27): an output is nnxprune's only when its whole tree is what
nnxprune recorded; training-log folders follow the same rules; outputs are checked again at write
time; links are never written through; signals stop a run at a safe point.

Each data-loss case of the issue's probe suite is here, and the user's files must survive byte
for byte: a user folder with its own `nnxprune.json`, a copied checkpoint with notes added, a file
added two levels down, a same-size edit of an exported `config.json`, a user `--train-dir`, a file
created at an output path while the run worked, a dangling link at an output path.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_cli
from conftest import randomize_params
from flax import nnx
from test_cli import assert_user_error, run

from nnxprune.errors import UserError
from nnxprune.io import atomic, ownership
from nnxprune.io.checkpoint import save_checkpoint
from nnxprune.io.hf import export_hf
from nnxprune.models.llama import Llama, LlamaConfig

tiny_folder = test_cli.tiny_folder  # the CLI tests' tiny model + tokenizer (context 64)

CFG = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=32, head_dim=4)
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building. It was the "
        "tallest man-made structure in the world for 41 years.\n") * 60
DISTILL = """
[recovery]
kind = "distill"
dataset = "DATA"
steps = STEPS
batch_size = 2
seqlen = 16
warmup_steps = 0
eval_every = 0
eval_batches = 0
checkpoint_every = 1
"""


pytestmark = pytest.mark.usefixtures("private_registry")  # conftest.py


def tiny(seed=0):
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=seed)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def distill_recipe(tmp_path, steps=2) -> Path:
    (tmp_path / "train.txt").write_text(TEXT)
    path = tmp_path / "r.toml"
    path.write_text(DISTILL.replace("DATA", str(tmp_path / "train.txt")).replace("STEPS", str(steps)))
    return path


# -- whose folder ----------------------------------------------------------------------------------
def test_a_user_folder_with_its_own_nnxprune_json_survives_export(capsys, tiny_folder, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "nnxprune.json").write_text('{"my": "settings"}')
    (project / "src" / "main.py").write_text("print('hi')\n")
    (project / "thesis.tex").write_text("\\documentclass{article}\n")
    before = snapshot(project)
    for flag in ("--checkpoint", "--hf"):
        code, _, err = run(capsys, "export", tiny_folder, flag, project)
        assert_user_error(code, err, "not a folder nnxprune wrote", "--overwrite")
    assert snapshot(project) == before


def test_a_copied_checkpoint_with_notes_is_the_users(tmp_path):
    ckpt = save_checkpoint(tiny(), tmp_path / "ckpt")
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / "NOTES.md").write_text("my notes")
    before = snapshot(copy)
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):
        save_checkpoint(tiny(1), copy)
    assert snapshot(copy) == before
    assert atomic.is_own(ckpt) and not atomic.is_own(copy)


def test_a_file_two_levels_down_is_seen(tmp_path):
    ckpt = save_checkpoint(tiny(), tmp_path / "ckpt")
    deep = next(p for p in (ckpt / "state").rglob("*") if p.is_dir())
    (deep / "mine.txt").write_text("user data")
    before = snapshot(ckpt)
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):
        save_checkpoint(tiny(1), ckpt)
    assert snapshot(ckpt) == before
    (deep / "mine.txt").unlink()
    assert atomic.is_own(ckpt)  # the recorded tree again


def test_a_same_size_edit_of_config_json_is_seen(tmp_path):
    out = export_hf(tiny(), tmp_path / "hf")
    config = out / "config.json"
    text = config.read_text()
    stat = config.stat()
    edited = text.replace('"silu"', '"gelu"')
    assert len(edited) == len(text) and edited != text
    config.write_text(edited)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the time put back
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):
        export_hf(tiny(1), out)
    assert config.read_text() == edited


def test_fingerprint_covers_the_tree(tmp_path):
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "w.bin").write_bytes(b"x" * (ownership.HASHED_BYTES + 10))
    first = ownership.fingerprint(root)
    (root / "a" / "b" / "empty").mkdir()
    second = ownership.fingerprint(root)
    assert second != first
    big = root / "a" / "b" / "w.bin"
    data = bytearray(big.read_bytes())
    data[5] ^= 1
    big.write_bytes(bytes(data))  # a big file: its modification time changes with the write
    assert ownership.fingerprint(root) != second


# -- training logs ---------------------------------------------------------------------------------
def test_a_user_train_dir_survives(capsys, tiny_folder, tmp_path):
    recipe = distill_recipe(tmp_path)
    user = tmp_path / "runs"
    user.mkdir()
    (user / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (user / "loss.png").write_bytes(b"my plot")
    before = snapshot(user)
    code, out, err = run(capsys, "train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder,
                         "--json", tmp_path / "rep.json", "--train-dir", user, "--no-progress")
    assert_user_error(code, err, "not a training-log folder nnxprune wrote", "--overwrite")
    assert "model " not in out  # refused before loading
    # the default REPORT.train/ too
    default = tmp_path / "rep.train"
    shutil.copytree(user, default)
    code, _, err = run(capsys, "train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder,
                       "--json", tmp_path / "rep.json", "--no-progress")
    assert_user_error(code, err, "rep.train", "not a training-log folder nnxprune wrote")
    assert snapshot(user) == before and snapshot(default) == before
    assert not (tmp_path / "rep.json").exists()


def test_an_own_train_dir_resumes_and_overwrite_replaces_a_user_one(capsys, tiny_folder, tmp_path):
    recipe = distill_recipe(tmp_path)
    logs = tmp_path / "logs"
    args = ("train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder, "--train-dir", logs,
            "--no-progress")
    code, _, err = run(capsys, *args, "--json", tmp_path / "a.json")
    assert code == 0, err
    assert atomic.is_own(logs) and (logs / "checkpoints").is_dir()
    code, out, err = run(capsys, *args, "--json", tmp_path / "b.json")  # recorded: it resumes
    assert code == 0 and "resume    from step 2" in out, err
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    code, _, err = run(capsys, *args[:-3], "--train-dir", user, "--no-progress", "--json",
                       tmp_path / "c.json", "--overwrite")
    assert code == 0, err
    assert not (user / "keep.txt").exists() and (user / "metrics.jsonl").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder holds nothing to lose: accepted as it is
    code, _, err = run(capsys, *args[:-3], "--train-dir", empty, "--no-progress", "--json",
                       tmp_path / "d.json")
    assert code == 0, err


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_a_train_dir_that_collides_with_an_output_is_refused_before_loading(
        capsys, tiny_folder, tmp_path, no_loading, where):
    recipe = distill_recipe(tmp_path)
    out = tmp_path / "ckpt"
    train_dir = {"same": out, "inside": out / "logs", "around": tmp_path}[where]
    code, out_text, err = run(capsys, "train", tiny_folder, "--recipe", recipe, "--teacher",
                              tiny_folder, "--out", out, "--train-dir", train_dir, "--no-progress")
    assert_user_error(code, err, "would share files", "--train-dir")
    assert not out.exists()


# -- checked again when written --------------------------------------------------------------------
def test_a_file_created_during_the_run_is_not_replaced(capsys, tiny_folder, tmp_path, monkeypatch):
    from nnxprune import cli
    from nnxprune.evaluate import perplexity

    report = tmp_path / "rep.json"
    real = perplexity.evaluate_perplexity

    def and_meanwhile(*args, **kwargs):  # the user writes the file while nnxprune evaluates
        report.write_text("written by the user meanwhile")
        return real(*args, **kwargs)

    monkeypatch.setattr(perplexity, "evaluate_perplexity", and_meanwhile)
    monkeypatch.setattr(cli, "evaluate_perplexity", and_meanwhile, raising=False)
    code, _, err = run(capsys, "eval", tiny_folder, "--seqlen", 32, "--max-windows", 1,
                       "--json", report, "--no-progress",
                       "--data-dir", os.environ.get("NNXPRUNE_DATA_DIR", tmp_path))
    if "not found" in err or "no data" in err.lower():
        pytest.skip("no data folder")
    assert_user_error(code, err, "appeared or changed while nnxprune ran")
    assert report.read_text() == "written by the user meanwhile"


def test_links_are_never_written_through_or_replaced(tmp_path):
    target = tmp_path / "elsewhere.json"
    dangling = tmp_path / "rep.json"
    dangling.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="symbolic link"):
            atomic.check_outputs(files=[dangling], overwrite=overwrite)
    with pytest.raises(UserError, match="symbolic link"):
        atomic.write_json(dangling, {"a": 1})
    assert dangling.is_symlink() and not target.exists()
    real = tmp_path / "real"
    real.mkdir()
    (real / "x").write_text("mine")
    link = tmp_path / "ckpt"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        save_checkpoint(tiny(), link, overwrite=True)
    assert link.is_symlink() and snapshot(real) == {"x": b"mine"}


def test_a_link_made_during_the_run_is_refused_at_write_time(tmp_path):
    out = tmp_path / "rep.md"
    with atomic.run_outputs():
        atomic.check_outputs(files=[out])
        out.symlink_to(tmp_path / "target")
        with pytest.raises(UserError, match="symbolic link"):
            atomic.write_text(out, "x")
    assert out.is_symlink() and not (tmp_path / "target").exists()


# -- signals ---------------------------------------------------------------------------------------
_TRAIN_AND_SIGNAL = textwrap.dedent("""
    import os, signal, sys, threading
    from nnxprune import cli
    from nnxprune.recovery import trainer

    real = trainer._place
    calls = []

    def place(*a, **k):  # the signal arrives while a step runs
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.{sig})
        return real(*a, **k)

    trainer._place = place
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", ["SIGTERM"])  # SIGINT and SIGHUP: the save tests in test_reliability
def test_a_signal_stops_training_at_a_step_and_the_rerun_resumes(tiny_folder, tmp_path, sig):
    recipe = distill_recipe(tmp_path, steps=4)
    out, logs = tmp_path / "ckpt", tmp_path / "logs"
    args = ["train", str(tiny_folder), "--recipe", str(recipe), "--teacher", str(tiny_folder),
            "--out", str(out), "--train-dir", str(logs), "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _TRAIN_AND_SIGNAL.format(sig=sig), *args],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).parents[1])
    code = 128 + getattr(signal, sig)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert f"interrupted by {sig}" in proc.stderr
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.rglob("*") if "tmp" in p.name and p.name != "train.txt"]
    assert leftovers == []
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    # the step that was running finished, was checkpointed, and the run stopped there
    assert 1 <= len(steps) < 4 and steps == list(range(1, len(steps) + 1))
    rerun = subprocess.run([sys.executable, "-m", "nnxprune.cli", *args], capture_output=True,
                           text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resume    from step {len(steps)}" in rerun.stdout and (out / "nnxprune.json").is_file()
