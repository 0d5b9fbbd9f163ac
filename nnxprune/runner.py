"""Runs a recipe end to end: load, validate, evaluate dense, prune, evaluate pruned, save, report.

Order matters for users: everything that can be checked without computing (recipe keys and
values, data files, output paths, the pipeline against the model's shapes) is checked before the
first forward pass, and outputs (checkpoint folder, JSON and Markdown reports) are written
atomically at the end, so a failed run leaves nothing behind.

Example:
    >>> report = run_recipe(load_recipe("recipes/surgery-demo.toml"), model="smollm2-135m",
    ...                     out="out/demo", report_path="out/demo.json")
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune import data as data_lib
from nnxprune import multihost
from nnxprune.errors import UserError
from nnxprune.evaluate.perplexity import evaluate_perplexity
from nnxprune.inspect import inspect_model
from nnxprune.io import atomic
from nnxprune.io.checkpoint import save_checkpoint
from nnxprune.io.load import load_model, peek_config, source_label
from nnxprune.measure import (
    PeakMemory,
    count_params,
    measured_sparsity,
    memory_peaks,
    source_hash,
)
from nnxprune.recipes import Recipe
from nnxprune.recovery.run import check_data as check_recovery_data
from nnxprune.recovery import sheared_handoff as handoff
from nnxprune.recovery.sheared_domains import check_data as check_pruning_domains
from nnxprune.recovery.run import default_train_dir, recover, training_windows
from nnxprune.transforms import Context


def _shapes(config) -> list[dict[str, int]]:
    return [{"num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
             "intermediate_size": s.intermediate_size} for s in config.layers]


def _lm_eval(model, loaded, settings: dict[str, Any], echo, label: str) -> dict[str, Any]:
    """Runs the recipe's lm-eval tasks on `model`; returns lm-eval's numeric results."""
    import dataclasses

    from nnxprune.evaluate import lmeval

    lm = lmeval.NnxpruneLM(loaded=dataclasses.replace(loaded, model=model),
                           batch_size=settings.get("batch_size", 8),
                           max_length=settings.get("max_length"))
    t0 = time.perf_counter()
    out = lmeval.run_tasks(lm, settings["tasks"], include_path=settings.get("include_path"),
                           limit=settings.get("limit"), num_fewshot=settings.get("num_fewshot"))
    out["seconds"] = time.perf_counter() - t0
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if "stderr" not in k and k.endswith(",none"))
        echo(f"{label:9s} {task}: {shown}")
    return out


def _check_calibration_source(recipe: Recipe, data_dir) -> None:
    """Fails fast when the calibration data could not be read (before any model work): a missing
    or unreadable file, the data folder's C4 slice, or the hub (`preflight.check_calibration`)."""
    if recipe.calibration is not None and recipe.pipeline.needs_calibration:
        from nnxprune.preflight import check_calibration

        check_calibration(recipe.calibration.dataset, data_dir)


def markdown_report(report: dict[str, Any]) -> str:
    """The dense-beside-pruned table of a run, as Markdown."""
    lines = [f"# {report['recipe']['name']} on {report['model']}", ""]
    if report["recipe"].get("description"):
        lines += [report["recipe"]["description"], ""]
    dense, pruned = report["dense"], report["pruned"]
    lines += ["| | dense | pruned |", "|---|---|---|",
              f"| parameters | {dense['params']:,} | {pruned['params']:,} "
              f"({pruned['params'] / dense['params']:.1%}) |",
              f"| layers | {len(dense['layers'])} | {len(pruned['layers'])} |",
              f"| hidden size | {dense['hidden_size']} | {pruned['hidden_size']} |",
              f"| sparsity of the decoder projections | {dense['sparsity']:.2%} | "
              f"{pruned['sparsity']:.2%} |"]
    if "ppl" in dense:
        lines.append(f"| perplexity | {dense['ppl']:.3f} | {pruned['ppl']:.3f} |")
    lines.append("")
    if report.get("recovery") and report["recovery"].get("losses"):
        rec, after = report["recovery"], report.get("recovered", {})
        ppl = f", perplexity {after['ppl']:.3f} after" if "ppl" in after else ""
        lines += [f"Recovery {rec['settings']['kind']}: {rec['steps']} steps, training loss "
                  f"{rec['first_loss']:.4f} -> {rec['final_loss']:.4f}, sparsity "
                  f"{after.get('sparsity', 0):.2%}{ppl}.", ""]
    if report.get("method"):
        lines.append(f"Method {report['method']}, pattern {report['pattern']}, target sparsity "
                     f"{report['target_sparsity']:.2%}.")
    if report.get("eval_protocol_text"):
        lines.append(f"Protocol: {report['eval_protocol_text']}.")
    sec = report["seconds"]
    lines += [f"Pruning took {sec['prune']:.1f} s ({sec.get('calibration_forward', 0):.1f} s of "
              f"calibration forwards, {sec.get('solve', 0):.1f} s scoring and solving); peak "
              f"memory {report.get('peak_memory_bytes', 0) / 2**30:.2f} GiB while pruning, "
              f"{report.get('peak_rss_gb', 0):.2f} GB for the whole process.", ""]
    return "\n".join(lines)


