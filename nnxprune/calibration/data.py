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

Sources:
- `"c4"`: with a data folder (`data_dir`, else `$NNXPRUNE_DATA_DIR`), its C4 validation slice
  `c4_validation_2k.parquet` (documents in file order); without one, the reference's own source,
  the hub's `allenai/c4` train shard `en/c4-train.00000-of-01024.json.gz`. The two are different
  text; `CalibrationSet.source` says which was used.
- `"wikitext2"`: the hub's `wikitext-2-raw-v1` train split (the data folder holds only the test
  split, and calibrating on the test split would leak it into the evaluation).
- a local file, by path: `.txt` (one document per line; lines that are empty or only whitespace
  are skipped, the line ending is dropped), `.jsonl` (one JSON object per non-blank line, field
  `text`), `.parquet` (column `text`). Picks index the documents in that order (for `.txt`, the
  n-th non-empty line).

A source with no document longer than `seqlen` tokens would make the reference loop forever;
here it is a `UserError`, found before sampling by tokenizing documents from the longest (in
characters) down until one qualifies; usually the first does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnxprune.errors import UserError
from nnxprune.evaluate import data as evaldata

DATASETS = ("c4", "wikitext2")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
C4_HUB_REPO = "allenai/c4"
C4_HUB_FILE = "en/c4-train.00000-of-01024.json.gz"  # the reference's calibration shard
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
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
    kind, name, path = _resolve_dataset(dataset)

    if kind == "wikitext2":
        text, source = _wikitext2_train_text()
        ids = _encode(tokenizer, text)
        n = ids.size
        if n <= seqlen:
            raise UserError(f"{source} has {n} tokens, not more than seqlen {seqlen}")
        rng = random.Random(seed)
        picks = [(0, rng.randint(0, n - seqlen - 1)) for _ in range(nsamples)]
        tokens = np.stack([ids[s:s + seqlen] for _, s in picks])
        return _result(tokens, picks, name, seed, seqlen, source)

    if kind == "c4":
        docs, source = _c4_documents(data_dir)
    else:
        docs, source = _file_documents(path), str(path.resolve())
    if len(docs) == 0:
        raise UserError(f"{source} holds no documents")
    encoder = _CachedEncoder(tokenizer, docs, seqlen)
    _require_long_document(encoder, docs, seqlen, source)
    tokens, picks = _draw(encoder, len(docs), nsamples, seqlen, seed)
    return _result(tokens, picks, name, seed, seqlen, source)


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
        ids = _encode(self.tokenizer, self.docs[i])
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


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    """`tokenizer(text).input_ids` (defaults, as the reference) as int32."""
    # verbose=False: documents longer than the model's context are expected here
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise UserError("token ids do not fit in int32")
    return ids.astype(np.int32)


def _result(tokens, picks, name, seed, seqlen, source) -> CalibrationSet:
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    tokens.setflags(write=False)
    return CalibrationSet(tokens=tokens, picks=[(int(i), int(s)) for i, s in picks],
                          dataset=name, seed=seed, seqlen=seqlen, source=source)


# -- sources -------------------------------------------------------------------------------------
def _resolve_dataset(dataset: str | os.PathLike) -> tuple[str, str, Path | None]:
    """(kind, name, path): kind is "c4", "wikitext2" or "file"."""
    if isinstance(dataset, os.PathLike):
        path = Path(dataset)
    elif isinstance(dataset, str):
        if dataset.lower() in DATASETS:
            return dataset.lower(), dataset.lower(), None
        path = Path(dataset).expanduser()
        looks_like_file = path.suffix.lower() in FILE_SUFFIXES or os.sep in dataset \
            or (os.altsep is not None and os.altsep in dataset) or path.exists()
        if not looks_like_file:
            hint = difflib.get_close_matches(dataset.lower(), DATASETS, n=1, cutoff=0.4)
            did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
            raise UserError(f"unknown calibration dataset '{dataset}'; {did_you_mean}known: "
                            f"{', '.join(DATASETS)}, or a {'/'.join(FILE_SUFFIXES)} file")
    else:
        raise UserError(f"dataset must be a name or a file path, got {dataset!r}")
    if not path.exists():
        raise UserError(f"calibration file {path} not found")
    if not path.is_file():
        raise UserError(f"calibration file {path} is not a file")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"calibration file {path} has an unsupported type '{path.suffix}'; "
                        f"use {', '.join(FILE_SUFFIXES)}")
    return "file", str(dataset), path


def _file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return evaldata._parquet_text(path)
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n and \r end lines too
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if suffix == ".txt":
        return [line for line in lines if line.strip()]
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: expected an object with a string field 'text'")
        docs.append(text)
    return docs


def _c4_documents(data_dir: str | os.PathLike | None) -> tuple[Sequence[str], str]:
    """The local C4 validation slice, or without a data folder the reference's hub train shard."""
    folder = evaldata.resolve_data_dir(data_dir)
    if folder is not None:
        evaldata.check_available("c4", "validation", folder)
        name = evaldata.DATA_FILES[("c4", "validation")]
        return evaldata.load_rows("c4", "validation", folder), str(folder / name)
    source = f"hf://datasets/{C4_HUB_REPO}/{C4_HUB_FILE}"
    ds = _load_hub(source, "c4", C4_HUB_REPO, data_files={"train": C4_HUB_FILE}, split="train")
    return _ArrowTexts(ds), source


def _wikitext2_train_text() -> tuple[str, str]:
    """The WikiText-2 raw train rows joined with " " (as the reference joins them)."""
    source = f"hf://datasets/{WIKITEXT_HUB[0]}/{WIKITEXT_HUB[1]}/train"
    ds = _load_hub(source, "wikitext2", *WIKITEXT_HUB, split="train")
    return " ".join(t if t is not None else "" for t in ds["text"]), source


def _load_hub(source: str, name: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`, with an unreachable hub found quickly and every
    failure a one-line UserError."""
    hint = (f"calibration set '{name}' needs the Hugging Face hub ({source})"
            + ("; or pass --data-dir / set NNXPRUNE_DATA_DIR to a folder with "
               "c4_validation_2k.parquet" if name == "c4" else "")
            + "; or pass a local .txt/.jsonl/.parquet file")
    try:
        import datasets
    except ImportError:
        raise UserError(f"package 'datasets' is needed; {hint}") from None
    if not evaldata._hub_offline() and not evaldata._hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub: {hint}")
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # connection, cache-miss and not-found errors come in many types
        raise UserError(f"cannot load {source} ({evaldata._one_line(e)}); {hint}") from None


class _ArrowTexts(Sequence):
    """The `text` column of a `datasets.Dataset`, read one row at a time (no list of all texts)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        text = self.ds[int(i)]["text"]
        return text if text is not None else ""

    def char_lengths(self) -> np.ndarray:
        import pyarrow.compute as pc

        column = self.ds.with_format("arrow")[:]["text"]  # one Arrow read, no Python strings
        return np.asarray(pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False),
                          dtype=np.int64)


def _char_lengths(docs: Sequence[str]) -> np.ndarray:
    if isinstance(docs, _ArrowTexts):
        return docs.char_lengths()
    return np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


__all__ = ["CalibrationSet", "calibration_samples", "DATASETS", "FILE_SUFFIXES"]
