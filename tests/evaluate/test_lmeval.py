"""lm-eval adapter: exact against lm-eval's `hf` model, rolling = perplexity protocol, generation.

A tiny random Llama with SmolLM2's real tokenizer (vocab 49152) is exported to an HF folder, so
lm-eval's `hf` model and ours score the same weights. Tasks are small local YAML tasks written
from WikiText-2 lines (the real test file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from nnxprune.errors import UserError  # noqa: E402


def _wikitext_lines(n: int) -> list[str]:
    data = Path(os.environ.get("NNXPRUNE_DATA_DIR", "../shared/data")) / "wiki.test.raw"
    if not data.exists():
        pytest.skip(f"{data} missing (set NNXPRUNE_DATA_DIR)")
    from nnxprune.evaluate.lmeval.local_tasks import wikitext_paragraphs

    return wikitext_paragraphs(n, data.parent)


def write_tasks(folder: Path, n_mc: int = 6, n_roll: int = 3) -> Path:
    from nnxprune.evaluate.lmeval.local_tasks import write_wikitext_tasks

    _wikitext_lines(1)  # skips when the data is missing
    return write_wikitext_tasks(folder, n_mc, n_roll,
                                data_dir=os.environ.get("NNXPRUNE_DATA_DIR", "../shared/data"))


@pytest.fixture(scope="module")
def tokenizer():
    gguf = pytest.importorskip("nnxprune.io.gguf")
    try:
        path = gguf.smollm2_gguf_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    return gguf.gguf_tokenizer(path)


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """(Loaded, HF folder) of a tiny random Llama with SmolLM2's tokenizer."""
    from flax import nnx

    from nnxprune.io.hf import export_hf
    from nnxprune.io.load import Loaded
    from nnxprune.models.llama import Llama, LlamaConfig
    from tests.conftest import randomize_params

    cfg = LlamaConfig.uniform(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, head_dim=16,
                              max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    randomize_params(model, seed=1, scale=0.5)
    folder = export_hf(model, tmp_path_factory.mktemp("hf") / "tiny", tokenizer=tokenizer)
    loaded = Loaded(model=model, tokenizer=tokenizer, source="tiny", kind="hf", path=folder)
    return loaded, folder


def _requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def test_bucket_length():
    from nnxprune.evaluate.lmeval import bucket_length

    assert [bucket_length(n, 512) for n in (1, 3, 9, 17, 25, 33, 49, 65, 200, 385, 511)] == \
        [1, 4, 16, 24, 32, 48, 64, 96, 256, 512, 512]
    assert bucket_length(300, 300) == 300 and bucket_length(600) == 768


def test_fine_length():
    from nnxprune.evaluate.lmeval import fine_length

    lengths = [fine_length(n) for n in range(1, 600)]
    assert lengths[:17] == [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [20]
    assert sorted(set(lengths))[5:14] == [20, 24, 28, 32, 40, 48, 56, 64, 80]
    assert all(n <= b < 1.25 * n for n, b in zip(range(17, 600), lengths[16:]))  # waste < 20%


def test_loglikelihood_equals_hf(tiny):
    """Our loglikelihoods equal lm-eval's hf model within 1e-3 nats, greedy flags equal, and a
    shared context with one-token continuations is scored in one row."""
    torch = pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM

    from nnxprune.evaluate.lmeval import NnxpruneLM

    torch.set_num_threads(2)
    loaded, folder = tiny
    ours = NnxpruneLM(loaded=loaded, batch_size=4, max_length=512)
    hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4, max_length=512)
    lines = _wikitext_lines(12)
    args = [(ln[:120], " " + ln[120:200]) for ln in lines[:6]]
    args += [("The capital of France is", c) for c in (" Paris", " London", " the", " a")]
    args += [("", lines[7][:60]), (lines[8][:300], " and")]
    # one context, multi-token choices of different lengths: the shared-context path
    args += [(lines[9][:150], " " + lines[10][:k]) for k in (20, 45, 70)]
    reqs = _requests("loglikelihood", args)
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = hf.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-3, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(x[0] < 0 for x in a)

    # Rolling loglikelihoods of whole paragraphs (thousands of nats): lm-eval's hf model sums the
    # per-token float32 log-probabilities in float32, which alone is off by up to 1.4e-3 nats
    # here (measured against the same model in float64), so the reference is the hf model in
    # float64; ours (float32 forward, float64 sums) was within 1.3e-4 of it.
    hf64 = HFLM(pretrained=str(folder), dtype="float64", device="cpu", batch_size=4, max_length=512)
    rolls = _requests("loglikelihood_rolling", [(ln,) for ln in lines[:3]])
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolls, disable_tqdm=True),
                               hf64.loglikelihood_rolling(rolls, disable_tqdm=True), atol=1e-3, rtol=0)
    # few compiled shapes: packed rows (and rows of long trees), two head chunk sizes
    assert {shape[0] for shape in ours._scorer.shapes} == {"packed", "head"}
    assert len(ours._scorer.shapes) <= 8


