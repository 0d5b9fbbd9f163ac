"""Every command's inputs and outputs as a hostile user would give them: one line on stderr, exit
status 2, before any loading, evaluation, calibration or training, and nothing of the user's lost.

The tiny model is the CLI tests' (random weights, a real BPE tokenizer, context 64). Where a check
must come before the model loads, `load_model` is replaced by a function that fails the test.
"""

import json
import os

import pytest
import test_cli
from flax import nnx
from test_cli import assert_user_error, run

from nnxprune.io.checkpoint import read_meta
from nnxprune.io.load import peek_config
from nnxprune.measure import count_params
from nnxprune.models.llama import Llama
from nnxprune.recipes import load_recipe
from nnxprune.recovery import run as recovery_run

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests

DROP = '[[prune]]\nkind = "drop_layers"\nlayers = [1]\n'


pytestmark = pytest.mark.usefixtures("private_registry")  # conftest.py



def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- data loss -------------------------------------------------------------------------------------
def test_export_and_prune_into_the_current_folder_are_refused(capsys, tiny_folder, tmp_path,
                                                              monkeypatch, no_loading):
    project = tmp_path / "project"
    project.mkdir()
    recipe = write(project, "recipe.toml", DROP)
    (project / "notes.txt").write_text("mine")
    before = snapshot(project)
    monkeypatch.chdir(project)
    for argv in (["export", tiny_folder, "."], ["export", tiny_folder, "--checkpoint", "..", "--overwrite"],
                 ["prune", recipe, "--model", tiny_folder, "--out", "."]):
        assert_user_error(*run(capsys, *argv)[::2], "current folder")
    assert snapshot(project) == before


def test_a_user_folder_as_output_survives_byte_for_byte(capsys, tiny_folder, tmp_path, no_loading):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (user / "model.safetensors").write_bytes(os.urandom(64))
    recipe = write(tmp_path, "r.toml", DROP)
    before = snapshot(user)
    for argv in (["export", tiny_folder, user], ["export", tiny_folder, "--checkpoint", user],
                 ["prune", recipe, "--model", tiny_folder, "--out", user],
                 ["export", tiny_folder, user / "sub" / "data.csv", "--format", "checkpoint"]):
        assert_user_error(*run(capsys, *argv)[::2], "not", "nnxprune wrote", "--overwrite")
    assert snapshot(user) == before


def test_own_export_is_replaced_and_overwrite_replaces_a_user_folder(capsys, tiny_folder, tmp_path):
    out = tmp_path / "hf"
    for _ in range(2):  # the second run replaces nnxprune's own output
        code, stdout, err = run(capsys, "export", tiny_folder, out)
        assert code == 0, err
    user = tmp_path / "user"
    user.mkdir()
    (user / "x").write_text("x")
    code, _, err = run(capsys, "export", tiny_folder, "--checkpoint", user, "--overwrite")
    assert code == 0, err
    assert (user / "nnxprune.json").is_file() and not (user / "x").exists()


def test_report_siblings_do_not_collide(capsys, tiny_folder, tmp_path):
    recipe = write(tmp_path, "r.toml", DROP)
    report = tmp_path / "out" / "rep.md"
    code, _, err = run(capsys, "prune", recipe, "--model", tiny_folder, "--json", report,
                       "--no-progress")
    assert code == 0, err
    assert json.loads(report.read_text())["pruned"]["params"] > 0  # the JSON, not the Markdown
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "rep.md", "rep.md.html", "rep.md.md", "rep.md.png"]
    assert (report.parent / "rep.md.md").read_text().startswith("# ")


# -- outputs checked at startup --------------------------------------------------------------------
def test_a_folder_given_as_an_output_file(capsys, tiny_folder, tmp_path, no_loading):
    recipe = write(tmp_path, "r.toml", DROP)
    folder = tmp_path / "dir"
    folder.mkdir()
    for argv in (["eval", tiny_folder, "--json", folder], ["inspect", tiny_folder, "--html", folder],
                 ["inspect", tiny_folder, "--png", folder],
                 ["lm-eval", tiny_folder, "--tasks", "x", "--json", folder],
                 ["prune", recipe, "--model", tiny_folder, "--json", folder]):
        code, out, err = run(capsys, *argv)
        assert_user_error(code, err, "is a folder")
        assert "model " not in out  # nothing loaded


