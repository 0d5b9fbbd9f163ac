"""The resumable state of a streamed run (`prune --stream --resume`, DESIGN.md 12).

A streamed run writes its HF folder inside the temporary folder of `atomic_dir`, one shard per
finished layer. After each layer it also saves, in `.resume/` there, the host activations entering
the next layer (`x-NNNNN.npy`, float32 `[N, T, D]`; none without calibration) and then
`manifest.json`: the run's key, which pass over the layers it is in and how many layers of that
pass are done, the writer's shard index so far, the pass's log and the results of the passes
already finished (a multi-pass method: OWL's outlier pass, ShortGPT's block influence, Minitron's
width statistics, before the pass that writes). The manifest is replaced last (write, then rename), so it always names a complete
state: a run killed anywhere (SIGKILL, power loss) or interrupted (SIGINT, SIGTERM, SIGHUP under
`--resume`) is resumed at the first layer it does not record, and the layers before are neither
read nor computed again. `.resume/` is removed before the folder is renamed into place.

The key says which run the state belongs to: the recipe's `[prune]` and `[calibration]`
settings, the model's identity (its resolved path, kind and each weight file's name, size and
modification time), the run dtype, and the calibration draw itself (sha256 of the tokens). A later
`--resume` continues only a temporary whose key is equal; one whose key differs is refused with a
line naming what differs (`adopter`). Without `--resume` the temporary is an ordinary stale one and
the next write to the same output removes it (`atomic.remove_stale_temporaries`).

Example:
    >>> key = run_key(recipe, source, "float32", tokens)
    >>> with atomic_dir(out, adopt=adopter(key, echo), keep=True) as tmp:
    ...     state = StreamState(tmp, key)          # state.done layers finished by an earlier run
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nnxprune.errors import UserError

FORMAT = 2
_DIR = ".resume"


def _sha(obj: Any) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def model_identity(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The model's identity without reading its weights: resolved path, kind, and each weight or
    config file's name, size and modification time."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".json"))
    return {"path": str(path), "kind": kind,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def run_key(recipe, source, dtype: str, tokens: np.ndarray | None) -> dict[str, str]:
    """The key of a streamed run (module docstring): one sha256 per part, so a refusal can say
    which part differs."""
    raw = recipe.to_dict()
    calibration = "none" if tokens is None else _sha(
        np.ascontiguousarray(tokens, np.int64).tobytes() + str(tokens.shape).encode())
    return {"recipe": _sha({k: raw.get(k) for k in ("prune", "calibration")}),
            "model": _sha(model_identity(source.path, source.kind)),
            "dtype": _sha(dtype), "calibration draw": calibration}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in `folder` (None when there is none or it is unreadable)."""
    try:
        manifest = json.loads((Path(folder) / _DIR / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def adopter(key: dict[str, str], echo=print) -> Callable[[list[Path]], Path | None]:
    """For `atomic_dir(adopt=...)`: picks, among the stale temporaries of the output, the newest
    whose manifest has `key`; refuses (UserError, one line) when there are manifests but none
    matches; None (a fresh start) when there is nothing to resume."""
    def adopt(candidates: list[Path]) -> Path | None:
        found = [(p, m) for p in candidates if p.is_dir() for m in [read_manifest(p)] if m]
        found.sort(key=lambda pm: pm[0].stat().st_mtime, reverse=True)
        for path, manifest in found:
            if manifest.get("key") == key:
                return path
        if found:
            path, manifest = found[0]
            other = manifest.get("key") or {}
            diff = [part for part in key if other.get(part) != key[part]] or ["format"]
            raise UserError(f"--resume: the unfinished run {path} was started with another "
                            f"{' and '.join(diff)}; rerun with the same settings, or drop --resume "
                            f"to start over (its partial output is then removed)")
        echo("resume    nothing to resume: starting at layer 0")
        return None

    return adopt


class StreamState:
    """The resumable state in a streamed run's temporary folder (module docstring)."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, str]):
        self.folder, self.key = Path(folder) / _DIR, key
        manifest = read_manifest(Path(folder))
        self.manifest = manifest if manifest and manifest.get("key") == key else None

    @property
    def done(self) -> int:
        """How many layers of pass `pass_index` an earlier run finished (0 for a fresh run)."""
        return int(self.manifest["done"]) if self.manifest else 0

    @property
    def pass_index(self) -> int:
        """The pass an earlier run was in (0 for a fresh run)."""
        return int(self.manifest["pass"]) if self.manifest else 0

    @property
    def results(self) -> list[Any]:
        """The results of the passes an earlier run finished, in order."""
        return list(self.manifest["results"]) if self.manifest else []

    def resumed(self, index: int) -> dict[str, Any] | None:
        """The manifest when pass `index` is the one an earlier run was in, else None."""
        return self.manifest if self.manifest and self.pass_index == index else None

    def activations(self) -> np.ndarray | None:
        """The host activations entering layer `done` (None without calibration)."""
        name = self.manifest and self.manifest.get("x")
        return np.load(self.folder / name) if name else None

    def save(self, done: int, x: np.ndarray | None, writer: dict[str, Any],
             log: dict[str, Any], per_layer: list[float]) -> None:
        """Records that `done` layers are finished, with `x` entering the next one."""
        self.folder.mkdir(exist_ok=True)
        name = None
        if x is not None:
            name = f"x-{done:05d}.npy"
            with open(self.folder / (name + ".partial"), "wb") as f:
                np.save(f, np.asarray(x, np.float32))
            os.replace(self.folder / (name + ".partial"), self.folder / name)
        self._commit({"format": FORMAT, "key": self.key, "pass": self.pass_index, "done": done,
                      "x": name, "writer": writer, "log": log, "per_layer": list(per_layer),
                      "results": self.results})

    def finish_pass(self, result: Any) -> None:
        """Records that pass `pass_index` is finished with `result` (JSON-able); the next pass
        starts at its layer 0."""
        self.folder.mkdir(exist_ok=True)
        self._commit({"format": FORMAT, "key": self.key, "pass": self.pass_index + 1, "done": 0,
                      "x": None, "writer": {}, "log": {}, "per_layer": [],
                      "results": self.results + [result]})

    def _commit(self, manifest: dict[str, Any]) -> None:
        old, name = self.manifest and self.manifest.get("x"), manifest["x"]
        self.manifest = manifest
        partial = self.folder / "manifest.json.partial"
        partial.write_text(json.dumps(self.manifest) + "\n")
        os.replace(partial, self.folder / "manifest.json")  # the commit point
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)

    def clear(self) -> None:
        """Removes the state (before the folder is renamed into place)."""
        shutil.rmtree(self.folder, ignore_errors=True)
