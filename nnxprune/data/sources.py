"""Where text comes from: the local data folder, the Hugging Face hub, local document files.

The data folder comes from `--data-dir` or `NNXPRUNE_DATA_DIR` and holds `wiki.test.raw` (one line
per row of the HF `wikitext-2-raw-v1` test split, blank rows written as a space) and
`c4_validation_2k.parquet` (C4 validation documents in file order). Without a folder the real hub
datasets are used; when the hub cannot be reached that is a one-line `UserError`, found quickly (a
short connection probe) rather than after the hub client's retries.

Two kinds of reading live here:

- `load_rows(dataset, split, data_dir)`: an evaluation split's rows as the HF split has them
  (WikiText-2 test, C4 validation), for perplexity.
- `resolve_dataset(name_or_path)` then `read_documents` / `wikitext2_train_text`: the documents
  that calibration and recovery draw from: `"c4"` (the folder's C4 validation slice, else the
  Wanda / SparseGPT reference's hub train shard), `"wikitext2"` (the hub's train split; the folder
  holds only the test split, and calibrating or training on it would leak it into the
  evaluation), or a local `.txt` (one document per non-blank line), `.jsonl` (field `text`) or
  `.parquet` (column `text`) file.

Example:
    >>> folder = resolve_data_dir(None)          # $NNXPRUNE_DATA_DIR, or None for the hub
    >>> rows = load_rows("wikitext2", "test", folder)
    >>> docs, source = read_documents(resolve_dataset("c4"), folder)
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nnxprune.errors import UserError

DATA_DIR_ENV = "NNXPRUNE_DATA_DIR"
# (dataset, split) -> file name inside the data folder
DATA_FILES: dict[tuple[str, str], str] = {
    ("wikitext2", "test"): "wiki.test.raw",
    ("c4", "validation"): "c4_validation_2k.parquet",
}
DATASETS = ("c4", "wikitext2")  # the named document sources (besides local files)
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
C4_HUB_REPO = "allenai/c4"
C4_HUB_FILE = "en/c4-train.00000-of-01024.json.gz"  # the reference's calibration shard
C4_HUB_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
_HUB_PROBE_TIMEOUT_S = 5.0
_LOCAL_FILE = f"a local {'/'.join(FILE_SUFFIXES)} file"


# -- the data folder -----------------------------------------------------------------------------
def resolve_data_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The data folder: `explicit`, else `$NNXPRUNE_DATA_DIR`, else None (use the hub).

    Empty strings count as unset. A folder that does not exist is a UserError naming it.
    """
    if explicit is not None and str(explicit) != "":
        path, origin = Path(explicit).expanduser(), "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), DATA_DIR_ENV
    else:
        return None
    if not path.exists():
        raise UserError(f"data directory {path} (from {origin}) does not exist")
    if not path.is_dir():
        raise UserError(f"data directory {path} (from {origin}) is not a directory")
    return path


def _data_file(dataset: str, split: str) -> str:
    """The local file name for (dataset, split), or UserError if none is known."""
    try:
        return DATA_FILES[(dataset, split)]
    except KeyError:
        known = ", ".join(f"{d}/{s}" for d, s in DATA_FILES)
        raise UserError(f"no data for {dataset}/{split}; known: {known}") from None


def _folder_hint(file: str) -> str:
    return f"pass --data-dir or set {DATA_DIR_ENV} to a folder with {file}"


def _local_path(dataset: str, split: str, data_dir: str | os.PathLike) -> Path:
    """The data folder's file for (dataset, split); UserError when it is missing."""
    path = Path(data_dir) / _data_file(dataset, split)
    if not path.is_file():
        raise UserError(f"data file {path} not found (needed for {dataset}/{split})")
    return path


# -- evaluation splits ---------------------------------------------------------------------------
def load_rows(dataset: str, split: str, data_dir: str | os.PathLike | None) -> list[str]:
    """The dataset's rows as the HF split has them: from `data_dir`, or the hub when it is None.

    WikiText-2 rows keep their trailing newline and blank rows are ""; C4 rows are the `text`
    column in file order.
    """
    if data_dir is None:
        return _rows_from_hub(dataset, split)
    path = _local_path(dataset, split, data_dir)
    if dataset == "wikitext2":
        return _wikitext_rows(path)
    return parquet_text(path)


def check_available(dataset: str, split: str, data_dir: str | os.PathLike | None) -> None:
    """Fails fast (UserError) when `load_rows` could not get the data: a missing local file, or,
    without a data folder, an unreachable hub. Cheap: reads nothing."""
    if data_dir is None:
        _require_hub(f"{dataset}/{split}", _folder_hint(_data_file(dataset, split)))
    else:
        _local_path(dataset, split, data_dir)


def _rows_from_hub(dataset: str, split: str) -> list[str]:
    hint = _folder_hint(_data_file(dataset, split))
    if dataset == "wikitext2":
        ds = load_hub(f"{dataset}/{split}", hint, *WIKITEXT_HUB, split=split)
    else:
        ds = load_hub(f"{dataset}/{split}", hint, C4_HUB_REPO,
                      data_files={"validation": C4_HUB_VALIDATION_FILE}, split=split)
    return _texts(ds["text"])


def _wikitext_rows(path: Path) -> list[str]:
    """One row per LF-terminated line, newline kept; whitespace-only lines become ""."""
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": endings kept as written
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    if lines[-1]:  # a last line without a newline
        rows.append(lines[-1])
    return [row if row.strip() else "" for row in rows]