def _ppl(model, tokenizer, recipe: Recipe, data_dir, progress: bool) -> dict[str, Any]:
    return evaluate_perplexity(model, tokenizer, recipe.eval, data_dir=data_dir,
                               progress=progress).summary()


def report_outputs(report_path, views: bool = True) -> list[Path]:
    """The files a run's report is written to: the JSON, its Markdown twin and (with `views`) the
    treescope HTML and the PNG plot (`atomic.sibling`: never the same path as the JSON)."""
    if report_path is None:
        return []
    base = Path(report_path)
    return [base, *(atomic.sibling(base, s) for s in ((".md", ".html", ".png") if views else (".md",)))]


def check_against(recipe: Recipe, name: str):
    """`recipe.check` against MODEL's config read without weights (a card's, a folder's, a
    checkpoint's): the weight-free checks, before any loading. Returns (config, predicted), or
    (None, None) when the config cannot be had without the weights."""
    config = peek_config(name)
    if config is None:
        return None, None
    predicted = recipe.check(config)
    recipe.check_changes(config)
    return config, predicted


def _preflight(recipe: Recipe, name: str | None, out, report_path, data_dir, *, views: bool = True,
               overwrite: bool = False, train_dir=None):
    """Every check that needs no weights: model name, outputs, data, lm-eval tasks, recovery
    settings, the pipeline against the model's config. Returns the resolved data folder."""
    if not name:
        raise UserError("no model: pass --model or set [recipe] model")
    if out is None and report_path is None:
        raise UserError("nothing would be written: pass --out and/or --json")
    files = report_outputs(report_path, views)
    atomic.check_outputs(folders=[out], files=files, overwrite=overwrite)
    if recipe.recovery is not None:
        atomic.check_log_dir(train_dir or default_train_dir(out, report_path), overwrite=overwrite,
                             outputs=[out, *files])
    data_dir = data_lib.resolve_data_dir(data_dir)
    if recipe.eval is not None:
        data_lib.check_available(recipe.eval.dataset, recipe.eval.split, data_dir)
    _check_calibration_source(recipe, data_dir)
    check_pruning_domains(recipe.pipeline, data_dir)  # a sheared step's domains, if any
    if recipe.lm_eval is not None:  # unknown tasks or a missing include_path fail here
        from nnxprune.evaluate import lmeval

        lmeval.task_manager(recipe.lm_eval["tasks"], recipe.lm_eval.get("include_path"))
    if recipe.recovery is not None:
        check_recovery_data(recipe.recovery, data_dir)
        lora = recipe.recovery.lora
        if lora is not None and not lora.merge and out is not None:
            raise UserError("recovery.lora.merge = false keeps the adapters outside the kernels, "
                            "but checkpoints hold plain projections: set merge = true or drop --out")
    check_against(recipe, name)
    return data_dir