def test_the_markdown_twin_of_a_report_is_checked_too(capsys, tiny_folder, tmp_path, no_loading):
    recipe = write(tmp_path, "r.toml", DROP)
    (tmp_path / "rep.md").write_text("my notes")  # the twin of rep.json: not nnxprune's
    code, _, err = run(capsys, "prune", recipe, "--model", tiny_folder, "--json", tmp_path / "rep.json")
    assert_user_error(code, err, "rep.md", "not a file nnxprune wrote")
    assert (tmp_path / "rep.md").read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output(capsys, tiny_folder, tmp_path, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "eval", tiny_folder, "--json", locked / "r.json")
    assert_user_error(code, err, "not writable")


# -- recipes: every error before the weights load --------------------------------------------------
@pytest.mark.parametrize("body, needle", [
    ('[[prune]]\nkind = "magnitude"\nsparsity = 1.5\n', "sparsity"),
    ('[[prune]]\nkind = "magnitude"\npattern = "4:4"\n', "4:4"),
    ('[[prune]]\nkind = "shrink_mlp"\nfraction = 0.5\nscore = "nope"\n', "nope"),
    ('[[prune]]\nkind = "sparsegpt"\nsparsity = 0.5\n', "calibration"),
    ('[[prune]]\nkind = "wanda"\nsparsity = 0.5\nbatch_size = 0\n[calibration]\nnsamples = 2\n'
     'seqlen = 16\n', "batch_size must be a positive integer"),
    ('[[prune]]\nkind = "wanda"\nsparsity = 0.5\n[calibration]\nnsamples = 2\nseqlen = 4096\n',
     "calibration.seqlen 4096 is beyond the model's context of 64"),
    ('[[prune]]\nkind = "remove_query_heads"\nper_kv_group = -1\n', "per_kv_group must be a positive"),
    ('[[prune]]\nkind = "drop_layers"\nlayers = [7]\n', "layer"),
    ("", "no [[prune]] steps"),
    ('[[prune]]\nkind = "drop_layers"\nlayers = []\n', "nothing would be pruned"),
    ('[[prune]]\nkind = "magnitude"\nsparsity = 0.0\n', "nothing would be pruned"),
    ('[[prune]]\nkind = "shrink_hidden"\ncount = 8\n[recovery]\nkind = "distill"\ndataset = "x.txt"\n'
     'seqlen = 16\n[recovery.distill]\nhidden_layers = [0]\nhidden_weight = 1.0\n', "equal hidden sizes"),
])
def test_recipe_errors_come_before_loading(capsys, tiny_folder, tmp_path, no_loading, body, needle):
    (tmp_path / "x.txt").write_text("some text " * 50)
    recipe = write(tmp_path, "r.toml", body.replace("x.txt", str(tmp_path / "x.txt")))
    code, _, err = run(capsys, "prune", recipe, "--model", tiny_folder, "--out", tmp_path / "ckpt")
    assert_user_error(code, err, needle)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("make, extra, needle", [
    (lambda t: write(t, "r.toml", b"[recipe]\nname = '\xff\xfe'\n"), [], "not UTF-8"),
    (lambda t: t, [], "is a folder"),
    (lambda t: write(t, "r.toml", DROP + '[recipe]\nname = "x"\n'), ["--set", "recipe.name.x=1"],
     "recipe.name is a value"),
    (lambda t: write(t, "r.toml", DROP), ["--set", "prune.0.layers.x=1"], "'x' is not an index"),
    (lambda t: write(t, "r.toml", DROP), ["--set", "prune.0=1"], "whole list entry"),
])
def test_recipe_files_that_are_not_recipes(capsys, tiny_folder, tmp_path, no_loading, make, extra,
                                           needle):
    code, _, err = run(capsys, "prune", make(tmp_path), "--model", tiny_folder, "--out",
                       tmp_path / "ckpt", *extra)
    assert_user_error(code, err, needle)


