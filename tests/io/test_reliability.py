"""Outputs never destroy a user's files and never half-exist; damaged inputs are diagnosed.

`nnxprune.io.atomic` refuses to replace what nnxprune did not write (and the current folder, its
parents, home and root), cleans its temporaries on SIGTERM and at the next run, and creates outputs
with the user's umask. Damaged checkpoints, Hugging Face folders and GGUF files each give one
UserError naming the file and what was expected.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io import atomic
from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint
from nnxprune.io.hf import export_hf, load_hf_folder
from nnxprune.io.load import load_model, peek_config
from nnxprune.models.llama import Llama, LlamaConfig

CFG = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=32, head_dim=4)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    """A private registry of written outputs per test."""
    monkeypatch.setenv("NNXPRUNE_STATE_DIR", str(tmp_path / "state-registry"))


def tiny(seed=0):
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=seed)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "state-registry")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- never over a user's files ---------------------------------------------------------------------
def test_user_folder_survives_byte_for_byte(tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "recipe.toml").write_text("[recipe]\nname = 'mine'\n")
    (user / "notes").mkdir()
    (user / "notes" / "a.bin").write_bytes(os.urandom(100))
    before = snapshot(user)
    for write in (lambda: export_hf(tiny(), user), lambda: save_checkpoint(tiny(), user)):
        with pytest.raises(UserError, match="not a folder nnxprune wrote.*--overwrite"):
            write()
    assert snapshot(user) == before
    assert names(tmp_path) == ["project"]  # no temporary left


def test_own_outputs_are_replaced_and_overwrite_is_explicit(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny(0), out)
    save_checkpoint(tiny(1), out)  # a checkpoint (nnxprune.json): replaced without asking
    np.testing.assert_array_equal(np.asarray(load_checkpoint(out).embed_tokens.embedding[...]),
                                  np.asarray(tiny(1).embed_tokens.embedding[...]))
    report = tmp_path / "rep.json"
    atomic.write_json(report, {"a": 1})
    atomic.check_outputs(files=[report])
    atomic.write_json(report, {"a": 2}, overwrite=False)  # recorded and unchanged: replaced
    report.write_text('{"a": 2, "my": "edit"}')
    with pytest.raises(UserError, match="not a file nnxprune wrote"):
        atomic.check_outputs(files=[report])
    with pytest.raises(UserError, match="not a file nnxprune wrote"):
        atomic.write_json(report, {"a": 3}, overwrite=False)
    assert json.loads(report.read_text())["my"] == "edit"
    atomic.write_json(report, {"a": 3})  # a library call replaces
    assert json.loads(report.read_text()) == {"a": 3}


def test_file_where_a_folder_goes_and_folder_where_a_file_goes(tmp_path):
    user_file = tmp_path / "data.bin"
    user_file.write_bytes(b"precious")
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):
        save_checkpoint(tiny(), user_file)
    assert user_file.read_bytes() == b"precious"
    with pytest.raises(UserError, match="is a folder"):
        atomic.check_outputs(files=[tmp_path])
    with pytest.raises(UserError, match="is a folder"):
        atomic.write_text(tmp_path, "x")


@pytest.mark.parametrize("where", [".", "..", "home", "/"])
def test_protected_folders_refused_even_with_overwrite(tmp_path, monkeypatch, where):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"home": str(tmp_path / "home")}.get(where, where)
    with pytest.raises(UserError, match="current folder, a parent of it, the home folder"):
        atomic.check_outputs(folders=[target], overwrite=True)
    with pytest.raises(UserError, match="current folder"):
        export_hf(tiny(), target, overwrite=True)
    assert list(work.iterdir()) == []


def test_report_siblings_never_collide(tmp_path):
    assert atomic.sibling(tmp_path / "rep.json", ".md") == tmp_path / "rep.md"
    for name in ("rep.md", "rep.html", "rep.png", "rep"):
        for suffix in (".md", ".html", ".png", ".train"):
            assert atomic.sibling(tmp_path / name, suffix) != tmp_path / name
    with pytest.raises(UserError, match="two outputs share the path"):
        atomic.check_outputs(folders=[tmp_path / "x.md"], files=[tmp_path / "x.md"])


def test_umask_is_respected(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tiny(), tmp_path / "ckpt")
        report = atomic.write_text(tmp_path / "r.md", "x")
        assert out.stat().st_mode & 0o777 == 0o755
        assert report.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        report = atomic.write_text(tmp_path / "r.md", "y")
        assert report.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- interrupts ------------------------------------------------------------------------------------
_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    # as a fresh shell would start it: a run under nohup inherits SIGHUP ignored, and nnxprune
    # leaves a non-default disposition alone (interrupt.handled)
    signal.signal(signal.{sig}, signal.SIG_DFL)
    sys.path.insert(0, {tests!r})
    from conftest import randomize_params
    from flax import nnx
    from nnxprune.io.checkpoint import save_checkpoint
    from nnxprune.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=32, head_dim=4)

    class Killer:  # the tokenizer is saved inside the temporary folder, after the Orbax state
        def save_pretrained(self, folder):
            open(os.path.join(folder, "tokenizer.json"), "w").write("{{}}")
            os.kill(os.getpid(), signal.{sig})
            time.sleep(0.2)  # the handler runs in the main thread; the save goes on to its end

    save_checkpoint(randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), seed=1), {out!r},
                    tokenizer=Killer())
""")