# -- document sources (calibration, recovery) ----------------------------------------------------
class Dataset(NamedTuple):
    """A resolved document source: kind "c4", "wikitext2" or "file"; `name` as the user gave it."""

    kind: str
    name: str
    path: Path | None = None


def resolve_dataset(dataset: str | os.PathLike) -> Dataset:
    """Checks a document source name or file path (UserError for unknown names, missing or
    unsupported files); reads nothing."""
    if isinstance(dataset, os.PathLike):
        path = Path(dataset)
    elif isinstance(dataset, str):
        if dataset.lower() in DATASETS:
            return Dataset(dataset.lower(), dataset.lower())
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
    return Dataset("file", str(dataset), path)


def check_source(dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
    """Fails fast (UserError) when `dataset`'s documents could not be read: a bad name, a missing
    file, or c4 with a data folder that lacks the C4 slice. Reads nothing."""
    kind = resolve_dataset(dataset).kind  # bad names and missing files raise here
    folder = resolve_data_dir(data_dir)
    if kind == "c4" and folder is not None:
        check_available("c4", "validation", folder)


def read_documents(dataset: Dataset,
                   data_dir: str | os.PathLike | None) -> tuple[Sequence[str], str]:
    """(documents, source) of a "c4" or "file" dataset; `source` is the file read or the hub URL.

    "c4" is the data folder's (`data_dir`, else `$NNXPRUNE_DATA_DIR`) C4 validation slice, or
    without a folder the reference's hub train shard, read row by row. The two are different text.
    """
    if dataset.kind == "file":
        return file_documents(dataset.path), str(dataset.path.resolve())
    if dataset.kind != "c4":
        raise ValueError(f"read_documents reads c4 and files, not {dataset.kind!r}")
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        return load_rows("c4", "validation", folder), str(folder / DATA_FILES[("c4", "validation")])
    source = f"hf://datasets/{C4_HUB_REPO}/{C4_HUB_FILE}"
    hint = f"{_folder_hint(DATA_FILES[('c4', 'validation')])}, or pass {_LOCAL_FILE}"
    ds = load_hub(source, hint, C4_HUB_REPO, data_files={"train": C4_HUB_FILE}, split="train")
    return ArrowTexts(ds), source


def wikitext2_train_text() -> tuple[str, str]:
    """(text, source): the WikiText-2 raw train rows joined with " " (as the reference does)."""
    source = f"hf://datasets/{WIKITEXT_HUB[0]}/{WIKITEXT_HUB[1]}/train"
    ds = load_hub(source, f"pass {_LOCAL_FILE} instead", *WIKITEXT_HUB, split="train")
    return " ".join(_texts(ds["text"])), source


def file_documents(path: Path) -> list[str]:
    """The documents of a local file: `.txt` non-blank lines (line ending dropped), `.jsonl`
    objects' `text`, `.parquet` column `text`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_text(path)
    if suffix == ".txt":
        return [line for line in _text_lines(path) if line.strip()]
    docs = []
    for number, row in jsonl_records(path):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: expected an object with a string field 'text'")
        docs.append(text)
    return docs


def _text_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n and \r end lines too
            return f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def jsonl_records(path) -> list[tuple[int, Any]]:
    """`(line number, value)` of every non-blank line of a JSONL file: the one JSONL reader of
    documents and instruction records. UserError naming the file and line of the first line that
    is not JSON."""
    records = []
    for number, line in enumerate(_text_lines(Path(path)), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return records


def parquet_text(path: Path) -> list[str]:
    """The `text` column of a parquet file, in file order (nulls as "")."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as e:  # pyarrow raises several types for bad files and missing columns
        raise UserError(f"cannot read column 'text' of {path}: {_one_line(e)}") from None
    return _texts(table.column("text").to_pylist())


class ArrowTexts(Sequence):
    """The `text` column of a `datasets.Dataset`, read one row at a time (no list of all texts)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        text = self.ds[int(i)]["text"]
        return text if text is not None else ""

    def char_lengths(self) -> np.ndarray:
        """Every row's length in characters (nulls 0), from one Arrow read."""
        import pyarrow.compute as pc

        column = self.ds.with_format("arrow")[:]["text"]  # one Arrow read, no Python strings
        return np.asarray(pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False),
                          dtype=np.int64)


def _texts(values) -> list[str]:
    """A text column as a list of strings, nulls as ""."""
    return [t if t is not None else "" for t in values]


# -- the hub -------------------------------------------------------------------------------------
def load_hub(what: str, hint: str, *args: Any, **kwargs: Any):
    """`datasets.load_dataset(*args, **kwargs)`, with an unreachable hub found quickly and every
    failure a one-line UserError naming `what` and ending with `hint` (the local alternative)."""
    _require_hub(what, hint)
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # connection, cache-miss and not-found errors come in many types
        raise UserError(f"cannot load {what} from the Hugging Face hub ({_one_line(e)}); "
                        f"{hint}") from None


def _require_hub(what: str, hint: str) -> None:
    """UserError unless `datasets` is installed and the hub is reachable (or offline mode is on)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UserError(f"package 'datasets' is needed to load {what} from the hub; {hint}") from None
    if not _hub_offline() and not _hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {what}; {hint}")


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    """Whether the user asked for offline mode (then only the local HF cache is used)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    msg = str(error).strip().splitlines()
    return f"{type(error).__name__}: {msg[0]}" if msg else type(error).__name__
