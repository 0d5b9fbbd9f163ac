"""Running lm-eval tasks on an `NnxpruneLM`: the task index, the run, a Markdown table of results.

`task_manager` checks the task names (and indexes only a local `--include-path` when every task is
there: lm-eval's built-in index costs seconds); `run_tasks` runs them through lm-eval's
`simple_evaluate` and keeps the numeric metrics; `results_table` prints them.

Example:
    >>> out = run_tasks(NnxpruneLM(loaded=loaded), ["wiki_next"], include_path="my_tasks/",
    ...                 limit=100)
    >>> print(results_table(out["results"]))   # | wiki_next | acc | 0.4100 |
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from nnxprune.errors import UserError

if TYPE_CHECKING:
    from nnxprune.evaluate.lmeval.model import NnxpruneLM


def task_manager(tasks: Sequence[str], include_path: str | None):
    """A TaskManager that indexes only `include_path` when every task is there (lm-eval's
    built-in index costs seconds), else also the built-in tasks."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path}: no such folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(f"unknown lm-eval task(s): {', '.join(missing)}"
                        + ("" if include_path else " (local task YAMLs need --include-path)"))
    return manager


# `dataset_path`s that name a datasets builder for local files (`data_files`), not a hub dataset
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def _leaves(manager, name: str, depth: int = 0) -> list[tuple[str, dict]]:
    """(task name, config) of every task `name` runs (a group's or tag's members, recursively),
    from lm-eval's task index: no data is read."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return []
    cfg = entry.cfg or {}
    if entry.kind.name == "GROUP":
        leaves = []
        for child in cfg.get("task") or []:
            if isinstance(child, str):
                leaves += _leaves(manager, child, depth + 1)
            elif isinstance(child, dict):  # a task defined inside the group's YAML
                leaves.append((str(child.get("task", name)), child))
        return leaves
    if entry.kind.name == "TAG":
        return [leaf for member in sorted(entry.tags) for leaf in _leaves(manager, member, depth + 1)]
    return [(name, cfg)]


def _check_data(manager, tasks: Sequence[str]) -> None:
    """UserError naming the task and the file when a task's local data file is missing, or the
    hub when a task needs it and it cannot be reached (without offline mode, which reads the
    local cache): before any model work, and without reading any data."""
    from pathlib import Path

    from nnxprune.data import sources

    hub = []  # tasks whose data only the hub serves
    for name, cfg in (leaf for task in tasks for leaf in _leaves(manager, task)):
        path = cfg.get("dataset_path")
        if path in _LOCAL_BUILDERS:
            files = (cfg.get("dataset_kwargs") or {}).get("data_files")
            for file in _file_names(files):
                if "://" not in file and not any(c in file for c in "*?[") \
                        and not Path(file).expanduser().exists():
                    raise UserError(f"lm-eval task {name}: data file {file} not found")
        elif not (isinstance(path, str) and Path(path).expanduser().exists()):
            hub.append(f"{name} ({path or 'its dataset'})")
    if hub:  # one probe for all of them
        more = f" and {len(hub) - 2} more" if len(hub) > 2 else ""
        sources._require_hub(f"the data of lm-eval task {', '.join(hub[:2])}{more}",
                             "connect, or set HF_DATASETS_OFFLINE=1 to use the datasets cached here")


def _file_names(files) -> list[str]:
    """The file names of a datasets `data_files` value (a name, a list, or split -> either)."""
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for value in files.values() for f in _file_names(value)]
    if isinstance(files, (list, tuple)):
        return [f for value in files for f in _file_names(value)]
    return []


def load_tasks(tasks: Sequence[str], include_path: str | None):
    """`(manager, built)`: lm-eval's task manager and the Task / Group objects of `tasks`, their
    data loaded. Unknown tasks, a missing data file, an unreachable hub or any other failure to
    load a task's data is a UserError naming the task, before any model work."""
    from nnxprune.data import sources

    manager = task_manager(tasks, include_path)
    _check_data(manager, tasks)
    built = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 - datasets / lm-eval raise many types
            offline = "; offline mode reads only the local datasets cache" \
                if sources._hub_offline() else ""
            raise UserError(f"lm-eval task {name}: cannot load its data "
                            f"({sources._one_line(e)[:300]}){offline}") from None
        objects = {**loaded["tasks"], **loaded["groups"]}
        built += [objects[name]] if name in objects else list(loaded["tasks"].values())
    return manager, built


def run_tasks(lm: NnxpruneLM, tasks: Sequence[str], *, include_path: str | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None,
              seed: int = 0, prepared=None) -> dict[str, Any]:
    """Runs lm-eval `tasks` on `lm`; returns `{"results": {task: {metric: value}}, ...}`.
    `prepared` is `load_tasks`'s result for the same tasks (built before the model loaded)."""
    from lm_eval import evaluator

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("give at least one lm-eval task")
    manager, built = prepared or load_tasks(tasks, include_path)
    out = evaluator.simple_evaluate(model=lm, tasks=built, num_fewshot=num_fewshot,
                                    limit=limit, task_manager=manager, random_seed=seed,
                                    numpy_random_seed=seed, torch_random_seed=seed,
                                    fewshot_random_seed=seed, log_samples=False,
                                    bootstrap_iters=0)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))
                      and not (isinstance(v, float) and math.isnan(v))}
               for task, metrics in out["results"].items()}
    return {"results": results, "n_samples": out.get("n-samples", {}),
            "num_fewshot": num_fewshot, "limit": limit, "tasks": list(tasks),
            "compiled_shapes": len(lm._scorer.shapes)}


def results_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or ",none" not in name and "," in name:
                continue
            lines.append(f"| {task} | {name.split(',')[0]} | {value:.4f} |")
    return "\n".join(lines) + "\n"
