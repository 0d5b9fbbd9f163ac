"""Calibration data for post-training pruning, drawn the way the Wanda and SparseGPT reference code
draws it, so that a given (tokenizer, documents, nsamples, seqlen, seed) picks the same windows.

The reference sampler (locuslab/wanda `lib/data.py` `get_c4`, IST-DASLab/sparsegpt `datautils.py`
`get_c4`), which this module reproduces draw for draw:

    random.seed(seed)
    for each of nsamples:
        repeat: i = random.randint(0, len(docs) - 1); ids = tokenizer(docs[i]).input_ids
        until len(ids) > seqlen
        start = random.randint(0, len(ids) - seqlen - 1)
        sample = ids[start:start + seqlen]

Details that decide which tokens come out, all as in the reference:

- Documents are tokenized one at a time with the tokenizer's defaults (`tokenizer(text)`: the
  reference passes only `return_tensors="pt"`, which changes the container, not the ids). So
  `add_special_tokens=True`: a Llama tokenizer prepends BOS (a window starting at 0 begins with
  it); SmolLM2's tokenizer adds nothing.
- A document qualifies when it has strictly more than `seqlen` tokens (Wanda's `>`; SparseGPT's
  `>=` lets a document of exactly `seqlen` tokens through and then crashes in
  `randint(0, -1)`). The last token of a document is therefore never in a window.
- A `random.Random(seed)` instance is used instead of seeding the global generator: the same
  stream of numbers, without touching other code's random state.
- Only the documents the sampler draws are tokenized (once each; repeated draws hit a cache).
- `wikitext2` follows the reference's `get_wikitext2`: the train rows joined with " " are
  tokenized once as one stream and each sample is `start = random.randint(0, n - seqlen - 1)`;
  no document is drawn, so every pick is `(0, start)`.

Sources (`nnxprune.data.sources`): `"c4"` (the data folder's C4 validation slice, else the
reference's own hub train shard; `CalibrationSet.source` says which was used), `"wikitext2"` (the
hub's train split), or a local `.txt` / `.jsonl` / `.parquet` file, whose picks index its
documents in file order (for `.txt`, the n-th non-empty line).

A source with no document longer than `seqlen` tokens would make the reference loop forever;
here it is a `UserError`, found before sampling by tokenizing documents from the longest (in
characters) down until one qualifies; usually the first does.

Example:
    >>> cs = calibration_samples(tokenizer, dataset="c4", nsamples=128, seqlen=2048, seed=0)
    >>> cs.tokens.shape, cs.picks[:2], cs.source
    >>> for batch in cs.batches(8): ...                  # int32 [8, 2048]
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from nnxprune.data import sources
from nnxprune.data.tokens import encode
from nnxprune.errors import UserError

# Existence check: a document can have no more tokens than this many per character (a UTF-8
# character is at most 4 bytes; byte-level BPE and SentencePiece byte fallback give at most one
# token per byte) plus a few special tokens; longer seqlens skip its tokenization.
_MAX_TOKENS_PER_CHAR = 4
_MAX_SPECIAL_TOKENS = 8


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationSet:
    """`nsamples` calibration windows and where each came from.

    tokens: int32 `[nsamples, seqlen]` (read-only).
    picks:  per sample, `(doc_index, start)`: the window is
            `tokenizer(docs[doc_index]).input_ids[start:start + seqlen]`
            (for `wikitext2`, doc_index is 0 and the "document" is the joined train split).
    dataset: the name asked for (`"c4"`, `"wikitext2"`) or the file path as given.
    seed, seqlen: as passed to `calibration_samples`.
    source: the file read, or the hub dataset (`hf://...`).
    """

    tokens: np.ndarray
    picks: list[tuple[int, int]]
    dataset: str
    seed: int
    seqlen: int
    source: str

    @property
    def nsamples(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.nsamples

    def grain_dataset(self, batch_size: int, *, drop_remainder: bool = False):
        """The samples as a `grain.MapDataset` of int32 `[batch, seqlen]` batches, in order."""
        import grain

        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        return grain.MapDataset.source(self.tokens).batch(int(batch_size),
                                                          drop_remainder=drop_remainder)

    def batches(self, batch_size: int, *, drop_remainder: bool = False) -> Iterator[np.ndarray]:
        """int32 numpy `[batch, seqlen]` batches through grain, in sample order, no shuffle.

        The last batch is smaller when `batch_size` does not divide `nsamples`, unless
        `drop_remainder`.
        """
        for batch in self.grain_dataset(batch_size, drop_remainder=drop_remainder):
            yield np.asarray(batch, dtype=np.int32)


def calibration_samples(tokenizer: Any, *, dataset: str | os.PathLike = "c4", nsamples: int = 128,
                        seqlen: int = 2048, seed: int = 0,
                        data_dir: str | os.PathLike | None = None) -> CalibrationSet:
    """Draws `nsamples` windows of `seqlen` tokens as the Wanda / SparseGPT reference code does.

    `tokenizer` is a Hugging Face tokenizer (called as `tokenizer(text)`, defaults kept).
    `dataset` is `"c4"`, `"wikitext2"` or a path to a `.txt` / `.jsonl` / `.parquet` file (see
    the module docstring). `data_dir` (else `$NNXPRUNE_DATA_DIR`) is the local data folder used
    for `"c4"`. Bad arguments, names and files are a `UserError` before any tokenization; a source
    with no document longer than `seqlen` tokens is one before sampling.
    """
    _check_int("nsamples", nsamples, 1)
    _check_int("seqlen", seqlen, 2)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer, got {seed!r}")
    nsamples, seqlen, seed = int(nsamples), int(seqlen), int(seed)
    resolved = sources.resolve_dataset(dataset)

    if resolved.kind == "wikitext2":
        text, source = sources.wikitext2_train_text()
        ids = encode(tokenizer, text)
        n = ids.size
        if n <= seqlen:
            raise UserError(f"{source} has {n} tokens, not more than seqlen {seqlen}")
        rng = random.Random(seed)
        picks = [(0, rng.randint(0, n - seqlen - 1)) for _ in range(nsamples)]
        tokens = np.stack([ids[s:s + seqlen] for _, s in picks])
        return _result(tokens, picks, resolved.name, seed, seqlen, source)

    docs, source = sources.read_documents(resolved, data_dir)
    if len(docs) == 0:
        raise UserError(f"{source} holds no documents")
    encoder = _CachedEncoder(tokenizer, docs, seqlen)
    _require_long_document(encoder, docs, seqlen, source)
    tokens, picks = _draw(encoder, len(docs), nsamples, seqlen, seed)
    return _result(tokens, picks, resolved.name, seed, seqlen, source)


# -- the sampler ---------------------------------------------------------------------------------
class _CachedEncoder:
    """Tokenizes document i on first use; keeps the ids of documents longer than seqlen and only
    the length of the others."""

    def __init__(self, tokenizer: Any, docs: Sequence[str], seqlen: int):
        self.tokenizer, self.docs, self.seqlen = tokenizer, docs, seqlen
        self.long: dict[int, np.ndarray] = {}
        self.short: dict[int, int] = {}

    def __call__(self, i: int) -> np.ndarray | None:
        """The ids of document i if it has more than seqlen tokens, else None."""
        if i in self.long:
            return self.long[i]
        if i in self.short:
            return None
        ids = encode(self.tokenizer, self.docs[i])
        if ids.size > self.seqlen:
            self.long[i] = ids
            return ids
        self.short[i] = int(ids.size)
        return None


def _draw(encoder: _CachedEncoder, n_docs: int, nsamples: int, seqlen: int,
          seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = random.Random(seed)  # the same stream as `random.seed(seed)` + `random.randint`
    tokens = np.empty((nsamples, seqlen), dtype=np.int32)
    picks: list[tuple[int, int]] = []
    for k in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            ids = encoder(i)
            if ids is not None:
                break
        start = rng.randint(0, ids.size - seqlen - 1)
        tokens[k] = ids[start:start + seqlen]
        picks.append((i, start))
    return tokens, picks


def _require_long_document(encoder: _CachedEncoder, docs: Sequence[str], seqlen: int,
                           source: str) -> None:
    """UserError unless some document has more than seqlen tokens (else the sampler never ends).

    Tries documents from the longest in characters down; stops at the first that qualifies.
    Documents too short to reach seqlen + 1 tokens even at `_MAX_TOKENS_PER_CHAR` are skipped.
    """
    lengths = _char_lengths(docs)
    longest_tokens = 0
    for i in np.argsort(-lengths, kind="stable"):
        if lengths[i] * _MAX_TOKENS_PER_CHAR + _MAX_SPECIAL_TOKENS <= seqlen:
            break
        if encoder(int(i)) is not None:
            return
        longest_tokens = max(longest_tokens, encoder.short[int(i)])
    detail = f"the longest has {longest_tokens} tokens" if longest_tokens else \
        f"the longest has {int(lengths.max())} characters"
    raise UserError(f"no document in {source} has more than seqlen={seqlen} tokens ({detail}); "
                    f"lower seqlen or use longer documents")


def _result(tokens, picks, name, seed, seqlen, source) -> CalibrationSet:
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    tokens.setflags(write=False)
    return CalibrationSet(tokens=tokens, picks=[(int(i), int(s)) for i, s in picks],
                          dataset=name, seed=seed, seqlen=seqlen, source=source)


def _char_lengths(docs: Sequence[str]) -> np.ndarray:
    if isinstance(docs, sources.ArrowTexts):
        return docs.char_lengths()
    return np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