@pytest.mark.parametrize("pack", [32, 256], ids=["small-rows", "default-rows"])
def test_token_scores_and_greedy_flags_on_every_path(tiny, monkeypatch, pack):
    """Token-level requests against a plain forward's log-softmax: lone requests, one-token
    continuations of a one-token context (scored at its last position), and shared contexts with
    multi-token continuations, packed several trees to a row; with 32-token rows, trees that
    outgrow a row (split into two trees of one context, or alone in a longer row). Each
    continuation is the model's own greedy path (greedy flag True) or that path with one token
    changed (False)."""
    import jax
    import jax.numpy as jnp

    from nnxprune.evaluate import lmeval
    from nnxprune.evaluate.lmeval import packing

    monkeypatch.setattr(packing, "PACK_TOKENS", pack)
    loaded, _ = tiny
    model = loaded.model
    ours = lmeval.NnxpruneLM(loaded=loaded, batch_size=4, max_length=512)

    forward = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0].astype(jnp.float32)))

    def log_probs(ids):  # right-padded to one length (one compilation): causal, so exact
        return np.asarray(forward(jnp.asarray([list(ids) + [0] * (96 - len(ids))])),
                          np.float64)[:len(ids)]

    def greedy_path(ctx, n):
        ids = list(ctx)
        for _ in range(n):
            ids.append(int(log_probs(ids)[-1].argmax()))
        return ids[len(ctx):]

    rng = np.random.default_rng(0)
    contexts = [list(rng.integers(10, 40000, size=m)) for m in (1, 1, 9, 40, 70, 70)]
    requests = []
    for c, ctx in enumerate(contexts):
        for n in ((1, 1) if len(ctx) == 1 else (1, 3, 6) if c % 2 else (5,)):
            cont = greedy_path(ctx, n)
            requests.append((None, ctx, cont))  # greedy
            wrong = list(cont)
            wrong[-1 if n == 1 else 1] = (wrong[-1 if n == 1 else 1] + 7) % 49152
            requests.append((None, ctx, wrong))  # not greedy
    results = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, ctx, cont), (score, greedy) in zip(requests, results, strict=True):
        lp = log_probs(ctx + cont)
        ref = sum(lp[len(ctx) - 1 + j, tok] for j, tok in enumerate(cont))
        ref_greedy = all(lp[len(ctx) - 1 + j].argmax() == tok for j, tok in enumerate(cont))
        assert abs(score - ref) < 1e-4 * max(1.0, abs(ref))
        assert greedy == ref_greedy
    assert sum(g for _, g in results) == len(results) // 2
    lengths = {shape[1][1] for shape in ours._scorer.shapes if shape[0] == "packed"}
    assert pack in lengths and (pack == 256 or max(lengths) > pack)


