"""Perplexity text: an evaluation split as one token stream, cut into non-overlapping windows.

What to read and how to cut it comes from a protocol value (`nnxprune.evaluate.PerplexityProtocol`
in practice); this module needs only the fields named in `StreamSpec`.

Example:
    >>> from nnxprune.evaluate.protocol import protocol_for
    >>> protocol = protocol_for("wikitext2")
    >>> stream = token_stream(protocol, tokenizer, resolve_data_dir(None))  # int32 [304986]
    >>> windows(stream, protocol).shape                                    # (297, 1024)
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from nnxprune.data.sources import load_rows
from nnxprune.data.tokens import as_token_ids, encode
from nnxprune.errors import UserError


class StreamSpec(Protocol):
    """The protocol fields that decide the stream and its windows."""

    dataset: str
    split: str
    join: str
    documents: int | None  # leading rows joined (None: all)
    add_bos: bool
    seqlen: int
    max_windows: int | None


def token_stream(protocol: StreamSpec, tokenizer: Any,
                 data_dir: str | os.PathLike | None) -> np.ndarray:
    """The protocol's text as one int32 token array, tokenized once, without special tokens.

    Rows (the first `protocol.documents` of them, if set) are joined with `protocol.join`; the
    tokenizer's BOS is prepended once when `protocol.add_bos`.
    """
    rows = load_rows(protocol.dataset, protocol.split, data_dir)
    if protocol.documents is not None:
        if protocol.documents > len(rows):
            raise UserError(f"{protocol.dataset}/{protocol.split} has {len(rows)} rows, "
                            f"fewer than the protocol's documents={protocol.documents}")
        rows = rows[:protocol.documents]
    stream = encode(tokenizer, protocol.join.join(rows), add_special_tokens=False)
    if protocol.add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UserError("the protocol asks for a BOS token but the tokenizer has none")
        stream = as_token_ids(np.concatenate([np.asarray([bos], dtype=np.int64), stream]))
    return stream


def windows(stream: np.ndarray, protocol: StreamSpec) -> np.ndarray:
    """Non-overlapping `[N, seqlen]` int32 windows of `stream`; the partial tail is dropped.

    Only the first `protocol.max_windows` are kept when it is set.
    """
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise ValueError(f"token stream must be 1-D, got shape {stream.shape}")
    seqlen = protocol.seqlen
    n = stream.size // seqlen
    if n == 0:
        raise UserError(f"the {protocol.dataset} token stream has {stream.size} tokens, "
                        f"shorter than one window of seqlen {seqlen}")
    if protocol.max_windows is not None:
        n = min(n, protocol.max_windows)
    return np.ascontiguousarray(stream[: n * seqlen].reshape(n, seqlen), dtype=np.int32)
