"""Malformed inputs and out-of-range options, as a hostile user gives them: each is one line on
stderr naming the file or the option, exit status 2, no traceback, and, where the check needs no
weights, before the model is loaded (`no_loading` fails the test if `load_model` runs).

Inputs are damaged copies of the CLI tests' tiny model (random weights, a real BPE tokenizer,
context 64), model cards, GGUF headers, lm-eval task YAMLs and calibration files written here.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import test_cli
from test_cli import assert_user_error, run

from nnxprune.errors import UserError

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests

DROP = '[[prune]]\nkind = "drop_layers"\nlayers = [1]\n'
TRAIN = """
[recovery]
kind = "pretrain"
dataset = "DATA"
steps = 1
batch_size = 1
seqlen = 16
warmup_steps = 0
eval_every = 0
eval_batches = 0
"""


def train_recipe(tmp_path):
    """A pruning step and a one-step recovery on a local text file."""
    (tmp_path / "train.txt").write_text("The tower is 324 metres tall. " * 50)
    recipe = tmp_path / "train.toml"
    recipe.write_text(DROP + TRAIN.replace("DATA", str(tmp_path / "train.txt")))
    return recipe


pytestmark = pytest.mark.usefixtures("private_registry")  # conftest.py



@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_folder, tmp_path_factory):
    """The tiny model saved as an nnxprune checkpoint (with its tokenizer)."""
    from nnxprune.io.checkpoint import save_checkpoint
    from nnxprune.io.load import load_model

    loaded = load_model(tiny_folder)
    return save_checkpoint(loaded.model, tmp_path_factory.mktemp("ckpt") / "ckpt",
                           tokenizer=loaded.tokenizer,
                           provenance={"source_config": loaded.model.config.to_dict()})


def copy(folder, tmp_path, name="model"):
    return shutil.copytree(folder, tmp_path / name)


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


def error(capsys, *argv, needles=()):
    code, out, err = run(capsys, *argv)
    assert_user_error(code, err, *needles)
    no_traceback(err)
    assert "model " not in out  # nothing was loaded
    return err


# -- model cards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("card, needles", [
    ("name = 'x\n[source\n", ["not valid TOML"]),
    ('name = "bad"\n[source]\nkind = "hub"\n', ["[source] of kind 'hub' needs 'repo'"]),
    ('name = "bad"\nsource = "hub:meta-llama/Llama-3.2-1B"\n', ["[source] must be a table"]),
    ('name = "bad"\n[source]\nkind = "ftp"\nrepo = "a/b"\n', ["kind must be one of"]),
    ('[source]\nkind = "hub"\nrepo = "a/b"\n', ["missing key 'name'"]),
])
def test_malformed_model_cards(capsys, tmp_path, monkeypatch, no_loading, card, needles):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "bad.toml").write_text(card)
    monkeypatch.setenv("NNXPRUNE_MODELS_DIR", str(tmp_path / "cards"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(DROP)
    for argv in (["eval", "bad"], ["generate", "bad", "hi"], ["prune", recipe, "--model", "bad",
                                                              "--check"], ["models"]):
        error(capsys, *argv, needles=[str(tmp_path / "cards" / "bad.toml"), *needles])


# -- config.json -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling, needle", [
    ("llama3", "rope_scaling must be an object"),
    ([8.0, 1.0], "rope_scaling must be an object"),
    ({"rope_type": "llama3", "factor": "x"}, "rope_scaling.factor must be a number"),
])
def test_rope_scaling_that_is_not_an_object(capsys, tiny_folder, tmp_path, no_loading, scaling,
                                            needle):
    folder = copy(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = scaling
    (folder / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.toml"
    recipe.write_text(DROP)
    for argv in (["eval", folder], ["prune", recipe, "--model", folder, "--check"],
                 ["inspect", folder]):
        error(capsys, *argv, needles=[str(folder / "config.json"), needle])


# -- nnxprune.json -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, needle", [
    (lambda meta: b"[1, 2]", "expected a JSON object, got list"),
    (lambda meta: b'{"format": "\xff\xfe"}', "not UTF-8 text (byte 0xff"),
    (lambda meta: json.dumps({**meta, "provenance": [1, 2]}).encode(), "'provenance' must be an object"),
    (lambda meta: json.dumps({**meta, "provenance": {"source_config": {"layers": 3}}}).encode(),
     "provenance.source_config is damaged"),
])
def test_damaged_checkpoint_metadata(capsys, tiny_checkpoint, tmp_path, no_loading, damage,
                                     needle):
    ckpt = copy(tiny_checkpoint, tmp_path)
    meta = json.loads((ckpt / "nnxprune.json").read_text())
    (ckpt / "nnxprune.json").write_bytes(damage(meta))
    recipe = train_recipe(tmp_path)
    commands = [["inspect", ckpt]]
    if "source_config" not in needle:  # only inspect reads the recorded source config
        commands += [["eval", ckpt, "--seqlen", "32"], ["prune", recipe, "--model", ckpt, "--check"],
                     ["train", ckpt, "--recipe", recipe, "--out", tmp_path / "out"]]
    for argv in commands:
        error(capsys, *argv, needles=[str(ckpt / "nnxprune.json"), needle])


# -- tokenizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("garbage, needle", [
    (b"garbage{{{", "not a valid tokenizer"),
    (b'{"model": 1}', "not a valid tokenizer"),
    (b"\x00\xff garbage", "not UTF-8 text"),
])
def test_garbage_tokenizer_json(capsys, tiny_folder, tmp_path, no_loading, garbage, needle):
    folder = copy(tiny_folder, tmp_path)
    (folder / "tokenizer.json").write_bytes(garbage)
    for argv in (["generate", folder, "hi"], ["eval", folder, "--seqlen", "32"],
                 ["importance", folder, "--score", "activation", "--json", tmp_path / "x.json",
                  "--set", "calibration.seqlen=16"]):
        error(capsys, *argv, needles=[str(folder / "tokenizer.json"), needle])


def test_garbage_tokenizer_fails_before_the_weights_in_the_library(tiny_folder, tmp_path,
                                                                   monkeypatch):
    from nnxprune.io import hf
    from nnxprune.io.load import load_model

    folder = copy(tiny_folder, tmp_path)
    (folder / "tokenizer.json").write_text("garbage")
    (folder / "tokenizer_config.json").unlink()
    monkeypatch.setattr(hf, "load_hf_folder", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(UserError, match="tokenizer.json: not a usable tokenizer"):
        load_model(folder)


def _gguf(path, *, merges: bool = False, scores: bool = False, chat: bool = False):
    """A tiny llama GGUF header (one small tensor): enough for every check before loading."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(4)])
    if merges:
        w.add_token_merges(["t 1"])
    if scores:
        w.add_token_scores([0.0] * 4)
    if chat:
        w.add_chat_template("{{ messages[0]['content'] }}")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_without_tokenizer_scores_or_merges(capsys, tmp_path, no_loading):
    from nnxprune.io.gguf import gguf_tokenizer

    path = _gguf(tmp_path / "m.gguf")
    err = error(capsys, "generate", path, "hi", needles=[str(path), "neither tokenizer merges nor "
                                                         "scores"])
    assert "tokenizer.ggml.merges" in err
    with pytest.raises(UserError, match="neither tokenizer merges nor scores"):
        gguf_tokenizer(path, cache=False)