def test_rolling_equals_perplexity_protocol(tiny):
    """`loglikelihood_rolling` with windows of L tokens is the perplexity protocol's NLL sum over
    windows of L + 1 tokens at stride L (each window predicts every token but its first) of the
    stream `[prefix token] + the text's tokens`."""
    import jax.numpy as jnp

    from nnxprune.evaluate.lmeval import NnxpruneLM
    from nnxprune.evaluate.perplexity import token_nll

    loaded, _ = tiny
    L, n_windows = 32, 3
    lm = NnxpruneLM(loaded=loaded, batch_size=4, max_length=L)
    ids = lm.tok_encode(" ".join(_wikitext_lines(6)))[:n_windows * L]
    text = loaded.tokenizer.decode(ids)
    assert lm.tok_encode(text) == ids
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]),
                                       disable_tqdm=True)[0]
    stream = [lm.prefix_token_id] + ids
    windows = np.stack([stream[k * L:k * L + L + 1] for k in range(n_windows)]).astype(np.int32)
    nll = float(token_nll(loaded.model, jnp.asarray(windows)).sum())
    assert rolling == pytest.approx(-nll, abs=1e-3)


def test_generate_until_matches_transformers_greedy(tiny):
    torch = pytest.importorskip("torch")
    import transformers

    from nnxprune.evaluate.lmeval import NnxpruneLM

    loaded, folder = tiny
    lm = NnxpruneLM(loaded=loaded, max_length=512)
    prompt = _wikitext_lines(1)[0][:100]
    ids = loaded.tokenizer(prompt).input_ids
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    ref_text = loaded.tokenizer.decode(ref[0, len(ids):].tolist(), skip_special_tokens=True)
    (text,) = lm.generate_until(_requests("generate_until", [
        (prompt, {"until": ["<never>"], "max_gen_toks": 12, "do_sample": False})]), disable_tqdm=True)
    assert text == ref_text
    # a stop sequence taken from inside the reference text cuts the generation there
    stop = ref_text[len(ref_text) // 2:len(ref_text) // 2 + 3]
    if stop.strip():
        (cut,) = lm.generate_until(_requests("generate_until", [
            (prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False})]), disable_tqdm=True)
        assert cut == ref_text[:ref_text.index(stop)]


def test_local_tasks_end_to_end(tiny, tmp_path):
    from nnxprune.evaluate.lmeval import NnxpruneLM, results_table, run_tasks

    loaded, _ = tiny
    folder = write_tasks(tmp_path / "tasks")
    lm = NnxpruneLM(loaded=loaded, batch_size=4, max_length=512)
    out = run_tasks(lm, ["wiki_next", "wiki_roll"], include_path=str(folder))
    assert 0.0 <= out["results"]["wiki_next"]["acc,none"] <= 1.0
    assert out["results"]["wiki_roll"]["word_perplexity,none"] > 1.0
    table = results_table(out["results"])
    assert "| wiki_next | acc |" in table and "word_perplexity" in table


def test_bad_input(tiny, tmp_path):
    from nnxprune.evaluate.lmeval import NnxpruneLM, run_tasks

    loaded, _ = tiny
    lm = NnxpruneLM(loaded=loaded, batch_size=2, max_length=64)
    with pytest.raises(UserError, match="no such folder"):
        run_tasks(lm, ["wiki_next"], include_path=str(tmp_path / "missing"))
    folder = write_tasks(tmp_path / "tasks", n_mc=1, n_roll=1)
    with pytest.raises(UserError, match="unknown lm-eval task"):
        run_tasks(lm, ["wiki_nxt"], include_path=str(folder))
    with pytest.raises(UserError, match="max_length"):
        NnxpruneLM(loaded=loaded, max_length=10**6)