def test_prune_check_is_a_dry_run(capsys, tiny_folder, tmp_path, no_loading):
    recipe = write(tmp_path, "r.toml", DROP + '[[prune]]\nkind = "shrink_mlp"\ncount = 16\n')
    code, out, err = run(capsys, "prune", recipe, "--model", tiny_folder, "--check")
    assert code == 0, err
    assert "layers 2 -> 1" in out and "valid" in out
    assert "    0      4   2  48" in out  # layer 0 keeps 4 heads, 2 KV heads, 64 - 16 MLP channels
    config = peek_config(tiny_folder)
    predicted = load_recipe(recipe).check(config)
    dense, pruned = (count_params(Llama(c, rngs=nnx.Rngs(0))) for c in (config, predicted))
    assert f"params    {dense:,} -> {pruned:,}" in out, out
    assert list(tmp_path.iterdir()) == [recipe]
    code, _, err = run(capsys, "prune", write(tmp_path, "b.toml", '[[prune]]\nkind = "magnitude"\n'
                                              'pattern = "2:3"\n'), "--model", tiny_folder, "--check")
    assert_user_error(code, err, "not a multiple of M=3")


# -- training ---------------------------------------------------------------------------------------
TRAIN = """
[recovery]
kind = "distill"
dataset = "DATA"
steps = 2
batch_size = 2
seqlen = 16
warmup_steps = 0
eval_every = 0
eval_batches = 0
[eval]
dataset = "wikitext2"
seqlen = 32
max_windows = 1
"""


def test_train_teacher_mismatch_and_unreadable_data_before_the_first_evaluation(
        capsys, tiny_folder, tmp_path, monkeypatch):
    from nnxprune.io.hf import export_hf
    from nnxprune.models.llama import LlamaConfig

    def no_eval(*a, **k):
        raise AssertionError("evaluated before the check")

    monkeypatch.setattr(recovery_run, "evaluate_perplexity", no_eval)
    other = LlamaConfig.uniform(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                                num_kv_heads=2, intermediate_size=64, head_dim=8)
    teacher = export_hf(Llama(other, rngs=nnx.Rngs(0)), tmp_path / "teacher")
    (tmp_path / "train.txt").write_text("The tower is 324 metres tall. " * 100)
    recipe = write(tmp_path, "r.toml", TRAIN.replace("DATA", str(tmp_path / "train.txt")))
    data = ["--data-dir", os.environ.get("NNXPRUNE_DATA_DIR", tmp_path)]
    code, out, err = run(capsys, "train", tiny_folder, "--recipe", recipe, "--teacher", teacher,
                         "--json", tmp_path / "r.json", *data)
    assert_user_error(code, err, "vocabulary (100) differs")
    assert "model " not in out
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    recipe = write(tmp_path, "r.toml", TRAIN.replace("DATA", str(tmp_path / "bad.parquet")))
    code, out, err = run(capsys, "train", tiny_folder, "--recipe", recipe, "--teacher", tiny_folder,
                         "--json", tmp_path / "r.json", *data)
    assert code == 2 and "before" not in out, err  # refused before the "before" evaluation


def test_checkpoint_records_its_source_so_train_finds_the_teacher_from_elsewhere(
        capsys, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    recipe = write(tmp_path, "r.toml", DROP)
    code, _, err = run(capsys, "prune", recipe, "--model", tiny_folder.name, "--out",
                       tmp_path / "ckpt", "--no-progress")  # a relative MODEL path
    assert code == 0, err
    recorded = read_meta(tmp_path / "ckpt")["provenance"]["source_model"]
    assert recorded == str(tiny_folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert recovery_run.recorded_source(tmp_path / "ckpt") == str(tiny_folder.resolve())
    # an older checkpoint with only a relative "source" resolves beside the checkpoint
    monkeypatch.chdir(tiny_folder.parent)
    assert recovery_run.source_model("ckpt", tmp_path / "ckpt2") == str(tmp_path / "ckpt")
    assert recovery_run.source_model("nowhere", tmp_path / "ckpt2") == "nowhere"
    assert recovery_run.source_model("card smollm2-135m: /x/y.gguf") == "smollm2-135m"
