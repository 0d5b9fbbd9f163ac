"""Tests for the perplexity protocol."""

from __future__ import annotations

import json

import pytest

from nnxprune.errors import UserError
from nnxprune.evaluate.protocol import PerplexityProtocol, protocol_for

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
