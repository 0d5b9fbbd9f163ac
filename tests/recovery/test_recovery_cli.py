"""`nnxprune train CKPT --recipe R` and `nnxprune prune` with a `[recovery]` section, end to end on a
tiny model with a real tokenizer and a local text file; bad input fails with one line, nothing
written."""

import json

import numpy as np
import test_cli
from test_cli import assert_user_error, run

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building. It was the "
        "tallest man-made structure in the world for 41 years.\n") * 60


def recipe(tmp_path, body: str):
    (tmp_path / "train.txt").write_text(TEXT)
    path = tmp_path / "r.toml"
    path.write_text(body.replace("DATA", str(tmp_path / "train.txt")))
    return path


DISTILL = """
[recovery]
kind = "distill"
dataset = "DATA"
steps = 3
batch_size = 2
seqlen = 16
warmup_steps = 1
eval_every = 0
eval_batches = 0
"""

PRUNE = """
[[prune]]
kind = "magnitude"
pattern = "2:4"

[recovery]
kind = "lora"
dataset = "DATA"
steps = 2
batch_size = 2
seqlen = 16
warmup_steps = 0
eval_every = 0
eval_batches = 0
[recovery.lora]
targets = '.*mlp.*'
rank = 2
"""


def assert_peak_rss(rep, report):
    """The process's peak RSS in GB (`VmHWM`), in the JSON and the Markdown report. It is checked
    against `ru_maxrss` read afterwards, within 1%: the kernel keeps the two high-water marks from
    RSS counters synced at different times (a run here reported 0.8721 GB against 0.8718)."""
    import resource

    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    assert 0.05 < rep["peak_rss_gb"] <= peak_after * 1.01
    assert "device_peak_gb" in rep  # None on CPU
    assert f"{rep['peak_rss_gb']:.2f} GB" in report.with_suffix(".md").read_text()


def test_train_command(capsys, tiny_folder, tmp_path):
    out, report = tmp_path / "ckpt", tmp_path / "rep.json"
    code, stdout, err = run(capsys, "train", tiny_folder, "--recipe", recipe(tmp_path, DISTILL),
                            "--teacher", tiny_folder, "--out", out, "--json", report,
                            "--no-progress")
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["recovery"]["steps"] == 3 and len(rep["recovery"]["losses"]) == 3
    assert rep["recovery"]["strategy"]["strategy"] == "Distillation"
    assert rep["teacher"] == str(tiny_folder)
    assert_peak_rss(rep, report)
    assert (out / "nnxprune.json").is_file() and report.with_suffix(".md").is_file()
    log = tmp_path / "rep.train"
    assert (log / "metrics.jsonl").is_file() and (log / "loss.png").is_file()
    assert "recovery  distill" in stdout


def test_prune_then_recover_keeps_the_sparsity(capsys, tiny_folder, tmp_path):
    from nnxprune.io.load import load_model
    from nnxprune.measure import measured_sparsity

    out, report = tmp_path / "ckpt", tmp_path / "rep.json"
    code, _, err = run(capsys, "prune", recipe(tmp_path, PRUNE), "--model", tiny_folder, "--out",
                       out, "--json", report, "--no-progress", "--no-views")
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["recovery"]["lora_merged"] == 2 * 3 and rep["recovery"]["steps"] == 2
    assert rep["recovered"]["sparsity"] == rep["pruned"]["sparsity"]
    assert_peak_rss(rep, report)
    assert rep["peak_memory_bytes"] / 1e9 <= rep["peak_rss_gb"]  # the pipeline's part of it
    model = load_model(out, with_tokenizer=False).model
    assert np.isclose(measured_sparsity(model)["overall"], 0.5)  # 2:4 held through LoRA + merge


def test_bad_input(capsys, tiny_folder, tmp_path):
    out = tmp_path / "never"
    path = recipe(tmp_path, "[recipe]\nname = 'x'\n")
    code, _, err = run(capsys, "train", tiny_folder, "--recipe", path, "--out", out)
    assert_user_error(code, err, "no [recovery] section")
    bad = PRUNE.replace("'.*mlp.*'", "'.*mlp_proj'")
    code, _, err = run(capsys, "prune", recipe(tmp_path, bad), "--model", tiny_folder, "--out", out)
    assert_user_error(code, err, "matches no projection")
    code, _, err = run(capsys, "train", tiny_folder, "--recipe", recipe(tmp_path, DISTILL), "--out",
                       out, "--set", "recovery.mesh.data=3", "--teacher", tiny_folder)
    assert_user_error(code, err, "needs 3 devices but 1 are available")
    code, _, err = run(capsys, "train", tiny_folder, "--recipe", recipe(tmp_path, DISTILL), "--out",
                       out, "--set", "recovery.seqlen=128", "--teacher", tiny_folder)
    assert_user_error(code, err, "beyond the model's context")
    code, _, err = run(capsys, "train", tiny_folder, "--recipe", recipe(tmp_path, DISTILL), "--out",
                       out)  # an HF folder records no source model to distil from
    assert_user_error(code, err, "needs a teacher")
    assert not out.exists()
