"""Atomic writes: output appears whole or not at all.

Everything nnxprune writes (checkpoints, HF folders, reports) is built under a temporary name in
the destination's folder and renamed into place at the end, so a failure or an interrupt never
leaves a half-written result behind (and never destroys the previous one before the new one is
complete).

Example:
    >>> with atomic_dir("out/model") as tmp:
    ...     (tmp / "config.json").write_text("{}")
    >>> write_json("out/report.json", {"ppl": 24.19})
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike | None) -> None:
    """Fails fast (UserError) when `path` could not be created: checked before any work."""
    if path is None:
        return
    from nnxprune.errors import UserError

    parent = Path(path).absolute().parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"cannot write {path}: {p} is not a directory")
            if not os.access(p, os.W_OK):
                raise UserError(f"cannot write {path}: {p} is not writable")
            return


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes` of `text` encoded as UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`write_text` of `obj` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
