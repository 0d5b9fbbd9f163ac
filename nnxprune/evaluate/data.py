"""Evaluation text: rows from a local data folder or the Hugging Face hub, one token stream, windows.

The folder comes from `--data-dir` or `NNXPRUNE_DATA_DIR` and holds `wiki.test.raw` (one line per
row of the HF `wikitext-2-raw-v1` test split, blank rows written as a space) and
`c4_validation_2k.parquet` (C4 validation documents in file order). Without a folder the real hub
datasets are used; when the hub cannot be reached that is a one-line `UserError`, found quickly
(a short connection probe) rather than after the hub client's retries.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from nnxprune.errors import UserError
from nnxprune.evaluate.protocol import PerplexityProtocol

DATA_DIR_ENV = "NNXPRUNE_DATA_DIR"
# (dataset, split) -> file name inside the data folder
DATA_FILES: dict[tuple[str, str], str] = {
    ("wikitext2", "test"): "wiki.test.raw",
    ("c4", "validation"): "c4_validation_2k.parquet",
}
_HUB_PROBE_TIMEOUT_S = 5.0
_HINT = f"pass --data-dir or set {DATA_DIR_ENV} to a folder with {{file}}"


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


def load_rows(dataset: str, split: str, data_dir: str | os.PathLike | None) -> list[str]:
    """The dataset's rows as the HF split has them: from `data_dir`, or the hub when it is None.

    WikiText-2 rows keep their trailing newline and blank rows are ""; C4 rows are the `text`
    column in file order.
    """
    name = _data_file(dataset, split)
    if data_dir is None:
        return _rows_from_hub(dataset, split, name)
    path = Path(data_dir) / name
    if not path.is_file():
        raise UserError(f"data file {path} not found (needed for {dataset}/{split})")
    if dataset == "wikitext2":
        return _wikitext_rows(path)
    return _parquet_text(path)


def check_available(dataset: str, split: str, data_dir: str | os.PathLike | None) -> None:
    """Fails fast (UserError) when `load_rows` could not get the data: a missing local file, or,
    without a data folder, an unreachable hub. Cheap: reads nothing."""
    name = _data_file(dataset, split)
    if data_dir is None:
        if not _hub_offline() and not _hub_reachable():
            raise UserError(f"cannot reach the Hugging Face hub to load {dataset}/{split}; "
                            f"{_HINT.format(file=name)}")
        return
    path = Path(data_dir) / name
    if not path.is_file():
        raise UserError(f"data file {path} not found (needed for {dataset}/{split})")


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


def _parquet_text(path: Path) -> list[str]:
    """The `text` column of a parquet file, in file order (nulls as "")."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as e:  # pyarrow raises several types for bad files and missing columns
        raise UserError(f"cannot read column 'text' of {path}: {_one_line(e)}") from None
    return [t if t is not None else "" for t in table.column("text").to_pylist()]


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    msg = str(error).strip().splitlines()
    return f"{type(error).__name__}: {msg[0]}" if msg else type(error).__name__


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


def _rows_from_hub(dataset: str, split: str, file: str) -> list[str]:
    """The rows via `datasets.load_dataset`, with hub failures turned into one-line UserErrors."""
    hint = _HINT.format(file=file)
    try:
        import datasets
    except ImportError:
        raise UserError(f"package 'datasets' is needed to load {dataset} from the hub; {hint}") from None
    if not _hub_offline() and not _hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {dataset}/{split}; {hint}")
    try:
        if dataset == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split=split)
        return [t if t is not None else "" for t in ds["text"]]
    except Exception as e:  # connection, cache-miss and not-found errors come in many types
        raise UserError(f"cannot load {dataset}/{split} from the Hugging Face hub "
                        f"({_one_line(e)}); {hint}") from None


def token_stream(protocol: PerplexityProtocol, tokenizer: Any,
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
    text = protocol.join.join(rows)
    # verbose=False: the whole stream is longer than the model's context, which is fine here
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    stream = np.asarray(ids, dtype=np.int64)
    if protocol.add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UserError("the protocol asks for a BOS token but the tokenizer has none")
        stream = np.concatenate([np.asarray([bos], dtype=np.int64), stream])
    if stream.size and (stream.min() < 0 or stream.max() > np.iinfo(np.int32).max):
        raise UserError("token ids do not fit in int32")
    return stream.astype(np.int32)


def windows(stream: np.ndarray, protocol: PerplexityProtocol) -> np.ndarray:
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
