"""Safe outputs: written whole or not at all, and never over a user's own files.

Everything nnxprune writes (checkpoints, HF folders, reports, training logs) is built under a
temporary name in the destination's folder and renamed into place at the end, so a failure or
an interrupt never leaves a half-written result behind (and never destroys the previous one
before the new one is complete). SIGINT, SIGTERM and SIGHUP stop a write at its safe point, just
before the rename (`nnxprune.interrupt`): the temporary is removed and the previous output kept.
Temporaries a killed run (SIGKILL, power loss) left are removed by the next write to the same
target, except one a resumable run takes over (`atomic_dir(adopt=...)`, `prune --stream
--resume`, `io.resumable`). Outputs get the user's umask.

An existing output is replaced only when nnxprune wrote it and nothing changed it since: recorded
with its fingerprint (its whole tree, by content; `io.ownership`) and unchanged. Anything else, a
user's folder holding its own `nnxprune.json`, a file added two levels down in a checkpoint, an
edited report, is refused with one line unless the caller passes `overwrite=True` (`--overwrite`).
A symbolic link at an output path is never written through or replaced, even with `overwrite`.
The current folder, its parents, the home folder and `/` are never accepted as output folders.

`check_outputs` runs these checks before any work. Within `run_outputs()` (one command, one
`run_recipe`) what it saw is checked again at write time: an output that appeared, changed or
became a link while the run worked is not replaced. Training-log folders follow the same rules
(`check_log_dir`, `prepare_log_dir`); an empty folder is accepted as one.

Example:
    >>> with run_outputs():
    ...     check_outputs(folders=["out/model"], files=["out/report.json"])
    ...     with atomic_dir("out/model") as tmp:
    ...         (tmp / "config.json").write_text("{}")
    ...     write_json("out/report.json", {"ppl": 24.19})
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nnxprune import interrupt, multihost
from nnxprune.errors import UserError
from nnxprune.io import ownership

_TMP = ".nnxprune-tmp-"  # temporaries: .NAME.nnxprune-tmp-HOST~PID-RANDOM
_permitted: set[Path] = set()  # outputs the user allowed to be replaced (check_outputs overwrite)
_checked: dict[Path, str] = {}  # within run_outputs(): output -> fingerprint at check ('' absent)
_session_depth = 0


# -- recognising nnxprune's own outputs ------------------------------------------------------------
def registry_path() -> Path:
    """Where nnxprune records what it wrote (`io.ownership`)."""
    return ownership.registry_path()


def fingerprint(path: Path) -> str:
    """The fingerprint an output is recorded with (`io.ownership.fingerprint`)."""
    return ownership.fingerprint(path)


def _record(path: Path) -> None:
    if not multihost.is_primary():  # a multi-process run: process 0 records what all wrote
        return
    ownership.record(path, _replace_with)
    if path in _checked:  # written by this run: a later write in the same run may replace it
        _checked[path] = fingerprint(path)


def is_own(path: Path) -> bool:
    """Whether nnxprune wrote `path` and nothing changed it since (`io.ownership.is_own`)."""
    return ownership.is_own(path)


def protected_folders() -> set[Path]:
    """Folders never accepted as an output folder: cwd, its parents, home and the root."""
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path("/")}


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """`out/rep.json` -> `out/rep.md`; any other name gets `suffix` appended (`rep.md` ->
    `rep.md.md`), so a sibling never equals the given path."""
    path = Path(path)
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def _full(path: str | os.PathLike) -> Path:
    """Absolute, its folder resolved, its last part kept (a link stays the link)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


# -- checks before any work ------------------------------------------------------------------------
def _refuse_existing(path: Path, what: str) -> None:
    raise UserError(f"{path} already exists and is not {what} nnxprune wrote; choose another name, "
                    f"or pass --overwrite to replace it")


def _refuse_link(path: Path) -> None:
    if Path(path).is_symlink():
        raise UserError(f"{path} is a symbolic link; nnxprune neither writes through nor replaces "
                        f"links: give another name")


@contextlib.contextmanager
def run_outputs() -> Iterator[None]:
    """One run's outputs: `check_outputs` inside records what each output was, and every write
    checks it is still that (nested blocks share the outermost)."""
    global _session_depth
    _session_depth += 1
    try:
        yield
    finally:
        _session_depth -= 1
        if _session_depth == 0:
            _checked.clear()
            _permitted.clear()


