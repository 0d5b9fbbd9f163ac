"""Safe outputs: written whole or not at all, and never over a user's own files.

Everything nnxprune writes (checkpoints, HF folders, reports) is built under a temporary name in
the destination's folder and renamed into place at the end, so a failure or an interrupt never
leaves a half-written result behind (and never destroys the previous one before the new one is
complete). SIGTERM during a write raises `SystemExit`, so the temporary is removed as on Ctrl-C;
temporaries a killed run (SIGKILL, power loss) left are removed by the next write to the same
target. Outputs get the user's umask.

An existing output is replaced only when nnxprune wrote it (checked by `check_outputs` before any
work, and again by `atomic_dir` when it writes; `write_bytes` replaces files unless told not to): an output recorded, with its
fingerprint (a file's sha256; a folder's names and file sizes), in `registry_path()`
(`~/.local/state/nnxprune/outputs.json`) and unchanged since, or a checkpoint folder (it holds
`nnxprune.json`) that was never recorded. Anything else, a user's edits to a report or files
added to an output folder included, is refused with one line unless the caller passes
`overwrite=True` (`--overwrite`). The current folder, its parents, the home folder and `/` are
never accepted as output folders. `check_outputs` runs all of this before any work.

Example:
    >>> check_outputs(folders=["out/model"], files=["out/report.json"])
    >>> with atomic_dir("out/model") as tmp:
    ...     (tmp / "config.json").write_text("{}")
    >>> write_json("out/report.json", {"ppl": 24.19})
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from nnxprune.errors import UserError

_TMP = ".nnxprune-tmp-"  # temporaries: .NAME.nnxprune-tmp-HOST~PID-RANDOM
_permitted: set[Path] = set()  # outputs the user allowed to be replaced (check_outputs overwrite)


# -- recognising nnxprune's own outputs ------------------------------------------------------------
def registry_path() -> Path:
    """Where nnxprune records what it wrote: `{absolute path: fingerprint}` as JSON."""
    base = os.environ.get("NNXPRUNE_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state"), "nnxprune")
    return Path(base) / "outputs.json"


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes; of a folder's top-level names and file sizes."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.iterdir()):
            h.update(f"{p.name}\0{p.stat().st_size if p.is_file() else -1}\0".encode())
        return "dir:" + h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _registry() -> dict[str, str]:
    try:
        data = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(path: Path) -> None:
    """Records `path` (just written) as nnxprune's own; best effort (a read-only home only means
    a later run asks for --overwrite). Entries whose output is gone are dropped."""
    with contextlib.suppress(OSError):
        registry = {k: v for k, v in _registry().items() if os.path.lexists(k)}
        registry[str(path.resolve())] = fingerprint(path)
        target = registry_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_with(target, (json.dumps(registry, indent=1) + "\n").encode())


def is_own(path: Path) -> bool:
    """Whether nnxprune wrote `path`: an output recorded here and unchanged since, or a checkpoint
    folder (`nnxprune.json`) that was not recorded (older versions, another machine)."""
    path = Path(path)
    if not path.exists():
        return False
    digest = _registry().get(str(path.resolve()))
    if digest:  # recorded: only if unchanged since (files the user added to a folder count)
        return fingerprint(path) == digest
    return path.is_dir() and (path / "nnxprune.json").is_file()  # a checkpoint not recorded here


def protected_folders() -> set[Path]:
    """Folders never accepted as an output folder: cwd, its parents, home and the root."""
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path("/")}


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """`out/rep.json` -> `out/rep.md`; any other name gets `suffix` appended (`rep.md` ->
    `rep.md.md`), so a sibling never equals the given path."""
    path = Path(path)
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


# -- checks before any work ------------------------------------------------------------------------
def _refuse_existing(path: Path, what: str) -> None:
    raise UserError(f"{path} already exists and is not {what} nnxprune wrote; choose another name, "
                    f"or pass --overwrite to replace it")


def check_output(path: str | os.PathLike, *, folder: bool, overwrite: bool = False) -> None:
    """One output (a folder or a file): UserError unless it can be written without destroying
    anything nnxprune did not write. With `overwrite`, an existing output may be replaced."""
    path = Path(path)
    full = path.resolve()
    if folder and full in protected_folders():
        raise UserError(f"{path} ({full}) is the current folder, a parent of it, the home folder or "
                        f"the root: give a new folder for the output")
    check_writable(path)
    if not folder and full.is_dir():
        raise UserError(f"{path} is a folder; give a file name for this output")
    if full.exists() or full.is_symlink():
        own = is_own(full) and full.is_dir() == folder
        if not own and not overwrite and full not in _permitted:
            _refuse_existing(path, "a folder" if folder else "a file")
        if overwrite:
            _permitted.add(full)


def check_outputs(*, folders: Iterable = (), files: Iterable = (), overwrite: bool = False) -> None:
    """`check_output` of every given path (None entries skipped); also refuses two outputs with
    the same path."""
    seen: dict[Path, str] = {}
    for paths, is_folder in ((folders, True), (files, False)):
        for p in paths:
            if p is None:
                continue
            full = Path(p).resolve()
            if full in seen:
                raise UserError(f"two outputs share the path {p} ({seen[full]} and {p}); give "
                                f"different names")
            seen[full] = str(p)
            check_output(p, folder=is_folder, overwrite=overwrite)


def check_log_dir(path: str | os.PathLike | None) -> None:
    """A folder nnxprune adds files to (training logs, resumable checkpoints): not a file, not a
    protected folder (cwd, its parents, home, root), and creatable."""
    if path is None:
        return
    full = Path(path).resolve()
    if full in protected_folders():
        raise UserError(f"{path} ({full}) is the current folder, a parent of it, the home folder or "
                        f"the root: give a new folder for the training logs")
    if full.exists() and not full.is_dir():
        raise UserError(f"{path} is a file; the training logs need a folder")
    check_writable(path)


def check_writable(path: str | os.PathLike | None) -> None:
    """Fails fast (UserError) when `path` could not be created: checked before any work."""
    if path is None:
        return
    parent = Path(path).absolute().parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"cannot write {path}: {p} is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"cannot write {path}: {p} is not writable")
            return


def _guard(path: Path, *, folder: bool, overwrite: bool) -> None:
    """The write-time form of `check_output` (library callers that skipped it)."""
    if folder and path.resolve() in protected_folders():
        check_output(path, folder=True)  # raises
    if not path.exists():
        return
    if not folder and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for this output")
    own = is_own(path) and path.is_dir() == folder
    if not (own or overwrite or path.resolve() in _permitted):
        _refuse_existing(path, "a folder" if folder else "a file")


# -- temporaries, signals, permissions -------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{_TMP}{_host()}~{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Removes the temporaries of `target` left by runs that are no longer alive."""
    removed = []
    pattern = re.compile(re.escape(f".{target.name}{_TMP}{_host()}~") + r"(\d+)-.+")
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():  # this host's only: a pid means nothing elsewhere
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block SIGTERM raises `SystemExit(143)` (like Ctrl-C raises KeyboardInterrupt),
    so `finally` blocks run. Only in the main thread and only over the default handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace_with(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- writing ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`.

    Refuses (UserError, before yielding) an existing `out_dir` nnxprune did not write, unless
    `overwrite`; the folder written is recorded as nnxprune's own.
    """
    out_dir = Path(out_dir).absolute()
    _guard(out_dir, folder=True, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    with sigterm_exits():
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_dir), dir=out_dir.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            if out_dir.is_dir() and not out_dir.is_symlink():
                shutil.rmtree(out_dir)
            elif out_dir.exists() or out_dir.is_symlink():
                out_dir.unlink()
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _record(out_dir)


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Refuses a folder at `path`. An existing file is replaced (a library call means it; the
    commands and `run_recipe` / `run_train` refuse other people's files at startup with
    `check_outputs`); `overwrite=False` refuses one nnxprune did not write.
    """
    path = Path(path).absolute()
    _guard(path, folder=False, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with sigterm_exits():
        _replace_with(path, data)
        _record(path)
    return path


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """`write_bytes` of `text` encoded as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_figure(path: str | os.PathLike, fig: Any, *, dpi: int = 110,
                 overwrite: bool = True) -> Path:
    """`write_bytes` of a matplotlib figure rendered as PNG (build it as a bare
    `matplotlib.figure.Figure`: no pyplot, no global backend switch)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes(path, buf.getvalue(), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """`write_text` of `obj` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)
