"""Perplexity one decoder layer at a time (`nnxprune.evaluate.streamed`, `evaluate.layerwise`):
the same windows and the same number as the in-memory evaluator and as the whole-model scorer,
whatever the batch size, the chunking of windows on the host, masks or the weights' dtype;
`nnxprune eval --stream` prints it; bad input is refused first."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune import cli
from nnxprune.errors import UserError
from nnxprune.evaluate.layerwise import chunk_windows
from nnxprune.evaluate.perplexity import compile_scorer, score_windows
from nnxprune.evaluate.protocol import protocol_for
from nnxprune.evaluate.streamed import evaluate_streamed, evaluate_streamed_windows, globals_model
from nnxprune.io.hf import export_hf, load_hf_folder
from nnxprune.io.layers import SafetensorsSource, open_layers
from nnxprune.models.llama import Llama, LlamaConfig

DATA_DIR = os.environ.get("NNXPRUNE_DATA_DIR")
SEQLEN = 24


def _folder(tmp_path_factory, name, tie, dtype=jnp.float32):
    cfg = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16,
                              tie_word_embeddings=tie, max_position_embeddings=64)
    model = randomize_params(Llama(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)), scale=0.1)
    out = tmp_path_factory.mktemp("streamed-eval") / name
    export_hf(model, out)
    return out


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _folder(tmp_path_factory, "untied", tie=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _folder(tmp_path_factory, "tied", tie=True)


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, 256, size=(7, SEQLEN))


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_streamed_equals_in_memory(which, batch_size, request, windows):
    folder = request.getfixturevalue(which)
    protocol = protocol_for("wikitext2", seqlen=SEQLEN, batch_size=batch_size)
    ours = evaluate_streamed_windows(SafetensorsSource(folder), windows, protocol, progress=False)
    ref = score_windows(load_hf_folder(folder), windows, protocol, progress=False)
    assert ours.nll == ref.nll  # exactly: the same programs per layer, the same batch sums
    assert (ours.tokens, ours.predicted_tokens, ours.windows) == (7 * SEQLEN, 7 * (SEQLEN - 1), 7)
    assert ours.protocol == protocol and ours.compile_seconds > 0


def _whole_model_nll(model, windows, batch_size):
    """The whole-model scorer (one program over every layer), the ragged tail padded and masked."""
    compiled, state = compile_scorer(model, batch_size, windows.shape[1])
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch, weight = windows[start:start + batch_size], np.ones(batch_size, np.float32)
        weight[len(batch):] = 0.0
        batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), axis=0)])
        total += float(compiled(state, jnp.asarray(batch, jnp.int32), jnp.asarray(weight)))
    return total / (len(windows) * (windows.shape[1] - 1))


@pytest.mark.parametrize("batch_size", [2, 3])
def test_layer_by_layer_equals_the_whole_model_program(untied, windows, batch_size):
    """In memory, dense and with masks: the per-layer programs give the whole-model scorer's
    number bit for bit, and the evaluated model keeps its masks and unmasked kernels."""
    model = load_hf_folder(untied)
    protocol = protocol_for("wikitext2", seqlen=SEQLEN, batch_size=batch_size)
    assert score_windows(model, windows, protocol, progress=False).nll == _whole_model_nll(
        model, windows, batch_size)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.set_mask(rng.random(lin.kernel.shape) < 0.5)
    kernel = np.asarray(model.layers[1].mlp.down_proj.kernel[...])
    masked = score_windows(model, windows, protocol, progress=False, host_memory_bytes=1)
    assert masked.nll == _whole_model_nll(model, windows, batch_size)
    assert model.layers[1].mlp.down_proj.mask is not None
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.kernel[...]), kernel)
    assert np.count_nonzero(kernel) == kernel.size  # the original, not the folded, kernel


@pytest.mark.parametrize("budget_windows", [1, 2, 3, 100])
def test_chunks_of_windows_give_the_same_number(untied, windows, budget_windows):
    """A host budget of a few windows' hidden states: chunks of whole batches, one number."""
    protocol = protocol_for("wikitext2", seqlen=SEQLEN, batch_size=2)
    budget = budget_windows * SEQLEN * 64 * 4
    whole = evaluate_streamed_windows(SafetensorsSource(untied), windows, protocol, progress=False)
    chunked = evaluate_streamed_windows(SafetensorsSource(untied), windows, protocol,
                                        progress=False, host_memory_bytes=budget)
    assert chunked.nll == whole.nll


def test_chunk_sizes_are_whole_batches():
    row = 24 * 64 * 4  # one window's float32 hidden states
    assert chunk_windows(7, 24, 64, 2, 5 * row) == 4  # two batches fit, not three
    assert chunk_windows(7, 24, 64, 2, 1) == 2  # at least one batch
    assert chunk_windows(7, 24, 64, 2, 10**9) == 8  # everything: 4 batches, the last padded
    assert chunk_windows(7, 24, 64, 3, 10**9) == 9