def test_generate_chat_without_a_chat_template(capsys, tiny_folder, tmp_path, no_loading):
    error(capsys, "generate", tiny_folder, "hi", "--chat", needles=["--chat", "no chat template",
                                                                    str(tiny_folder)])
    path = _gguf(tmp_path / "m.gguf", merges=True)
    error(capsys, "generate", path, "hi", "--chat", needles=["--chat", "chat template", str(path)])


def test_generate_chat_without_a_template_in_the_library(tiny_folder):
    from nnxprune.generate import generate_text
    from nnxprune.io.load import load_tokenizer

    with pytest.raises(UserError, match="no chat template"):
        generate_text(None, load_tokenizer(tiny_folder, "hf"), "hi", chat=True)


def test_undecodable_prompt_bytes(capsys, tiny_folder, no_loading):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # Latin-1 argv, as Python sees it
    error(capsys, "generate", tiny_folder, prompt, needles=["prompt is not valid UTF-8",
                                                            "byte 0xe9 at character 3"])


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--max-new-tokens", "64"], "--max-new-tokens 64 leaves no room for the prompt in the model's "
                                 "context of 64"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be an integer >= 1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--seed", str(2 ** 64)], "--seed must be a 64-bit integer"),
])
def test_generate_options_before_loading(capsys, tiny_folder, no_loading, argv, needle):
    error(capsys, "generate", tiny_folder, "hi", *argv, needles=[needle])