def _dense(recipe: Recipe, name: str, loaded, t0: float, *, data_dir, progress: bool, echo):
    """Checks the pipeline against the model's shapes, draws the calibration data and evaluates
    the dense model. Returns the report so far, the pipeline's context, the predicted config and
    the recovery's token windows (None without [recovery])."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    predicted = recipe.check(config)  # every step validated before any work
    recipe.check_changes(config)
    echo(f"model     {loaded.source}: {config.num_layers} layers, "
         f"{count_params(model) / 1e6:.1f}M parameters")
    echo(f"recipe    {recipe.name}: {len(recipe.pipeline.steps)} steps "
         f"({', '.join(s.kind for s in recipe.pipeline.steps) or 'none'})")
    report: dict[str, Any] = {
        "recipe": {"name": recipe.name, "path": recipe.path, "description": recipe.description,
                   "settings": recipe.to_dict()},
        "model": name, "source": loaded.source,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dense": {"params": count_params(model), "hidden_size": config.hidden_size,
                  "layers": _shapes(config), "sparsity": measured_sparsity(model)["overall"]},
        "seconds": {"load": time.perf_counter() - t0},
    }
    ctx = Context(tokenizer=tokenizer, calibration=recipe.calibration, data_dir=data_dir,
                  progress=progress)
    windows = None
    if recipe.recovery is not None:  # an unreadable training set fails before any evaluation
        windows = training_windows(recipe.recovery, tokenizer, data_dir)
    if recipe.pipeline.needs_calibration:
        t1 = time.perf_counter()
        tokens = ctx.calibration_tokens()  # drawn before any model work: bad data fails here
        report["seconds"]["calibration_draw"] = time.perf_counter() - t1
        echo(f"calib     {tokens.shape[0]} x {tokens.shape[1]} tokens from "
             f"{recipe.calibration.dataset} (seed {recipe.calibration.seed})")
    if recipe.eval is not None:
        echo(f"protocol  {recipe.eval.describe()}")
        report["eval_protocol"] = recipe.eval.to_dict()
        report["eval_protocol_text"] = recipe.eval.describe()
        report["dense"].update(_ppl(model, tokenizer, recipe, data_dir, progress))
        echo(f"dense     ppl {report['dense']['ppl']:.4f}")
    if recipe.lm_eval is not None:
        report["dense"]["lm_eval"] = _lm_eval(model, loaded, recipe.lm_eval, echo, "dense")
    return report, ctx, predicted, windows


def _prune(recipe: Recipe, model, ctx: Context, predicted, report: dict[str, Any], echo):
    """Runs the pipeline (a copy of the dense model is kept as the teacher of a distillation) and
    records the pruned model. Returns `(pruned model, teacher or None)`."""
    t1 = time.perf_counter()
    with PeakMemory() as memory:
        teacher = None  # distillation learns from the unpruned model
        if recipe.recovery is not None and recipe.recovery.kind == "distill":
            teacher = nnx.clone(model)
        model = recipe.pipeline(model, ctx)
    report["seconds"]["prune"] = time.perf_counter() - t1
    report["peak_memory_bytes"] = memory.peak
    report["transforms"] = ctx.report.get("transforms", [])
    calibration = sum(sum(v for k, v in t.get("timings", {}).items() if k != "visit")
                      for t in report["transforms"])
    report["seconds"]["calibration_forward"] = calibration
    report["seconds"]["solve"] = report["seconds"]["prune"] - calibration
    methods = [s for s in recipe.pipeline.steps if hasattr(s, "target_sparsity")]
    if methods:
        report["method"] = methods[-1].kind
        report["pattern"] = getattr(methods[-1], "pattern", None) or "unstructured"
        report["target_sparsity"] = methods[-1].target_sparsity()
    pruned_config = model.config
    if pruned_config.layers != predicted.layers or pruned_config.hidden_size != predicted.hidden_size:
        if not any(s.kind == "fold_masks" or getattr(s, "shapes_from_scores", False)
                   for s in recipe.pipeline.steps):
            raise AssertionError(f"pipeline produced {pruned_config}, its check predicted {predicted}")
    report["sparsity"] = measured_sparsity(model)
    report["pruned"] = {"params": count_params(model), "hidden_size": pruned_config.hidden_size,
                        "layers": _shapes(pruned_config), "sparsity": report["sparsity"]["overall"]}
    echo(f"pruned    {report['pruned']['params'] / 1e6:.1f}M parameters "
         f"({report['pruned']['params'] / report['dense']['params']:.1%} of dense) in "
         f"{report['seconds']['prune']:.1f} s")
    return model, teacher


def _save(model, out, recipe: Recipe, loaded, dense_config, echo, extra=None) -> None:
    """The pruned model as an nnxprune checkpoint, with where it came from. In a multi-process
    run the model is first spread over every device (FSDP by the recovery rules), so that Orbax
    writes one checkpoint from all processes, each its shards."""
    if multihost.joined():
        from nnxprune.recovery import sharding as sh

        sh.place_model(model, sh.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1}))
    provenance = {"recipe": recipe.to_dict(), "recipe_path": recipe.path, "source": loaded.source,
                  "source_model": source_label(loaded), "source_sha256": source_hash(loaded.path),
                  "source_config": dense_config.to_dict(), **(extra or {})}
    save_checkpoint(model, out, tokenizer=loaded.tokenizer, provenance=provenance)
    if multihost.joined():  # whole again in every process, for the report's views
        nnx.update(model, multihost.local_copy(nnx.state(model)))
    echo(f"wrote     {out}")


def _write_report(report: dict[str, Any], report_path, model, dense_config, title: str, *,
                  views: bool, echo) -> None:
    """The JSON and Markdown reports, and (with `views`) the treescope view and per-layer plot."""
    files = report_outputs(report_path, views)
    if views:  # the pruned architecture for people: treescope view and per-layer plot
        summary = inspect_model(model, source_config=dense_config, html=files[2], png=files[3],
                                title=title)
        report["summary"] = summary.to_dict()
    atomic.write_json(report_path, report)
    atomic.write_text(files[1], markdown_report(report))
    echo(f"wrote     {report_path} (and {', '.join(str(f) for f in files[1:])})")


@atomic.run_outputs()  # outputs checked at startup are checked again when written
def run_recipe(recipe: Recipe, *, model: str | None, out: str | None, report_path: str | None = None,
               data_dir=None, progress: bool = True, views: bool = True,
               echo=print, train_dir=None, overwrite: bool = False,
               dtype: str = "float32") -> dict[str, Any]:
    """Runs `recipe` on `model` (default: the recipe's); see the module docstring.

    With a `[recovery]` section the pruned model is trained after the transforms (logs and
    resumable checkpoints in `train_dir`, default `REPORT.train/`) and evaluated again. Existing
    outputs are replaced only if nnxprune wrote them, or with `overwrite` (`nnxprune.io.atomic`).

    Memory in the report: `peak_rss_gb`, the process's peak resident memory since it started
    (loading, evaluation and saving included; `ru_maxrss`), `device_peak_gb`, the accelerator's
    peak bytes in use (None on CPU), both in GB of 10^9 bytes (`measure.memory_peaks`); and
    `peak_memory_bytes`, the highest resident memory polled while the pipeline ran (`PeakMemory`).

    In a multi-process run (`--distributed`) every process runs it on the same data; process 0
    alone prints, shows progress bars and writes the report, and all write the checkpoint
    (`_save`). The report's timings and memory figures are process 0's.
    """
    if not multihost.is_primary():
        echo, progress = (lambda *a, **k: None), False
    name = model or recipe.model
    data_dir = _preflight(recipe, name, out, report_path, data_dir, views=views,
                          overwrite=overwrite, train_dir=train_dir)
    t0 = time.perf_counter()
    loaded = load_model(name, param_dtype=jnp.dtype(dtype))  # float32 | bfloat16
    tokenizer, dense_config = loaded.tokenizer, loaded.model.config
    report, ctx, predicted, windows = _dense(recipe, name, loaded, t0, data_dir=data_dir, progress=progress,
                                    echo=echo)
    model_obj, teacher = _prune(recipe, loaded.model, ctx, predicted, report, echo)
    if recipe.eval is not None:
        report["pruned"].update(_ppl(model_obj, tokenizer, recipe, data_dir, progress))
        echo(f"pruned    ppl {report['pruned']['ppl']:.4f}")
    if recipe.recovery is not None:
        t1 = time.perf_counter()  # a pruning stage's final domain weights seed the recovery's
        cfg, seeded = handoff.seed_from_report(recipe.recovery, report["transforms"])
        report["recovery"] = recover(
            model_obj, cfg, tokenizer=tokenizer, teacher=teacher, data_dir=data_dir,
            windows=windows,
            log_dir=train_dir or default_train_dir(out, report_path), progress=progress, echo=echo)
        if seeded:
            report["recovery"]["initial_weights_from"] = seeded
        del teacher
        report["seconds"]["recovery"] = time.perf_counter() - t1
        report["recovered"] = {"params": count_params(model_obj),
                               "sparsity": measured_sparsity(model_obj)["overall"]}
        if recipe.eval is not None:
            report["recovered"].update(_ppl(model_obj, tokenizer, recipe, data_dir, progress))
            echo(f"recovered ppl {report['recovered']['ppl']:.4f}")
    if recipe.lm_eval is not None:
        final = "recovered" if recipe.recovery is not None else "pruned"
        report[final]["lm_eval"] = _lm_eval(model_obj, loaded, recipe.lm_eval, echo, final)
    if out is not None:
        _save(model_obj, out, recipe, loaded, dense_config, echo,  # the pruning stage's output:
              extra=handoff.provenance(report["transforms"]) if recipe.recovery is None else None)
        report["checkpoint"] = str(out)
    report["seconds"]["total"] = time.perf_counter() - t0
    report.update(memory_peaks())  # after the save: the whole run's peak
    if report_path is not None and multihost.is_primary():
        _write_report(report, report_path, model_obj, dense_config, f"{recipe.name} on {name}",
                      views=views, echo=echo)
    echo(markdown_report(report))
    multihost.done()  # a multi-process run: this process's silence from now on is no failure
    return report


def check_recipe(recipe: Recipe, *, model: str | None, echo=print, stream: bool = False,
                 dtype: str = "float32", memory_budget: float | None = None) -> dict[str, Any]:
    """`nnxprune prune --check`: validates `recipe` against MODEL's config (no weight is loaded)
    and prints the predicted per-layer shapes and parameter counts, and the run's predicted peak
    memory (`nnxprune.plan_check`: in memory or `stream`, in `dtype`, against `memory_budget`
    GB or this machine's available memory). Returns them."""
    from nnxprune.io.hf import abstract_model

    name = model or recipe.model
    if not name:
        raise UserError("no model: pass --model or set [recipe] model")
    config, predicted = check_against(recipe, name)
    if config is None:
        raise UserError(f"{name}: its config cannot be read without downloading the weights "
                        f"(offline?); --check needs it")

    def params(cfg) -> int:
        state = nnx.state(abstract_model(cfg), nnx.Param)
        return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(state))

    dense, pruned = params(config), params(predicted)
    echo(f"recipe    {recipe.name}: {len(recipe.pipeline.steps)} steps "
         f"({', '.join(s.kind for s in recipe.pipeline.steps) or 'none'}) on {name}: valid")
    echo(f"hidden    {config.hidden_size} -> {predicted.hidden_size}; layers {config.num_layers} "
         f"-> {predicted.num_layers}")
    echo("layer  heads  kv  mlp")
    for i, s in enumerate(predicted.layers):
        echo(f"{i:5d}  {s.num_heads:5d}  {s.num_kv_heads:2d}  {s.intermediate_size}")
    echo(f"params    {dense:,} -> {pruned:,} ({pruned / dense:.1%}; masks not counted)")
    from nnxprune.plan_check import check_memory

    memory = check_memory(recipe, config, predicted, model=name, stream=stream, dtype=dtype,
                          budget_gb=memory_budget, echo=echo)
    return {"dense": {"params": dense, "hidden_size": config.hidden_size, "layers": _shapes(config)},
            "pruned": {"params": pruned, "hidden_size": predicted.hidden_size,
                       "layers": _shapes(predicted)}, "memory": memory}
