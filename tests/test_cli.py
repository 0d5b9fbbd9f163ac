"""The `nnxprune` command: real runs on a tiny model with a real tokenizer and real WikiText-2,
and bad input (one line on stderr, exit status 2, nothing written)."""

import json
import os

import gguf
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import cli
from nnxprune.io.hf import export_hf
from nnxprune.models.llama import Llama, LlamaConfig

DATA_DIR = os.environ.get("NNXPRUNE_DATA_DIR")
VOCAB = 320


def _tokenizer(text: str):
    """A byte-level BPE tokenizer trained here on real text (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama exported as an HF folder with a tokenizer, context 64."""
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building. "
            "It was the tallest man-made structure in the world for 41 years. ") * 20
    cfg = LlamaConfig.uniform(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, head_dim=8,
                              max_position_embeddings=64, eos_token_id=0)
    model = randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1)
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    export_hf(model, folder, tokenizer=_tokenizer(text))
    return folder


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, options", [
    ("eval", ["--dataset", "--seqlen", "--max-windows", "--batch-size", "--data-dir", "--json"]),
    ("generate", ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--chat"]),
    ("export", ["--hf", "--checkpoint", "--format"]),
])
def test_help_explains_every_option(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in options + ["MODEL"]:
        assert option in out


def test_models_lists_cards(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in ("smollm2-135m", "llama-2-7b", "llama-3.1-8b", "llama-3.2-1b", "tinyllama-1.1b"):
        assert name in out


# -- real runs on the tiny model -------------------------------------------------------------------
@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (real WikiText-2 needed)")
def test_eval_writes_json_that_matches_the_library(capsys, tiny_folder, tmp_path):
    from nnxprune.evaluate.perplexity import evaluate_perplexity
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model

    out_json = tmp_path / "sub" / "ppl.json"
    code, out, err = run(capsys, "eval", tiny_folder, "--seqlen", 32, "--max-windows", 3,
                         "--batch-size", 2, "--json", out_json, "--no-progress")
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert {"ppl", "protocol", "tokens", "seconds"} <= set(report)
    assert report["tokens"] == 3 * 32 and report["windows"] == 3
    assert report["protocol"]["dataset"] == "wikitext2" and report["protocol"]["seqlen"] == 32
    assert "wikitext2/test" in out and "tokens/s" in out and f"{report['ppl']:.4f}" in out
    loaded = load_model(tiny_folder)
    ref = evaluate_perplexity(loaded.model, loaded.tokenizer,
                              protocol_for("wikitext2", seqlen=32, max_windows=3), progress=False)
    assert report["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    assert 1.0 < report["ppl"] < 10 * VOCAB  # a random model: near-uniform, but finite and real


def test_generate_greedy(capsys, tiny_folder):
    code, out, err = run(capsys, "generate", tiny_folder, "The tower is", "--max-new-tokens", 5)
    assert code == 0, err
    assert "The tower is" in out and "tokens/s" in out


def test_export_round_trip(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "export", tiny_folder, "--checkpoint", tmp_path / "ckpt")
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "ckpt", "--hf", tmp_path / "hf")
    assert code == 0, err
    a = (tiny_folder / "model.safetensors").read_bytes()
    from safetensors.numpy import load_file

    x, y = load_file(tiny_folder / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert a and x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


# -- bad input: one line, exit 2, nothing written --------------------------------------------------
def test_unknown_card_lists_known_ones(capsys, tmp_path):
    out_json = tmp_path / "x.json"
    code, _, err = run(capsys, "eval", "smollm2-136m", "--json", out_json)
    assert_user_error(code, err, "unknown model 'smollm2-136m'", "smollm2-135m", "llama-3.1-8b")
    assert not out_json.exists() and list(tmp_path.iterdir()) == []


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "eval", tmp_path / "nope.gguf", "--json", tmp_path / "x.json")
    assert_user_error(code, err, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_gguf_of_another_architecture(capsys, tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, _, err = run(capsys, "eval", path, "--json", tmp_path / "x.json")
    assert_user_error(code, err, "architecture 'gpt2'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf"]


@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set")
def test_seqlen_beyond_context(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "eval", tiny_folder, "--seqlen", 128, "--json", tmp_path / "x.json")
    assert_user_error(code, err, "seqlen 128", "context of 64")
    assert list(tmp_path.iterdir()) == []


def test_missing_data_directory(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "eval", tiny_folder, "--data-dir", tmp_path / "nodata",
                       "--json", tmp_path / "x.json")
    assert_user_error(code, err, "nodata", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_data_directory_without_the_file(capsys, tiny_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "eval", tiny_folder, "--dataset", "c4", "--data-dir", tmp_path / "empty")
    assert_user_error(code, err, "c4_validation_2k.parquet")


@pytest.mark.parametrize("argv, needle", [
    (["--seqlen", "1"], "seqlen"),
    (["--max-windows", "0"], "max_windows"),
    (["--batch-size", "0"], "batch_size"),
])
def test_bad_protocol_values(capsys, tiny_folder, argv, needle):
    code, _, err = run(capsys, "eval", tiny_folder, *argv)
    assert_user_error(code, err, needle)


def test_generate_bad_values(capsys, tiny_folder):
    code, _, err = run(capsys, "generate", tiny_folder, "hi", "--max-new-tokens", 0)
    assert_user_error(code, err, "max-new-tokens")
    code, _, err = run(capsys, "generate", tiny_folder, "hi", "--max-new-tokens", 100)
    assert_user_error(code, err, "context")


def test_export_needs_an_output(capsys, tiny_folder):
    code, _, err = run(capsys, "export", tiny_folder)
    assert_user_error(code, err, "--hf OUT_DIR or --checkpoint OUT_DIR")


def test_folder_without_tokenizer(capsys, tmp_path):
    cfg = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=32)
    export_hf(Llama(cfg, rngs=nnx.Rngs(0)), tmp_path / "m")
    code, _, err = run(capsys, "generate", tmp_path / "m", "hi")
    assert_user_error(code, err, "tokenizer")


def test_inspect_writes_html_markdown_png(capsys, tiny_folder, tmp_path):
    from nnxprune.graph import find_group, mask_group
    from nnxprune.io.checkpoint import save_checkpoint
    from nnxprune.io.load import load_model

    model = load_model(tiny_folder).model
    mask_group(model, find_group(model, "mlp", 1), range(0, 64, 2))
    save_checkpoint(model, tmp_path / "ckpt", provenance={"source_config": model.config.to_dict()})
    code, out, err = run(capsys, "inspect", tmp_path / "ckpt", "--html", tmp_path / "v.html",
                         "--markdown", tmp_path / "v.md", "--png", tmp_path / "v.png")
    assert code == 0, err
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "structured" in (tmp_path / "v.html").read_text()
    md = (tmp_path / "v.md").read_text()
    # layer 1: half of its 64 MLP neurons masked = 3,072 of its 9,216 projection weights
    assert "layers.1.mlp.down_proj | 64x32 | 2,048 | 50.0% | structured" in md
    assert "33.3%" in out