def check_output(path: str | os.PathLike, *, folder: bool, overwrite: bool = False) -> None:
    """One output (a folder or a file): UserError unless it can be written without destroying
    anything nnxprune did not write. With `overwrite`, an existing output may be replaced."""
    path = Path(path)
    full = _full(path)
    if folder and full.resolve() in protected_folders():
        raise UserError(f"{path} ({full}) is the current folder, a parent of it, the home folder or "
                        f"the root: give a new folder for the output")
    _refuse_link(full)
    check_writable(path)
    if not folder and full.is_dir():
        raise UserError(f"{path} is a folder; give a file name for this output")
    if full.exists():
        own = is_own(full) and full.is_dir() == folder
        if not own and not overwrite and full not in _permitted:
            _refuse_existing(path, "a folder" if folder else "a file")
        if overwrite:
            _permitted.add(full)
    if _session_depth:
        _checked[full] = fingerprint(full)


def check_outputs(*, folders: Iterable = (), files: Iterable = (), overwrite: bool = False) -> None:
    """`check_output` of every given path (None entries skipped); also refuses two outputs with
    the same path."""
    seen: dict[Path, str] = {}
    for paths, is_folder in ((folders, True), (files, False)):
        for p in paths:
            if p is None:
                continue
            full = _full(p)
            if full in seen:
                raise UserError(f"two outputs share the path {p} ({seen[full]} and {p}); give "
                                f"different names")
            seen[full] = str(p)
            check_output(p, folder=is_folder, overwrite=overwrite)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_log_dir(path: str | os.PathLike | None, *, overwrite: bool = False,
                  outputs: Iterable = ()) -> None:
    """A folder nnxprune adds files to (training logs, resumable checkpoints), under the same
    rules as every output: not a file, a link or a protected folder (cwd, its parents, home,
    root), not one of the run's `outputs` nor inside or around one; when it exists, a log folder
    nnxprune wrote and nothing changed since (a rerun resumes from it), or an empty one, or
    `overwrite` (it is then replaced)."""
    if path is None:
        return
    full = _full(path)
    for other in (o for o in outputs if o is not None):
        o = _full(other)
        if o == full or o.is_relative_to(full) or full.is_relative_to(o):
            raise UserError(f"the training logs {path} and the output {other} would share files; "
                            f"give --train-dir a folder of its own")
    if full.resolve() in protected_folders():
        raise UserError(f"{path} ({full}) is the current folder, a parent of it, the home folder or "
                        f"the root: give a new folder for the training logs")
    _refuse_link(full)
    if full.exists() and not full.is_dir():
        raise UserError(f"{path} is a file; the training logs need a folder")
    check_writable(path)
    if full.exists() and not (is_own(full) or _is_empty_dir(full)):
        if not overwrite and full not in _permitted:
            raise UserError(f"{path} already exists and is not a training-log folder nnxprune wrote "
                            f"(or it changed since); choose another --train-dir, or pass "
                            f"--overwrite to replace it")
        _permitted.add(full)
    if _session_depth:
        _checked[full] = fingerprint(full)


def prepare_log_dir(path: str | os.PathLike) -> Path:
    """Makes `path` the run's log folder at write time: checked again (`check_log_dir`'s rules,
    and unchanged since that check within `run_outputs()`); a permitted folder that is not
    nnxprune's is replaced by an empty one. Recorded as nnxprune's own. In a multi-process run
    process 0 prepares it while the others wait."""
    full = _full(path)
    if not multihost.is_primary():
        multihost.barrier("nnxprune prepare_log_dir")
        return full
    _refuse_link(full)
    if full in _checked and fingerprint(full) != _checked[full]:
        raise UserError(f"{path} changed while nnxprune ran; it was not touched. Give another "
                        f"--train-dir")
    if full.exists() and not (is_own(full) or _is_empty_dir(full)):
        if full not in _permitted:
            raise UserError(f"{path} already exists and is not a training-log folder nnxprune "
                            f"wrote; choose another --train-dir, or pass --overwrite to replace it")
        if full.resolve() in protected_folders():  # never, even when permitted
            check_log_dir(full)
        shutil.rmtree(full)
    full.mkdir(parents=True, exist_ok=True)
    _record(full)
    multihost.barrier("nnxprune prepare_log_dir")
    return full