def test_reads_one_layer_at_a_time(untied, windows):
    """Every decoder layer is read once per chunk, in order, and nothing else but the globals."""
    source = SafetensorsSource(untied)
    read = []
    layer = source.layer
    source.layer = lambda i, dtype: (read.append(i), layer(i, dtype))[1]
    protocol = protocol_for("wikitext2", seqlen=SEQLEN, batch_size=2)
    evaluate_streamed_windows(source, windows, protocol, progress=False,
                              host_memory_bytes=4 * SEQLEN * 64 * 4)  # two chunks of 4 windows
    assert read == [0, 1, 2, 0, 1, 2]


def test_bfloat16_weights_equal_the_in_memory_bf16_run(untied, windows):
    protocol = protocol_for("wikitext2", seqlen=SEQLEN, batch_size=2)
    ours = evaluate_streamed_windows(SafetensorsSource(untied), windows, protocol, progress=False,
                                     param_dtype=jnp.bfloat16)
    ref = score_windows(load_hf_folder(untied, param_dtype=jnp.bfloat16), windows, protocol,
                        progress=False)
    fp32 = score_windows(load_hf_folder(untied), windows, protocol, progress=False)
    assert ours.nll == ref.nll
    assert ours.nll != fp32.nll and abs(ours.nll - fp32.nll) < 0.02 * fp32.nll  # bf16, not fp32


def test_globals_model_holds_the_pieces_outside_the_stack(untied, tied):
    for folder in (untied, tied):
        model = load_hf_folder(folder)
        head = globals_model(SafetensorsSource(folder))
        assert len(head.layers) == 0
        np.testing.assert_array_equal(np.asarray(head.embed_tokens.embedding[...]),
                                      np.asarray(model.embed_tokens.embedding[...]))
        assert (head.lm_head is None) == (model.lm_head is None)


def test_bad_input(untied, windows):
    source = SafetensorsSource(untied)
    with pytest.raises(UserError, match="beyond the model's context of 64"):
        evaluate_streamed(source, None, protocol_for("wikitext2", seqlen=128))
    with pytest.raises(UserError, match="host memory budget"):
        evaluate_streamed(source, None, protocol_for("wikitext2", seqlen=SEQLEN),
                          host_memory_bytes=0)
    with pytest.raises(ValueError, match="windows must be"):
        evaluate_streamed_windows(source, windows[0], protocol_for("wikitext2", seqlen=SEQLEN))


# -- the command -----------------------------------------------------------------------------------
@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (real WikiText-2 needed)")
def test_eval_stream_prints_the_in_memory_number(capsys, tmp_path):
    from test_cli import _tokenizer  # a byte-level BPE trained on the spot (no hub)

    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 30
    cfg = LlamaConfig.uniform(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, head_dim=8,
                              max_position_embeddings=64)
    folder = tmp_path / "tiny"
    export_hf(randomize_params(Llama(cfg, rngs=nnx.Rngs(0)), scale=0.1), folder,
              tokenizer=_tokenizer(text))
    reports = {}
    for flags in ([], ["--stream"], ["--stream", "--host-memory-gb", "1e-6"]):
        out_json = tmp_path / f"ppl{len(flags)}.json"
        code = cli.main(["eval", str(folder), "--seqlen", "32", "--max-windows", "5",
                         "--batch-size", "2", "--json", str(out_json), "--no-progress", *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        reports[len(flags)] = json.loads(out_json.read_text())
        assert f"{reports[len(flags)]['ppl']:.4f}" in out
    assert reports[0]["ppl"] == reports[1]["ppl"] == reports[3]["ppl"]
    assert reports[1]["streamed"] and not reports[0].get("streamed")
    assert reports[1]["peak_rss_gb"] > 0


def test_open_layers_refuses_what_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()  # nnxprune checkpoints stream too (tests/test_streamed_orbax.py)
    with pytest.raises(UserError, match="layer-by-layer loading reads .* none of them"):
        open_layers(tmp_path / "empty")


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (real WikiText-2 needed)")
def test_smollm2_streamed_equals_in_memory():
    from nnxprune import data as data_lib
    from nnxprune.io.load import load_model

    try:
        source = open_layers("smollm2-135m")
    except UserError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    loaded = load_model("smollm2-135m")
    protocol = protocol_for("wikitext2", seqlen=256, max_windows=3, batch_size=2)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, DATA_DIR), protocol)
    ref = score_windows(loaded.model, windows, protocol, progress=False)
    del loaded
    ours = evaluate_streamed_windows(source, windows, protocol, progress=False)
    assert ours.nll == ref.nll and ours.windows == 3
