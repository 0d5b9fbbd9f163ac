"""Documents read lazily from files: the random-access sources behind the streamed training data
(`data.grain_stream`), so a corpus of billions of tokens is never held in memory.

Each reader is a `Sequence[str]` (what `grain.MapDataset.source` takes): `len` is known after a
cheap first look and `docs[i]` reads one document.

- `.parquet` (column `text`): the row counts come from the file's footer; a document is read from
  its row group, of which the last `ROW_GROUP_CACHE` are kept as Arrow arrays (documents read in
  file order touch each row group once; a shuffled read of a file with large row groups decodes
  a row group per document, so for big corpora pre-shuffled files with `shuffle = false` are fast).
- `.jsonl` (field `text` of each line's object) and `.txt` (one document per line): one pass over
  the bytes finds the line starts (8 bytes per line kept, nothing else); `docs[i]` seeks to its
  line. Blank lines are documents without text, which the packing skips (as `training.pack` skips
  them), so `.txt` gives the documents of `sources.file_documents` (its non-blank lines); lines end
  at `\\n`, a `\\r` before it is dropped. A line that is not a JSON object with a string `text` is
  a `UserError` naming the file and line when it is read (`check` reads the first lines early).
- Several files: a glob pattern (`shards/*.parquet`), read in sorted path order, one after the
  other.
- `"c4"` is the data folder's C4 slice, read the parquet way; without a folder, and for
  `"wikitext2"`, the documents come from `training.documents` (the hub).

Example:
    >>> docs, source = open_documents("/data/c4/*.parquet")
    >>> len(docs), docs[0][:40]
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnxprune.data import sources
from nnxprune.errors import UserError

ROW_GROUP_CACHE = 2  # parquet row groups kept decoded per file
_CHUNK = 1 << 24  # bytes read at a time when indexing lines
_GLOB = set("*?[")


class ParquetDocuments(Sequence):
    """The `text` column of a parquet file, one row group read at a time."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise UserError(f"cannot read {self.path}: {sources._one_line(e)}") from None
        if "text" not in self._file.schema_arrow.names:
            raise UserError(f"{self.path} has no column 'text' (columns: "
                            f"{', '.join(self._file.schema_arrow.names)})")
        meta = self._file.metadata
        counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._groups: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        i = _index(i, len(self))
        g = int(np.searchsorted(self._starts, i, side="right") - 1)
        column = self._groups.get(g)
        if column is None:
            column = self._file.read_row_group(g, columns=["text"]).column("text")
            self._groups[g] = column
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(g)
        text = column[i - int(self._starts[g])].as_py()
        return text if text is not None else ""


class LineDocuments(Sequence):
    """The lines of a `.txt` file, or the `text` of a `.jsonl` file's lines, read by seeking."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        try:
            self._starts = _line_starts(self.path)
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for the reads
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e}") from None

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i):
        i = _index(i, len(self))
        start, end = int(self._starts[i]), int(self._starts[i + 1])
        self._f.seek(start)
        raw = self._f.read(end - start).rstrip(b"\n").rstrip(b"\r")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}:{i + 1}: not UTF-8 ({e.reason})") from None
        if not self.jsonl:
            return line
        if not line.strip():
            return ""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path}:{i + 1}: not valid JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{self.path}:{i + 1}: expected an object with a string field 'text'")
        return text

    def __del__(self):
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()


def _line_starts(path: Path) -> np.ndarray:
    """Byte offsets where each line starts, plus the end of the file (int64, lines + 1)."""
    starts = [np.zeros(1, np.int64)]
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + offset + 1)
            offset += len(chunk)
    out = np.concatenate(starts)
    if out[-1] != offset:  # the last line has no newline: it ends at the end of the file
        out = np.append(out, offset)
    return out


class ConcatDocuments(Sequence):
    """Several document sequences read one after the other."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts],
                                                      dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        i = _index(i, len(self))
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.parts[k][i - int(self._starts[k])]


def _index(i, n: int) -> int:
    if isinstance(i, slice):
        raise TypeError("document readers take one index at a time")
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"document {i} of {n}")
    return i


def is_glob(dataset) -> bool:
    return isinstance(dataset, str) and bool(_GLOB & set(dataset))


def files_of(dataset: str) -> list[Path]:
    """The files a dataset names: one path, or a glob's matches in sorted order (UserError when
    a file is missing, none matches, or one has an unsupported type)."""
    if not is_glob(dataset):
        resolved = sources.resolve_dataset(dataset)
        if resolved.kind != "file":
            raise ValueError(f"{dataset!r} is not a file")
        return [resolved.path]
    paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(dataset))) if Path(p).is_file()]
    if not paths:
        raise UserError(f"no file matches {dataset!r}")
    bad = [p.name for p in paths if p.suffix.lower() not in sources.FILE_SUFFIXES]
    if bad:
        raise UserError(f"{dataset!r} matches files of an unsupported type ({', '.join(bad[:3])}); "
                        f"use {', '.join(sources.FILE_SUFFIXES)}")
    return paths


def _file_reader(path: Path) -> Sequence:
    return ParquetDocuments(path) if path.suffix.lower() == ".parquet" else LineDocuments(path)


def open_documents(dataset: str, data_dir=None) -> tuple[Sequence, str]:
    """(lazy documents, where they come from) of "c4", "wikitext2", a file or a glob."""
    if not is_glob(dataset):
        kind = sources.resolve_dataset(dataset).kind
        folder = sources.resolve_data_dir(data_dir) if kind == "c4" else None
        if kind == "c4" and folder is not None:
            sources.check_available("c4", "validation", folder)
            path = folder / sources.DATA_FILES[("c4", "validation")]
            return ParquetDocuments(path), str(path.resolve())
        if kind != "file":  # the hub (random access already: ArrowTexts, or the WikiText parts)
            from nnxprune.data.training import documents

            return documents(dataset, data_dir)
    paths = files_of(dataset)
    readers = [_file_reader(p) for p in paths]
    if len(readers) == 1:
        return readers[0], str(paths[0].resolve())
    return ConcatDocuments(readers), f"{dataset} ({len(paths)} files)"


def check(dataset: str, data_dir=None, *, lines: int = 100) -> None:
    """Fails fast (UserError) when `open_documents` would fail or its first `lines` documents are
    unreadable (no tokenizing; a JSONL file is indexed and its first lines parsed)."""
    if not is_glob(dataset):
        sources.check_source(dataset, data_dir)
        if sources.resolve_dataset(dataset).kind != "file":
            return
    docs, _ = open_documents(dataset, data_dir)
    for i in range(min(lines, len(docs))):
        docs[i]
    if len(docs) == 0:
        raise UserError(f"{dataset} holds no documents")