def record_log_dir(path: str | os.PathLike) -> None:
    """Records the log folder's current content as nnxprune's own (after each write to it)."""
    _record(_full(path))


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
    """The write-time form of `check_output`: also refuses an output that changed since
    `check_outputs` saw it in this run (it appeared, was edited, or became a link)."""
    if folder and path.resolve() in protected_folders():
        check_output(path, folder=True)  # raises
    _refuse_link(path)
    if path in _checked and fingerprint(path) != _checked[path]:
        raise UserError(f"{path} appeared or changed while nnxprune ran, after the check at "
                        f"startup; it was not replaced. Choose another name")
    if not path.exists():
        return
    if not folder and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for this output")
    own = is_own(path) and path.is_dir() == folder
    if not (own or overwrite or path in _permitted):
        _refuse_existing(path, "a folder" if folder else "a file")


# -- temporaries, permissions ----------------------------------------------------------------------
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


def stale_temporaries(target: Path) -> list[Path]:
    """The temporaries of `target` on this host left by runs that are no longer alive."""
    found = []
    pattern = re.compile(re.escape(f".{target.name}{_TMP}{_host()}~") + r"(\d+)-.+")
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():  # this host's only: a pid means nothing elsewhere
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                found.append(p)
    return found


def remove_stale_temporaries(target: Path, keep: Iterable[Path] = ()) -> list[Path]:
    """Removes the temporaries of `target` left by runs that are no longer alive (but `keep`)."""
    removed = [p for p in stale_temporaries(target) if p not in set(keep)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def _apply_umask(folder: Path) -> None:
    """Gives every file under `folder` mode 0666 and every folder 0777, less the umask (as `open`
    would): writers such as safetensors make their files 0600 whatever the umask."""
    mask = _umask()
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


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
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               adopt: Callable[[list[Path]], Path | None] | None = None,
               keep: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`.

    Refuses (UserError, before yielding) an existing `out_dir` nnxprune did not write, unless
    `overwrite`, and checks again just before the rename (a folder that appeared or changed in
    the meantime is not replaced); the folder written is recorded as nnxprune's own.

    A resumable run (`io.resumable`) passes `adopt`: given the stale temporaries of `out_dir`, it
    returns one to continue in (or None); that one is kept, renamed to this process's name and
    yielded with what it holds, and the other stale ones are removed as usual. With `keep` an
    interrupt (a signal at a safe point, Ctrl-C) leaves the temporary in place for a later run
    to adopt; any other failure removes it.

    In a multi-process run (`multihost`) every process gets the same folder (process 0 makes it
    and its name is agreed; Orbax's multi-process save needs one directory), and process 0 alone
    checks, renames and records it once every process is done writing.
    """
    out_dir = _full(out_dir)
    primary, reuse = multihost.is_primary(), None
    if primary:
        _guard(out_dir, folder=True, overwrite=overwrite)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        reuse = adopt(stale_temporaries(out_dir)) if adopt is not None else None
        remove_stale_temporaries(out_dir, keep=[reuse] if reuse else [])
    with interrupt.handled():
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix(out_dir), dir=out_dir.parent) if primary else None
        if primary and reuse:
            os.replace(reuse, tmp)  # onto the empty folder: now this live process's temporary
        tmp = Path(multihost.agree_text(tmp))  # process 0's name, in every process
        try:
            yield tmp
            multihost.barrier("nnxprune atomic_dir written")  # every process wrote its part
            if primary:
                interrupt.stop_if_requested()  # the safe point: the previous output is still whole
                _guard(out_dir, folder=True, overwrite=overwrite)
                _apply_umask(tmp)  # every file and folder of the output gets the user's umask
                if out_dir.is_dir():
                    shutil.rmtree(out_dir)
                elif out_dir.exists():
                    out_dir.unlink()
                os.replace(tmp, out_dir)
                _record(out_dir)
            multihost.barrier("nnxprune atomic_dir renamed")  # in place before anyone reads it
        except BaseException as e:
            if primary and not (keep and isinstance(e, (interrupt.Interrupted, KeyboardInterrupt))):
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Refuses a folder or a link at `path`. An existing file is replaced (a library call means it;
    the commands and `run_recipe` / `run_train` refuse other people's files at startup with
    `check_outputs`, and a file that appeared or changed since, here); `overwrite=False` refuses
    one nnxprune did not write. In a multi-process run only process 0 writes.
    """
    path = _full(path)
    if not multihost.is_primary():
        return path
    _guard(path, folder=False, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with interrupt.handled():
        interrupt.stop_if_requested()
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