def test_cli_lm_eval(tiny, tmp_path, capsys):
    from nnxprune.cli import main

    _, folder = tiny
    tasks = write_tasks(tmp_path / "tasks", n_mc=3, n_roll=1)
    out = tmp_path / "r.json"
    assert main(["lm-eval", str(folder), "--tasks", "wiki_next,wiki_roll", "--include-path",
                 str(tasks), "--limit", "2", "--batch-size", "4", "--max-length", "256",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"wiki_next", "wiki_roll"}
    assert report["n_samples"]["wiki_next"]["effective"] == 2
    assert "| wiki_next | acc |" in capsys.readouterr().out
    assert main(["lm-eval", str(folder), "--tasks", "nope", "--include-path", str(tasks)]) == 2


def test_recipe_eval_section(tiny, tmp_path):
    """`[eval.lm_eval]` is validated strictly and runs on the dense and the pruned model."""
    from nnxprune.cli import main
    from nnxprune.recipes import parse_recipe

    with pytest.raises(UserError, match="tasks"):
        parse_recipe({"eval": {"lm_eval": {"task": ["x"]}}})
    with pytest.raises(UserError, match="non-empty list"):
        parse_recipe({"eval": {"lm_eval": {"tasks": []}}})
    with pytest.raises(UserError, match="limit"):
        parse_recipe({"eval": {"lm_eval": {"tasks": ["x"], "limit": -1}}})
    assert parse_recipe({"eval": {"lm_eval": {"tasks": "a, b"}}}).lm_eval["tasks"] == ["a", "b"]

    _, folder = tiny
    tasks = write_tasks(tmp_path / "tasks", n_mc=3, n_roll=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""[recipe]
name = "magnitude-lmeval"
[[prune]]
kind = "magnitude"
sparsity = 0.5
[eval.lm_eval]
tasks = ["wiki_next"]
include_path = "{tasks}"
limit = 3
max_length = 256
""")
    report = tmp_path / "report.json"
    assert main(["prune", str(recipe), "--model", str(folder), "--json", str(report),
                 "--no-progress"]) == 0
    data = json.loads(report.read_text())
    dense = data["dense"]["lm_eval"]["results"]["wiki_next"]["acc,none"]
    pruned = data["pruned"]["lm_eval"]["results"]["wiki_next"]["acc,none"]
    assert 0 <= dense <= 1 and 0 <= pruned <= 1
    assert main(["prune", str(recipe), "--model", str(folder), "--json", str(report),
                 "--set", "eval.lm_eval.tasks=wiki_nxt"]) == 2


@pytest.mark.real
def test_smollm2_loglikelihood_equals_hf(tmp_path):
    """SmolLM2-135M, real WikiText-2 multiple choice (shared contexts, packed trees) and a
    rolling paragraph: ours (float32) against lm-eval's `hf` model on the same weights in
    float64, within 1e-3 nats per request; greedy flags equal. (In float32 the `hf` model's own
    sum is off by up to 1.5e-3 nats on these lengths, see the README.)"""
    torch = pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM

    from nnxprune.evaluate.lmeval import NnxpruneLM
    from nnxprune.io.hf import export_hf
    from nnxprune.io.load import load_model

    try:
        loaded = load_model("smollm2-135m")
    except UserError as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")
    torch.set_num_threads(2)
    folder = export_hf(loaded.model, tmp_path / "hf", tokenizer=loaded.tokenizer)
    lines = _wikitext_lines(8)
    sentences = [ln.split(" . ") for ln in lines]
    args = [(s[0] + ".", " " + choice + ".") for s in sentences[:3]
            for choice in (s[1], sentences[5][1], sentences[6][1])]  # 3 shared contexts x 3
    args += [("The capital of France is", " Paris"), ("The capital of France is", " London")]
    ours = NnxpruneLM(loaded=loaded, batch_size=8)
    hf = HFLM(pretrained=str(folder), dtype="float64", device="cpu", batch_size=8)
    reqs = _requests("loglikelihood", args)
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = hf.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-3, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert a[-2][0] > a[-1][0]  # " Paris" is likelier than " London"
    rolls = _requests("loglikelihood_rolling", [(lines[7],)])
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolls, disable_tqdm=True),
                               hf.loglikelihood_rolling(rolls, disable_tqdm=True), atol=1e-3, rtol=0)
