"""What a recovery run leaves in its log folder, and how a rerun resumes from it.

`LogDir(path, checkpoint_every=N, keep=K)` owns `metrics.jsonl` (one JSON line per training step
and per held-out evaluation), `loss.png` (drawn from the metrics at the end) and, with
`checkpoint_every`, an Orbax `CheckpointManager` in `checkpoints/` (keep-last-K) holding the
trainable and optimizer state plus the data iterator's state (JSON: the in-memory grain
iterator's, a streamed run's rows from every process, `data.grain_stream`, or the domain
sampler's), which must come from the same kind of pipeline. `restore` puts a rerun back on the
latest checkpoint and trims the metrics written after it, so the log reads like one uninterrupted
run. Without a path nothing is written. In a multi-process run every process takes part in the
Orbax checkpoints (each writes its shards into the one folder) and only process 0 writes the
metrics and the plot.

The folder is an output like any other (`io.atomic`): an existing one is used only if nnxprune
wrote it and nothing changed it since (or it is empty, or the user passed `--overwrite`, and then
it is replaced), and its fingerprint is recorded after every write, so a rerun, even after a
kill, finds it unchanged and resumes. Rewrites (the trimmed metrics, the plot) go through a
temporary file and a rename. Orbax removes the temporaries of an interrupted save
(`cleanup_tmp_directories`).

Example:
    >>> logs = LogDir("out/train", checkpoint_every=50, keep=2)
    >>> state, start = logs.restore({"trainable": t, "opt": o}, shardings, iterator)
    >>> logs.log({"step": 1, "split": "train", "loss": 3.2})
    >>> logs.save(50, {"trainable": t, "opt": o}, iterator, final=False)
    >>> logs.close(); logs.plot_losses("recovery (distill)")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from nnxprune import multihost
from nnxprune.errors import UserError
from nnxprune.io import atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_DIR = "checkpoints"


def _manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def _set_data_state(iterator, state, where: Path) -> None:
    """Puts the data iterator where the checkpoint's run was; a state written by another kind of
    data pipeline (in memory / streamed / domains) is a UserError, not a KeyError deep in grain."""
    try:
        iterator.set_state(state)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{where} holds the data position of a different data pipeline "
                        f"({type(e).__name__}: {e}); resume with the recipe that wrote it, or "
                        f"use a new train dir") from None


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drops log lines after `last_step` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def plot_losses(metrics_path: Path, png: Path, title: str = "recovery") -> None:
    """Training loss per step (and held-out loss) from the metrics JSONL, as a PNG."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    held = [(r["step"], r["loss"]) for r in rows if r.get("split") == "heldout"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic.write_figure(png, fig, dpi=110)


class LogDir:
    """A run's log folder (or none): metrics JSONL, loss plot, Orbax checkpoints for resume."""

    def __init__(self, path, *, checkpoint_every: int = 0, keep: int = 2):
        self.path = Path(path) if path is not None else None
        self.metrics: Path | None = None
        self.plot: Path | None = None
        self.checkpoint_every = checkpoint_every
        self.manager = None
        if self.path is not None:
            self.path = atomic.prepare_log_dir(self.path)
            self.metrics, self.plot = self.path / METRICS_FILE, self.path / PLOT_FILE
            if checkpoint_every:
                self.manager = _manager(self.checkpoints, keep)

    @property
    def checkpoints(self) -> Path | None:
        return self.path / CHECKPOINT_DIR if self.path is not None else None

    def restore(self, state: dict[str, Any], shardings: dict[str, Any], iterator):
        """`(restored state or None, step to start from)`. With a checkpoint the state comes back
        placed on `shardings` and `iterator` continues where it was; the metrics are trimmed to
        that step (or started afresh when there is no checkpoint)."""
        latest = self.manager.latest_step() if self.manager is not None else None
        restored = None
        if latest is not None:
            import orbax.checkpoint as ocp

            target = {k: _abstract(v, shardings[k]) for k, v in state.items()}
            out = self.manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            _set_data_state(iterator, out["data"], self.checkpoints / str(latest))
            restored = out["state"]
        start = int(latest) if latest is not None else 0
        if self.metrics is not None and multihost.is_primary():
            if start:
                _trim_metrics(self.metrics, start)
            elif self.metrics.exists():
                self.metrics.unlink()
            self.record()
        return restored, start

    def log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None and multihost.is_primary():
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.record()

    def save(self, step: int, state: dict[str, Any], iterator, *, final: bool) -> None:
        """A checkpoint every `checkpoint_every` steps and at the last step (`final`)."""
        if self.manager is None or not (step % self.checkpoint_every == 0 or final):
            return
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())))
        self.record()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None
        self.record()

    def record(self) -> None:
        """The folder's current content recorded as nnxprune's own (after each write)."""
        if self.path is not None:
            atomic.record_log_dir(self.path)

    def plot_losses(self, title: str) -> None:
        """loss.png from the metrics, when any were written."""
        if self.metrics is not None and multihost.is_primary() and self.metrics.is_file():
            plot_losses(self.metrics, self.plot, title=title)
            self.record()
