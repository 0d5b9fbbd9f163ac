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


def run_tasks(lm: NnxpruneLM, tasks: Sequence[str], *, include_path: str | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Runs lm-eval `tasks` on `lm`; returns `{"results": {task: {metric: value}}, ...}`."""
    from lm_eval import evaluator

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("give at least one lm-eval task")
    manager = task_manager(tasks, include_path)
    out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
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
