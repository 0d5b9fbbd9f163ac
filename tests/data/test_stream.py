"""Tests for perplexity text: the token stream of a protocol's rows and its windows."""

from __future__ import annotations

import numpy as np
import pytest

from nnxprune.data import token_stream, windows
from nnxprune.errors import UserError
from nnxprune.evaluate.protocol import protocol_for

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

# ---------------------------------------------------------------- token stream


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