def test_eval_seqlen_beyond_the_context_before_loading(capsys, tiny_folder, tiny_checkpoint,
                                                       no_loading):
    for model in (tiny_folder, tiny_checkpoint):
        error(capsys, "eval", model, "--seqlen", 128, needles=["--seqlen 128 is beyond the model's "
                                                               "context of 64 tokens"])


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0", "--json", "o.json"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-2", "--json", "o.json"], "--batch-size must be an integer >= 1, got -2"),
    ([], "give --json OUT and/or --png OUT"),
    (["--json", "o.json", "--set", "calibration.seqlen=128"],
     "calibration.seqlen 128 is beyond the model's context of 64 tokens"),
    (["--json", "o.json", "--set", "calibration.nsamples=0"], "calibration.nsamples must be >= 1"),
    (["--json", "o.json", "--set", "calibration.dataset='c5'"], "unknown dataset 'c5'"),
    (["--json", "o.json", "--set", "calibration.dataset='missing.txt'"],
     "calibration file missing.txt not found"),
    (["--json", "o.json", "--set", "calibration.dataset='bad.parquet'"], "bad.parquet as parquet"),
    (["--json", "o.json", "--set", "calibration.dataset='latin1.txt'"], "latin1.txt"),
    (["--json", "o.json", "--set", "calibration.dataset='notext.jsonl'"],
     "expected an object with a string field 'text'"),
])
def test_importance_settings_and_data_before_loading(capsys, tiny_folder, tmp_path, monkeypatch,
                                                     no_loading, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 5)
    (tmp_path / "notext.jsonl").write_text('{"body": "no text field"}\n')
    defaults = ["--set", "calibration.nsamples=2", "--set", "calibration.seqlen=16"]
    error(capsys, "importance", tiny_folder, "--score", "activation", *defaults, *argv,
          needles=[needle])
    assert not (tmp_path / "o.json").exists()


def test_prune_calibration_file_unreadable_before_loading(capsys, tiny_folder, tmp_path,
                                                          no_loading):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[prune]]\nkind = "wanda"\nsparsity = 0.5\n[calibration]\nnsamples = 2\n'
                      f'seqlen = 16\ndataset = "{tmp_path / "bad.parquet"}"\n')
    error(capsys, "prune", recipe, "--model", tiny_folder, "--out", tmp_path / "ckpt",
          needles=["bad.parquet as parquet"])


@pytest.mark.parametrize("argv, needle", [
    (["--limit", "0"], "--limit must be a whole number of documents >= 1 or a fraction in (0, 1)"),
    (["--limit", "-1"], "--limit must be a whole number"),
    (["--limit", "2.5"], "--limit must be a whole number"),
    (["--max-length", "0"], "--max-length must be >= 2 tokens, got 0"),
    (["--max-length", "65"], "--max-length 65 is beyond the model's context of 64 tokens"),
    (["--num-fewshot", "-1"], "--num-fewshot must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
])
def test_lm_eval_options_before_loading(capsys, tiny_folder, no_loading, argv, needle):
    error(capsys, "lm-eval", tiny_folder, "--tasks", "anything", *argv, needles=[needle])


# -- lm-eval tasks -------------------------------------------------------------------------------------
TASK = """task: {name}
dataset_path: {path}
{kwargs}test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_task_whose_data_file_is_missing(capsys, tiny_folder, tmp_path, no_loading):
    missing = tmp_path / "gone.jsonl"
    kwargs = f"dataset_kwargs:\n  data_files:\n    test: {missing}\n"
    (tmp_path / "mine.yaml").write_text(TASK.format(name="mine", path="json", kwargs=kwargs))
    error(capsys, "lm-eval", tiny_folder, "--tasks", "mine", "--include-path", tmp_path,
          needles=["lm-eval task mine", f"data file {missing} not found"])


def test_lm_eval_hub_task_offline_or_unreachable(capsys, tiny_folder, tmp_path, monkeypatch,
                                                 no_loading):
    import datasets

    from nnxprune.data import sources

    (tmp_path / "hubbed.yaml").write_text(TASK.format(name="hubbed", kwargs="",
                                                      path="nnxprune-tests/no-such-dataset"))
    argv = ["lm-eval", tiny_folder, "--tasks", "hubbed", "--include-path", tmp_path]
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **k: False)
    error(capsys, *argv, needles=["cannot reach the Hugging Face hub", "lm-eval task hubbed",
                                  "nnxprune-tests/no-such-dataset", "HF_DATASETS_OFFLINE=1"])
    monkeypatch.setattr(sources, "_hub_offline", lambda: True)  # HF_DATASETS_OFFLINE=1
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    error(capsys, *argv, needles=["lm-eval task hubbed: cannot load its data",
                                  "nnxprune-tests/no-such-dataset", "offline"])


# -- --distributed -------------------------------------------------------------------------------------
def test_distributed_without_a_cluster(capsys, tiny_folder, tmp_path, monkeypatch, no_loading):
    import os

    if any(k.startswith(("SLURM_", "OMPI_", "PMI_")) for k in os.environ):
        pytest.skip("running inside a cluster job")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    recipe = train_recipe(tmp_path)
    for argv in (["prune", recipe, "--model", tiny_folder, "--out", tmp_path / "a", "--distributed"],
                 ["train", tiny_folder, "--recipe", recipe, "--out", tmp_path / "b",
                  "--distributed"]):
        error(capsys, *argv, needles=["--distributed: no JAX cluster to join"])
