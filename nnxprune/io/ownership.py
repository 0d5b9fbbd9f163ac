"""Which outputs nnxprune wrote: a registry of fingerprints, compared by content.

Every output nnxprune writes (a checkpoint or HF folder, a report, a training-log folder) is
recorded with its fingerprint in `registry_path()` (`~/.local/state/nnxprune/outputs.json`, or
`$NNXPRUNE_STATE_DIR`). An existing path counts as nnxprune's own only when it is recorded there
and its fingerprint is still the recorded one. Nothing else makes a folder nnxprune's: a user's
folder that happens to hold a file named `nnxprune.json`, or a copied checkpoint with the user's
`NOTES.md` added, is the user's.

The fingerprint of a file is the sha256 of its bytes. That of a folder covers the whole tree, not
only its top level: every entry's relative path and kind (file, folder, link and its target), and
for each file its size, its modification time in nanoseconds and, for files up to
`HASHED_BYTES`, the sha256 of its bytes. A file added two levels down changes the listing; an
edit changes the modification time, and a same-size edit of a small file (a `config.json`) that
also restores the time still changes the hash. Big weight files are not read (an 8B checkpoint
would take minutes): their size and time stand for them.

Example:
    >>> record(Path("out/model"))
    >>> is_own(Path("out/model"))
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

HASHED_BYTES = 1 << 20  # files up to 1 MiB are hashed; larger ones by size and mtime


def registry_path() -> Path:
    """Where nnxprune records what it wrote: `{absolute path: fingerprint}` as JSON."""
    base = os.environ.get("NNXPRUNE_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state"), "nnxprune")
    return Path(base) / "outputs.json"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: Path) -> str:
    """A file: sha256 of its bytes. A folder: its whole tree (module docstring). A link: its
    target. A missing path: ''."""
    path = Path(path)
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if not path.exists():
        return ""
    if not path.is_dir():
        return _file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        rel_root = Path(root).relative_to(path)
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            p = Path(root) / name
            st = p.lstat()
            if p.is_symlink():
                h.update(f"L\0{rel_root / name}\0{os.readlink(p)}\0".encode())
            elif p.is_file():
                digest = _file_digest(p) if st.st_size <= HASHED_BYTES else ""
                h.update(f"F\0{rel_root / name}\0{st.st_size}\0{st.st_mtime_ns}\0{digest}\0".encode())
            else:  # a fifo, socket or device: never ours
                h.update(f"X\0{rel_root / name}\0".encode())
        for name in dirs:
            h.update(f"D\0{rel_root / name}\0".encode())
    return "tree:" + h.hexdigest()


def _key(path: Path) -> str:
    """The registry key: the absolute path with its folder resolved and its last part kept (a
    link is recorded as itself, never as its target)."""
    path = Path(path).absolute()
    return str(path.parent.resolve() / path.name)


def _registry() -> dict[str, str]:
    try:
        data = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(path: Path, write) -> None:
    """Records `path` (just written) as nnxprune's own, through `write(target, bytes)` (an atomic
    replace); best effort (a read-only home only means a later run asks for --overwrite).
    Entries whose output is gone are dropped."""
    with contextlib.suppress(OSError):
        registry = {k: v for k, v in _registry().items() if os.path.lexists(k)}
        registry[_key(path)] = fingerprint(path)
        target = registry_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target, (json.dumps(registry, indent=1) + "\n").encode())


def is_own(path: Path) -> bool:
    """Whether nnxprune wrote `path` and nothing changed it since: recorded in the registry with
    the fingerprint it has now."""
    path = Path(path)
    if not os.path.lexists(path) or path.is_symlink():
        return False
    digest = _registry().get(_key(path))
    return bool(digest) and fingerprint(path) == digest