def _save_and_kill(out: Path, sig: str = "SIGTERM") -> subprocess.CompletedProcess:
    script = _KILL_DURING_SAVE.format(tests=str(Path(__file__).parents[1]), out=str(out), sig=sig)
    env = {**os.environ, "PYTHONPATH": str(Path(atomic.__file__).parents[2]), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_during_save_leaves_no_half_checkpoint_and_no_temporary(tmp_path, sig):
    """The signal only sets a flag (`nnxprune.interrupt`): the save stops at its safe point, before
    the rename, quietly (no traceback, no "Exception ignored"), with status 128 + the signal."""
    out = tmp_path / "ckpt"
    previous = tiny(0)
    save_checkpoint(previous, out)
    proc = _save_and_kill(out, sig)
    stderr = proc.stderr.decode()
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert names(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(np.asarray(load_checkpoint(out).embed_tokens.embedding[...]),
                                  np.asarray(previous.embed_tokens.embedding[...]))  # intact


def test_stale_temporaries_of_a_killed_run_are_removed_next_time(tmp_path):
    out = tmp_path / "ckpt"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: what a SIGKILLed save leaves in the name
    prefix = atomic._tmp_prefix(out).replace(f"~{os.getpid()}-", f"~{dead.pid}-")
    stale = tmp_path / (prefix + "abcd1234")
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "big").write_bytes(b"x" * 1000)
    alive = tmp_path / atomic._tmp_prefix(out).replace(f"~{os.getpid()}-", "~1-")  # pid 1 lives
    alive.mkdir()
    other = tmp_path / ".ckpt.nnxprune-tmp-notapid"  # not ours by name: left alone
    other.mkdir()
    save_checkpoint(tiny(), out)
    assert names(tmp_path) == sorted([alive.name, other.name, "ckpt"])


# -- damaged checkpoints ---------------------------------------------------------------------------
def _data_file(ckpt: Path) -> Path:
    return max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, needle", [
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated"),
    (lambda f: f.write_bytes(b""), r"truncated \(0 bytes"),
    (_flip, "checksum differs"),
    (lambda f: f.unlink(), "is missing"),
])
def test_damaged_orbax_data_file_is_named(tmp_path, damage, needle):
    out = save_checkpoint(tiny(), tmp_path / "ckpt")
    data = _data_file(out)
    damage(data)
    with pytest.raises(UserError, match=needle) as e:
        load_checkpoint(out)
    assert str(data) in str(e.value)


def _edit(path: Path, edit) -> None:
    meta = json.loads((path / "nnxprune.json").read_text())
    edit(meta["config"])
    (path / "nnxprune.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["layers"][0].update(num_heads=3), r"layers\[0\]: num_heads \(3\) is not a multiple"),
    (lambda c: c["layers"][1].update(num_heads=8), "does not match the shapes"),
    (lambda c: c.update(hidden_size=[16]), r"hidden_size must be an integer >= 1, got \[16\]"),
    (lambda c: c["layers"][0].update(num_kv_heads=0), "num_kv_heads must be an integer >= 1"),
    (lambda c: c.update(layers=5), "'layers' list"),
    (lambda c: c["layers"].__setitem__(0, 7), r"layers\[0\] must be an object"),
    (lambda c: c.pop("vocab_size"), "vocab_size"),
])
def test_edited_nnxprune_json_is_named(tmp_path, edit, needle):
    out = save_checkpoint(tiny(), tmp_path / "ckpt")
    _edit(out, edit)
    with pytest.raises(UserError, match=needle) as e:
        load_checkpoint(out)
    assert "nnxprune.json" in str(e.value) or "does not match" in str(e.value)


# -- damaged Hugging Face folders and GGUF files ---------------------------------------------------
def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be an integer >= 1, got 0"),
    (lambda c: c.update(hidden_size="16"), "hidden_size must be an integer >= 1, got '16'"),
    (lambda c: c.update(num_key_value_heads=3), r"num_heads \(4\) is not a multiple of num_kv_heads \(3\)"),
    (lambda c: c.pop("intermediate_size"), "missing key 'intermediate_size'"),
    (lambda c: c.update(head_dim=None, num_attention_heads=5), "not a multiple"),
])
def test_malformed_hf_config_is_named_with_its_file(tmp_path, edit, needle):
    folder = export_hf(tiny(), tmp_path / "hf")
    _edit_config(folder, edit)
    for load in (load_hf_folder, lambda f: load_model(f, with_tokenizer=False), peek_config):
        with pytest.raises(UserError, match=needle) as e:
            load(folder)
        assert str(folder / "config.json") in str(e.value)


def test_config_json_that_is_not_json(tmp_path):
    folder = export_hf(tiny(), tmp_path / "hf")
    (folder / "config.json").write_bytes(b"\xff{")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_hf_folder(folder)


def test_truncated_safetensors_is_named(tmp_path):
    folder = export_hf(tiny(), tmp_path / "hf")
    weights = folder / "model.safetensors"
    for size in (weights.stat().st_size - 100, 20, 0):
        weights.write_bytes(weights.read_bytes()[:size])
        with pytest.raises(UserError, match="damaged or truncated") as e:
            load_hf_folder(folder)
        assert str(weights) in str(e.value)


def test_truncated_gguf_says_truncated(tmp_path):
    from test_gguf import _hf_tensors, _write

    from nnxprune.io.gguf import read_gguf

    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match=r"is truncated: .*bytes"):
        read_gguf(path)
    path.write_bytes(data[:200])  # inside the header
    with pytest.raises(UserError, match="damaged or truncated header|truncated"):
        read_gguf(path)


def test_files_added_to_an_own_checkpoint_are_protected(tmp_path):
    out = save_checkpoint(tiny(), tmp_path / "ckpt")
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a folder nnxprune wrote"):
        save_checkpoint(tiny(1), out)
    assert (out / "my-notes.txt").read_text() == "keep me"
    (out / "my-notes.txt").unlink()
    save_checkpoint(tiny(1), out)  # unchanged again: its own output
